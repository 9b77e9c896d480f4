"""TFLite variants of EfficientNet-B0 (224 px): per-image latency on one thread and file
size, against Keras ``predict_on_batch`` at batch size 1 and the float32 TFLite file.

    python benchmarks/tflite.py [--size 224] [--runs 50] [--out runs/bench/tflite.json]

Measured, not asserted (timings vary by up to 40 % on shared VMs; rounds are interleaved
and the median of each variant's runs is reported). The model is kfundus' EfficientNet-B0
builder with random weights (no ImageNet download here: latency and size do not depend on
the weight values); the int8 file is calibrated on 64 synthetic fundus images. TensorFlow
is limited to one intra-op and one inter-op thread so that Keras and the interpreters
compete on equal terms.

Targets (issue 8): int8 at least 2x faster than float32 TFLite, and at most 30 % of its size.
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

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

from kfundus.config import ModelConfig  # noqa: E402
from kfundus.data.synthetic import make_arrays  # noqa: E402
from kfundus.export import export_bundle  # noqa: E402
from kfundus.tflite import QUANTIZATIONS, TFLITE_FILES, _interpreter, _quantize  # noqa: E402
from kfundus.models import build_model  # noqa: E402


def tflite_call(path: Path, image: np.ndarray):
    """A zero-argument function running one image through the file on one thread."""
    interpreter = _interpreter(path, num_threads=1)
    runner = interpreter.get_signature_runner("serving_default")
    detail = runner.get_input_details()["image"]
    feed = _quantize(image, detail)
    return lambda: runner(image=feed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=50, help="timed calls per variant (after 5 warm-up calls)")
    parser.add_argument("--out", default="runs/bench/tflite.json")
    args = parser.parse_args(argv)

    model = build_model(ModelConfig(name="efficientnet_b0", weights=None), num_outputs=8,
                        image_size=args.size, task="multilabel")
    images, _ = make_arrays(65, size=args.size, labels=("D", "G", "C"), seed=0)
    images = images.astype("float32")
    calibration, probe = {"image": images[:64]}, images[64:65]

    with tempfile.TemporaryDirectory() as tmp:
        print(f"converting EfficientNet-B0 {args.size} px to {', '.join(QUANTIZATIONS)} ...", flush=True)
        paths = export_bundle(model, tmp, labels=[str(i) for i in range(8)], formats=("tflite",),
                              tflite_variants=QUANTIZATIONS, calibration=calibration, check=False)
        sizes = {v: (Path(tmp) / TFLITE_FILES[v]).stat().st_size for v in QUANTIZATIONS}
        calls = {v: tflite_call(Path(tmp) / TFLITE_FILES[v], probe) for v in QUANTIZATIONS}
        calls["keras predict_on_batch"] = lambda: model.predict_on_batch(probe)
        del paths
        for call in calls.values():  # warm-up
            for _ in range(5):
                call()
        times = {name: [] for name in calls}
        for _ in range(args.runs):  # interleaved rounds: drift hits every variant alike
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(t) * 1000 for name, t in times.items()}
    base_ms, base_size = median["float32"], sizes["float32"]
    rows = []
    for name in calls:
        rows.append({"variant": name, "ms_per_image": round(median[name], 2),
                     "speed_vs_float32_tflite": round(base_ms / median[name], 2),
                     "size_bytes": sizes.get(name), "size_vs_float32": round(sizes[name] / base_size, 3)
                     if name in sizes else None})
    print(f"\nEfficientNet-B0, {args.size} px, batch 1, one thread, median of {args.runs} interleaved runs")
    print("| variant | ms / image | speed vs float32 TFLite | size (MB) | size vs float32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        size = f"{r['size_bytes'] / 1e6:.2f}" if r["size_bytes"] else "n/a"
        ratio = f"{r['size_vs_float32']:.3f}" if r["size_vs_float32"] else "n/a"
        print(f"| {r['variant']} | {r['ms_per_image']:.2f} | {r['speed_vs_float32_tflite']:.2f}x | {size} | {ratio} |")
    int8 = next(r for r in rows if r["variant"] == "int8")
    verdict = {"int8_speedup_target_2x_met": int8["speed_vs_float32_tflite"] >= 2.0,
               "int8_size_target_30pct_met": int8["size_vs_float32"] <= 0.30}
    print(f"\nint8 vs float32 TFLite: {int8['speed_vs_float32_tflite']:.2f}x faster (target >= 2x: "
          f"{'met' if verdict['int8_speedup_target_2x_met'] else 'NOT met'}), {int8['size_vs_float32']:.1%} of the "
          f"size (target <= 30 %: {'met' if verdict['int8_size_target_30pct_met'] else 'NOT met'})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"image_size": args.size, "runs": args.runs, "rows": rows, **verdict,
                               "tensorflow": tf.__version__}, indent=1))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
