"""Full-integer int8 TFLite accuracy against the Keras model, on a validation set large
enough to measure a 0.01 AUROC difference.

    python benchmarks/tflite_accuracy.py [--seeds 1 2 3] [--patients 400] [--epochs 8]

For each seed: synthetic ODIR-layout photographs (``kfundus.data.synthetic.make_odir``,
per-eye labels N / D / G / C as in the demo, a different dataset per seed), ``kfundus
train`` with the shipped ``demo_synthetic`` config at 64 px (EfficientNet-B0 from scratch), then
``kfundus export`` with the float32 and int8 files. Export measures every format on the
run's validation split (``model_card.json`` -> ``accuracy_by_format``); this script reads
the card and prints the macro AUROC of Keras, float32 TFLite and int8 TFLite.

Why a separate benchmark: the test fixture's validation split has 40 eyes, where one
swapped positive/negative pair moves the AUROC by about 0.003 and the int8 gap measured
0.004-0.047 between training runs. Issue 8's target is int8 within 0.01 of float.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kfundus.cli import main as kfundus  # noqa: E402
from kfundus.data.synthetic import make_odir  # noqa: E402


def run_seed(seed: int, out: Path, patients: int, epochs: int) -> dict:
    data = make_odir(out / "data", n_patients=patients, size=96, seed=seed, aspect=1.3, write_masks=False)
    common = [
        "--set",
        f"output_dir={out / 'runs'}",
        "--set",
        f"data.cache_dir={out / 'cache'}",
        "--set",
        f"export.dir={out / 'saved_models'}",
    ]
    code = kfundus(
        [
            "train",
            "--config",
            "demo_synthetic",
            "--data",
            str(data),
            "--no-export",
            *common,
            "--set",
            "data.image_size=64",
            "--set",
            f"train.epochs={epochs}",
            "--set",
            "data.split.val=0.4",
            "--set",
            "data.split.test=0.1",
            "--set",
            f"train.seed={seed}",
            "--set",
            "export.tflite=[float32, int8]",
        ]
    )
    if code:
        raise SystemExit(f"training for seed {seed} failed (exit {code})")
    if kfundus(["export", "--run", str(out / "runs" / "demo_synthetic")]):
        raise SystemExit(f"export for seed {seed} failed")
    card = json.loads((out / "saved_models" / "demo_synthetic" / "model_card.json").read_text())
    return card["accuracy_by_format"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--patients", type=int, default=400, help="synthetic patients per seed (2 eyes each)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default="runs/bench/tflite_accuracy.json")
    args = parser.parse_args(argv)

    rows = {}
    for seed in args.seeds:
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            accuracy = run_seed(seed, Path(tmp), args.patients, args.epochs)
        rows[seed] = {
            "validation_eyes": accuracy["rows"],
            "seconds": round(time.time() - start),
            **{
                name: {
                    "macro_auroc": accuracy[name]["macro_auroc"],
                    "rank_correlation_vs_keras": accuracy[name]["rank_correlation_vs_keras"],
                }
                for name in ("keras", "model.tflite", "model_int8.tflite")
            },
        }
        print(json.dumps({seed: rows[seed]}), flush=True)

    print("\n| seed | validation eyes | Keras macro AUROC | float32 TFLite | int8 TFLite | int8 - Keras |")
    print("|---|---|---|---|---|---|")
    for seed, row in rows.items():
        keras_auroc, int8 = row["keras"]["macro_auroc"], row["model_int8.tflite"]["macro_auroc"]
        print(
            f"| {seed} | {row['validation_eyes']} | {keras_auroc:.4f} | {row['model.tflite']['macro_auroc']:.4f} "
            f"| {int8:.4f} | {int8 - keras_auroc:+.4f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
