"""TFLite files of a converted foundation-model classifier beside EfficientNet-B0's: size,
one-thread latency and distance to Keras, per variant (float32, float16, dynamic-range int8,
full int8).

    python benchmarks/foundation_tflite.py --model retfound [--weights DIR] [--size 224] [--runs 10]
    python benchmarks/foundation_tflite.py --model flair --weights DIR      # any kfundus model name

The method is ``benchmarks/tflite.py``'s: the models are exported with kfundus' own exporter
(``export_bundle``: SavedModel, then each TFLite file in a fresh process), TensorFlow and the
interpreters are limited to one thread, rounds are interleaved and the median of each
variant's runs is reported. The int8 file is calibrated on ``--calibration`` synthetic
fundus images. ``--weights`` names a converted folder (or ``retfound:/path.pth``); without
it the encoder has random weights of the released shape (size and latency do not depend on
the values; the distance of the quantized files to Keras does, a little). The distance is
the max absolute difference of the probabilities on ``--probe`` held-out synthetic images,
with the heads given Glorot-scale random weights (an untrained head outputs 0.5 whatever the
encoder computes), and the share of (image, label) decisions at 0.5 that flip.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import tensorflow as tf

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

from tflite import tflite_call  # noqa: E402  (benchmarks/tflite.py: one image through a file, one thread)

from kfundus.config import ModelConfig  # noqa: E402
from kfundus.data.synthetic import make_arrays  # noqa: E402
from kfundus.deploy.saved_model import export_bundle  # noqa: E402
from kfundus.deploy.tflite import QUANTIZATIONS, TFLITE_FILES, run_tflite  # noqa: E402
from kfundus.systems import build_model  # noqa: E402


def sensitive_head(model, seed: int = 0) -> None:
    """Give the ``logits`` layer Glorot-scale random weights: a new head (RETFound's std 2e-5,
    or any untrained one) makes every probability 0.5 whatever the features, which would
    hide what quantization does to the encoder; a trained head has weights of this scale."""
    layer = model.get_layer("logits")
    kernel, bias = layer.get_weights()
    limit = np.sqrt(6.0 / sum(kernel.shape))
    layer.set_weights([np.random.default_rng(seed).uniform(-limit, limit, kernel.shape).astype("float32"), bias * 0])


def measure(name, model, images, calibration, probe, variants, runs, keep=None) -> list[dict]:
    """Export ``model`` to the TFLite ``variants``; rows of size, latency and distance to Keras."""
    print(f"{name}: exporting {', '.join(variants)} ...", flush=True)
    with tempfile.TemporaryDirectory(dir=keep) as tmp:
        start = time.perf_counter()
        export_bundle(
            model,
            tmp,
            labels=[str(i) for i in range(int(model.outputs[0].shape[-1]))],
            formats=("tflite",),
            tflite_variants=variants,
            calibration=calibration if "int8" in variants else None,
            check=False,
        )
        export_seconds = time.perf_counter() - start
        keras_out = model.predict(probe, batch_size=1, verbose=0)
        sizes = {v: (Path(tmp) / TFLITE_FILES[v]).stat().st_size for v in variants}
        distance, flips = {}, {}
        for v in variants:
            out = next(iter(run_tflite(Path(tmp) / TFLITE_FILES[v], {"image": probe}).values()))
            distance[v] = float(np.max(np.abs(out - keras_out)))
            flips[v] = float(np.mean((out > 0.5) != (keras_out > 0.5)))
        calls = {v: tflite_call(Path(tmp) / TFLITE_FILES[v], images[:1]) for v in variants}
        calls["keras predict_on_batch"] = lambda: model.predict_on_batch(images[:1])
        for call in calls.values():  # warm-up
            for _ in range(2):
                call()
        times = {v: [] for v in calls}
        for _ in range(runs):  # interleaved rounds: drift hits every variant alike
            for v, call in calls.items():
                t = time.perf_counter()
                call()
                times[v].append(time.perf_counter() - t)
    median = {v: statistics.median(t) * 1000 for v, t in times.items()}
    base_ms, base_size = median["float32"], sizes["float32"]
    rows = []
    for v in calls:
        rows.append(
            {
                "model": name,
                "variant": v,
                "ms_per_image": round(median[v], 1),
                "speed_vs_float32_tflite": round(base_ms / median[v], 2),
                "size_mb": round(sizes[v] / 1e6, 1) if v in sizes else None,
                "size_vs_float32": round(sizes[v] / base_size, 3) if v in sizes else None,
                "max_abs_diff_vs_keras": float(f"{distance[v]:.3g}") if v in distance else None,
                "decisions_flipped": flips.get(v),
            }
        )
    print(f"{name}: export (all variants) took {export_seconds:.0f} s", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="retfound", help="a kfundus model.name (retfound, flair, ...)")
    parser.add_argument("--weights", default=None, help="converted folder (default: random weights)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=10, help="timed calls per variant (after 2 warm-up calls)")
    parser.add_argument("--calibration", type=int, default=16, help="int8 calibration images")
    parser.add_argument("--probe", type=int, default=8, help="held-out images for the distance to Keras")
    parser.add_argument("--variants", default=",".join(QUANTIZATIONS), help="TFLite variants, comma-separated")
    parser.add_argument("--no-baseline", action="store_true", help="skip EfficientNet-B0")
    parser.add_argument("--out", default=None, help="default: runs/bench/foundation_tflite_<model>.json")
    args = parser.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    out = Path(args.out or f"runs/bench/foundation_tflite_{args.model}.json")

    images, _ = make_arrays(args.calibration + args.probe, size=args.size, labels=("D", "G", "C"), seed=0)
    images = images.astype("float32")
    calibration, probe = {"image": images[: args.calibration]}, images[args.calibration :]
    rows = []
    if not args.no_baseline:
        baseline = build_model(
            ModelConfig(name="efficientnet_b0", weights=None), num_outputs=8, image_size=args.size, task="multilabel"
        )
        sensitive_head(baseline)
        rows += measure("efficientnet_b0", baseline, images, calibration, probe, variants, args.runs)
        del baseline
    model = build_model(
        ModelConfig(name=args.model, weights=args.weights, dropout=0.0),
        num_outputs=8,
        image_size=args.size,
        task="multilabel",
    )
    sensitive_head(model)
    print(f"{args.model}: {model.count_params() / 1e6:.1f} M parameters", flush=True)
    rows += measure(args.model, model, images, calibration, probe, variants, args.runs)

    print(f"\n{args.size} px, batch 1, one thread, median of {args.runs} interleaved runs")
    print(
        "| model | variant | ms / image | speed vs float32 TFLite | size (MB) | size vs float32 | max diff vs Keras |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["model"], r["variant"], f"{r['ms_per_image']:.1f}", f"{r['speed_vs_float32_tflite']:.2f}x"]
        keys = ("size_mb", "size_vs_float32", "max_abs_diff_vs_keras", "decisions_flipped")
        cells += [str(r[k]) if r[k] is not None else "n/a" for k in keys]
        print("| " + " | ".join(cells) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "weights": args.weights,
                "image_size": args.size,
                "runs": args.runs,
                "calibration_images": args.calibration,
                "rows": rows,
                "tensorflow": tf.__version__,
            },
            indent=1,
        )
    )
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
