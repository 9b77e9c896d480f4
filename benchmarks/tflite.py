"""TFLite variants of EfficientNet-B0 (224 px): per-image latency on one thread and file
size, against Keras ``predict_on_batch`` at batch size 1 and the float32 TFLite file.

    python benchmarks/tflite.py [--size 224] [--runs 50] [--out runs/bench/tflite.json]
    python benchmarks/tflite.py --model efficientnet_lite0   # no squeeze-excitation, ReLU6

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

import numpy as np
import tensorflow as tf

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

from kfundus.config import ModelConfig  # noqa: E402
from kfundus.data.synthetic import make_arrays  # noqa: E402
from kfundus.deploy.saved_model import export_bundle  # noqa: E402
from kfundus.deploy.tflite import QUANTIZATIONS, TFLITE_FILES, make_interpreter, quantize  # noqa: E402
from kfundus.systems import build_model  # noqa: E402


def tflite_call(path: Path, image: np.ndarray):
    """A zero-argument function running one image through the file on one thread."""
    interpreter = make_interpreter(path, num_threads=1)
    runner = interpreter.get_signature_runner("serving_default")
    name = next(iter(runner.get_input_details()))  # the one image input, whatever its name
    feed = quantize(image, runner.get_input_details()[name])
    return lambda: runner(**{name: feed})


def efficientnet_lite0(size: int, num_outputs: int):
    """EfficientNet-Lite0 (keras-hub's backbone with timm's lite0 settings: B0's blocks without
    squeeze-excitation, ReLU6), a pooled linear head and sigmoid: a comparison point for the
    int8 ratios, since squeeze-excitation and swish are what quantize worst in B0."""
    import keras
    import keras_hub

    backbone = keras_hub.models.EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3, 5, 3, 5, 5, 3],
        stackwise_num_repeats=[1, 2, 2, 3, 3, 4, 1],
        stackwise_input_filters=[32, 16, 24, 40, 80, 112, 192],
        stackwise_output_filters=[16, 24, 40, 80, 112, 192, 320],
        stackwise_expansion_ratios=[1, 6, 6, 6, 6, 6, 6],
        stackwise_strides=[1, 2, 2, 2, 1, 2, 1],
        stackwise_block_types=["v1"] * 7,
        stackwise_width_coefficients=[1.0] * 7,
        stackwise_depth_coefficients=[1.0] * 7,
        stackwise_squeeze_and_excite_ratios=[0] * 7,
        activation="relu6",
        min_depth=None,
        use_depth_divisor_as_min_depth=True,
        cap_round_filter_decrease=True,
        dropout=0,
        input_shape=(size, size, 3),
    )
    image = keras.Input((size, size, 3), name="image")
    features = backbone(keras.layers.Rescaling(1 / 127.5, offset=-1)(image))
    logits = keras.layers.Dense(num_outputs)(keras.layers.GlobalAveragePooling2D()(features))
    return keras.Model(image, keras.layers.Activation("sigmoid", name="probabilities")(logits))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=50, help="timed calls per variant (after 5 warm-up calls)")
    parser.add_argument("--model", choices=["efficientnet_b0", "efficientnet_lite0"], default="efficientnet_b0")
    parser.add_argument("--out", default=None, help="default: runs/bench/tflite[_lite0].json")
    args = parser.parse_args(argv)
    args.out = args.out or f"runs/bench/tflite{'_lite0' if args.model == 'efficientnet_lite0' else ''}.json"

    if args.model == "efficientnet_lite0":
        model = efficientnet_lite0(args.size, 8)
    else:
        model = build_model(
            ModelConfig(name="efficientnet_b0", weights=None), num_outputs=8, image_size=args.size, task="multilabel"
        )
    images, _ = make_arrays(65, size=args.size, labels=("D", "G", "C"), seed=0)
    images = images.astype("float32")
    calibration, probe = {"image": images[:64]}, images[64:65]

    with tempfile.TemporaryDirectory() as tmp:
        print(f"converting EfficientNet-B0 {args.size} px to {', '.join(QUANTIZATIONS)} ...", flush=True)
        paths = export_bundle(
            model,
            tmp,
            labels=[str(i) for i in range(8)],
            formats=("tflite",),
            tflite_variants=QUANTIZATIONS,
            calibration=calibration,
            check=False,
        )
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
        rows.append(
            {
                "variant": name,
                "ms_per_image": round(median[name], 2),
                "speed_vs_float32_tflite": round(base_ms / median[name], 2),
                "size_bytes": sizes.get(name),
                "size_vs_float32": round(sizes[name] / base_size, 3) if name in sizes else None,
            }
        )
    print(f"\n{args.model}, {args.size} px, batch 1, one thread, median of {args.runs} interleaved runs")
    print("| variant | ms / image | speed vs float32 TFLite | size (MB) | size vs float32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        size = f"{r['size_bytes'] / 1e6:.2f}" if r["size_bytes"] else "n/a"
        ratio = f"{r['size_vs_float32']:.3f}" if r["size_vs_float32"] else "n/a"
        print(f"| {r['variant']} | {r['ms_per_image']:.2f} | {r['speed_vs_float32_tflite']:.2f}x | {size} | {ratio} |")
    int8 = next(r for r in rows if r["variant"] == "int8")
    verdict = {
        "int8_speedup_target_2x_met": int8["speed_vs_float32_tflite"] >= 2.0,
        "int8_size_target_30pct_met": int8["size_vs_float32"] <= 0.30,
    }
    print(
        f"\nint8 vs float32 TFLite: {int8['speed_vs_float32_tflite']:.2f}x faster (target >= 2x: "
        f"{'met' if verdict['int8_speedup_target_2x_met'] else 'NOT met'}), {int8['size_vs_float32']:.1%} of the "
        f"size (target <= 30 %: {'met' if verdict['int8_size_target_30pct_met'] else 'NOT met'})"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "image_size": args.size,
                "runs": args.runs,
                "rows": rows,
                **verdict,
                "tensorflow": tf.__version__,
            },
            indent=1,
        )
    )
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
