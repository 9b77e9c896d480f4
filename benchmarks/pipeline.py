"""Pipeline throughput on real full-resolution fundus JPEGs, as ratios to a plain pipeline.

Baseline (measured in the same run): ``read_file -> decode_jpeg -> resize`` with a parallel
``map`` and prefetch — what a Keras tutorial does. kfundus: the first pass (DCT-domain
reduced decode, fundus crop, resize, written to the cache) and a cached pass (streamed
from the cache, no decoding). Targets: first pass >= 2.5x, cached pass >= 20x.

    python benchmarks/pipeline.py [--data ../shared/data/idrid-grading] [--size 224] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402

from kfundus.data.manifest import Manifest  # noqa: E402
from kfundus.data.pipeline import Preprocess, make_dataset, prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def plain_pipeline(paths, size, batch_size):
    def load(path):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.image.resize(image, (size, size))

    ds = tf.data.Dataset.from_tensor_slices(paths)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    return ds.prefetch(tf.data.AUTOTUNE)


def images_per_second(fn, n_images, repeats):
    """Best of ``repeats`` timings of ``fn`` (which processes n_images)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n_images / best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "idrid-grading"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    folder = Path(args.data)
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    if args.limit:
        paths = paths[: args.limit]
    if not paths:
        print(f"no JPEG images under {folder}: point --data at a folder of fundus JPEGs "
              "(e.g. ../shared/data/idrid-grading)")
        return 2
    n = len(paths)
    manifest = Manifest(pd.DataFrame({"image": paths, "patient_id": paths, "y": 0}), ["y"], name="bench")
    config = Preprocess(image_size=args.size)
    print(f"{n} images from {folder}, {args.size} px, tf {tf.__version__}, {os.cpu_count()} cores")

    def drain(ds):
        for _ in ds:
            pass

    baseline = images_per_second(lambda: drain(plain_pipeline(paths, args.size, args.batch_size)), n, args.repeats)

    def first_pass():
        cache = tempfile.mkdtemp(prefix="kfundus-bench-")
        try:
            drain(make_dataset(prepare(manifest, config, cache_dir=cache, progress=False), batch_size=args.batch_size))
        finally:
            shutil.rmtree(cache)

    first = images_per_second(first_pass, n, args.repeats)
    cache = tempfile.mkdtemp(prefix="kfundus-bench-")
    try:
        prepared = prepare(manifest, config, cache_dir=cache, progress=False)
        cached = images_per_second(lambda: drain(make_dataset(prepared, batch_size=args.batch_size)),
                                   n, max(args.repeats, 5))
    finally:
        shutil.rmtree(cache)

    rows = [
        ("plain decode_jpeg -> resize", baseline, 1.0, ""),
        ("kfundus first pass (DCT decode + crop + cache)", first, first / baseline, ">= 2.5x"),
        ("kfundus cached pass", cached, cached / baseline, ">= 20x"),
    ]
    print(f"\n| pipeline | images/s | ratio to plain | target |\n|---|---|---|---|")
    for name, ips, ratio, target in rows:
        print(f"| {name} | {ips:.1f} | {ratio:.1f}x | {target} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"images": n, "size": args.size, "baseline_ips": baseline,
                                               "first_pass_ips": first, "cached_ips": cached}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
