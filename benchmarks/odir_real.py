"""Real-data check: kfundus vs a plain Keras baseline on ODIR per-eye normal/glaucoma/cataract.

Both train EfficientNet-B0 from scratch (no pretrained weights can be fetched here) for
the same epochs at the same image size, on the same patient-level split (kfundus'
``split_patients``: no patient's eyes in two splits), and are scored the same way:
per-class and macro AUROC on the held-out test patients, computed with scikit-learn.

- baseline: ``read_file -> decode_jpeg -> resize -> EfficientNetB0 -> BCE``, Adam at a
  constant learning rate, the last epoch's model — what a Keras tutorial does;
- kfundus: ``python train.py --config odir_efficientnet_b0`` with
  ``data.labels=[N, G, C]``, ``model.weights=null`` (fundus crop, augmentation, cosine
  schedule with warm-up, best-validation-AUROC checkpoint), then ``evaluate.py``.

    python benchmarks/odir_real.py [--data ../shared/data/odir-sample] [--size 128] [--epochs 15]
    python benchmarks/odir_real.py --only baseline --baseline-seed 1   # another baseline run
    python benchmarks/odir_real.py --only kfundus --set train.seed=1 --set train.ema=0.99 ...
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

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from kfundus.config import load_config
from kfundus.data.readers import load_dataset
from kfundus.evaluation import evaluate_run
from kfundus.workflows.supervised import make_splits, train

REPO = Path(__file__).resolve().parents[1]
LABELS = ["N", "G", "C"]


def plain_dataset(frame, size, batch, shuffle, seed=0):
    def load(path, y):
        image = tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(path), channels=3), (size, size))
        return image, y

    ds = tf.data.Dataset.from_tensor_slices((frame["image"].to_numpy(), frame[LABELS].to_numpy("float32")))
    if shuffle:
        ds = ds.shuffle(len(frame), seed=seed)
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(tf.data.AUTOTUNE)


def run_baseline(splits, size, epochs, batch, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    base = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(size, size, 3))
    outputs = keras.layers.Dense(len(LABELS), activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(base(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    model.fit(plain_dataset(splits["train"].frame, size, batch, True, seed), epochs=epochs, verbose=2)
    scores = {}
    for split in ("val", "test"):  # the last epoch's model; validation scored for reference only
        frame = splits[split].frame
        y_prob = np.asarray(model.predict(plain_dataset(frame, size, batch, False), verbose=0))
        scores[split] = aurocs(frame[LABELS].to_numpy(), y_prob)
    return scores


def aurocs(y_true, y_prob):
    per = {label: float(roc_auc_score(y_true[:, i], y_prob[:, i])) for i, label in enumerate(LABELS)}
    return per, float(np.mean(list(per.values())))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "odir-sample"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=None, help="folder for the kfundus run (default: a temporary one)")
    parser.add_argument("--only", choices=["kfundus", "baseline"], help="run one side only")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="extra kfundus config override (repeatable), e.g. data.augment.rotation=10",
    )
    parser.add_argument("--name", default="kfundus", help="row name for the kfundus run")
    parser.add_argument(
        "--baseline-seed",
        type=int,
        default=0,
        help="the baseline's initial weights and data order (kfundus: --set train.seed=K)",
    )
    parser.add_argument(
        "--full-decode",
        action="store_true",
        help="kfundus decodes JPEGs at full size (no DCT-domain scaling), the rest unchanged",
    )
    args = parser.parse_args(argv)
    if args.full_decode:  # an experiment switch, not a pipeline option: its own cache folder below
        import kfundus.data.images

        kfundus.data.images.JPEG_RATIOS = (1,)
    if not Path(args.data).exists():
        print(f"{args.data} is absent: this benchmark needs ../shared/data/odir-sample")
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="kfundus-odir-"))
    overrides = [
        f"data.labels=[{', '.join(LABELS)}]",
        "model.weights=null",
        "model.trainable_blocks=-1",
        f"data.image_size={args.size}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        "train.early_stopping=0",
        f"output_dir={out}",
        f"data.cache_dir={out / ('cache-full-decode' if args.full_decode else 'cache')}",
        *args.overrides,
    ]
    config = load_config("odir_efficientnet_b0", overrides)
    splits = make_splits(load_dataset(config.data, args.data), config)
    results = {}
    if args.only != "kfundus":
        start = time.time()
        scores = run_baseline(splits, args.size, args.epochs, args.batch_size, args.baseline_seed)
        results["plain Keras baseline"] = {
            "per_class": scores["test"][0],
            "macro_auroc": scores["test"][1],
            "val_macro_auroc": scores["val"][1],
            "seconds": time.time() - start,
        }
    if args.only != "baseline":
        start = time.time()
        run_dir = train(config, args.data)
        seconds = time.time() - start
        scores = {}
        for split in ("val", "test"):  # validation picks between kfundus settings, never test
            evaluate_run(run_dir, split=split, gallery=False)
            predictions = pd.read_csv(run_dir / f"eval-{split}" / "predictions.csv")
            y_true = predictions[[f"true_{c}" for c in LABELS]].to_numpy()
            y_prob = predictions[[f"prob_{c}" for c in LABELS]].to_numpy()
            scores[split] = aurocs(y_true, y_prob)
        results[args.name] = {
            "per_class": scores["test"][0],
            "macro_auroc": scores["test"][1],
            "val_macro_auroc": scores["val"][1],
            "seconds": seconds,
            "run": str(run_dir),
            "overrides": args.overrides,
        }
    test = splits["test"].frame
    print(
        f"\nODIR sample, per-eye labels from keywords, {len(test)} test eyes of "
        f"{test['patient_id'].nunique()} held-out patients; {args.size} px, {args.epochs} epochs, from scratch"
    )
    print(
        "| pipeline | "
        + " | ".join(f"test AUROC {c}" for c in LABELS)
        + " | test macro AUROC | val macro AUROC | time (s) |"
    )
    print("|---|" + "---|" * (len(LABELS) + 3))
    for name, r in results.items():
        cells = " | ".join(f"{r['per_class'][c]:.3f}" for c in LABELS)
        val = f"{r['val_macro_auroc']:.3f}"
        print(f"| {name} | {cells} | {r['macro_auroc']:.3f} | {val} | {r['seconds']:.0f} |")
    out.mkdir(parents=True, exist_ok=True)  # --only baseline creates no run folder
    name = args.name if args.only != "baseline" else f"baseline_seed{args.baseline_seed}"
    (out / f"odir_real_{name}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
