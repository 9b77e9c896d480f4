"""``kfundus transfer``: how to transfer a backbone to a binary task, compared by k-fold CV
(the FLAIR study of foundation-model vs ImageNet initialisation).

    kfundus transfer --config hr_transfer [--data DIR] [--set key=value ...] [--out DIR]

For every backbone x protocol x fold:

- ``lp`` (linear probing): the frozen backbone's features (computed once per backbone for
  the whole image set and cached on disk), a logistic regression on the training part
  (``transfer.linear_probe``);
- ``ft`` (fine-tuning): backbone + a fresh linear head, every weight trained as the
  ``train`` section says (AdamW, early stopping on the validation part's AUROC, the best
  epoch kept; the untrained start is never a candidate);
- ``lp_ft``: the head set to the LP solution of that fold (standardisation folded into the
  Dense weights, so the model starts as exactly the LP classifier), then fine-tuned like
  ``ft``; its starting point counts as epoch 0, so it ends at least as good on
  validation as the probe it started from.

Fine-tuning and the Keras linear probe go through the engine (``kfundus.engine.fit``).

Choices where the paper is silent: every protocol of a fold sees the same training rows
(the training folds minus a patient-level, stratified validation share
``data.split.val``); LP does not use the validation part; the feature is the backbone's
pooled output (EfficientNet-B0: global average pooling; CLIP/ViT: the class token after
the final layer norm); the head is one Dense unit with a sigmoid, no dropout; decisions at
probability ``transfer.threshold`` (0.5: the balanced LP puts its boundary there); the
images are decoded once (``kfundus.data.pipeline.prepare``) and held in memory as uint8
for the folds.

Writes ``<out>/folds.csv`` (one row per backbone, protocol and fold), ``summary.csv``,
``summary.md`` (mean ± std over folds), ``comparison.png``, ``histories/*.csv`` (per-epoch
fine-tuning curves, epoch 0 = the start), ``splits.csv`` and ``config.yaml``. Cells
already in ``folds.csv`` are reused when the command is run again (``--overwrite``
recomputes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from kfundus.config import BackboneSpec, Config, LinearProbeConfig, TrainConfig, replace, save_config
from kfundus.config.schema import BACKBONE_FAMILIES, backbone_family
from kfundus.data.cache import default_cache_dir
from kfundus.data.images import Preprocess
from kfundus.data.manifest import Manifest
from kfundus.data.pipeline import augmenter, cache_key
from kfundus.errors import ConfigError, DataError
from kfundus.objectives import MacroAUROC, Objective, balanced_class_weight

METRICS = ("auroc", "kappa", "f1", "sensitivity", "specificity")
PROTOCOL_NAMES = {"lp": "LP", "ft": "FT", "lp_ft": "LP-FT"}


# ---------------------------------------------------------------------------
# data


def load_task(config: Config, data_path=None) -> Manifest:
    """The binary manifest ``data`` names (one label, ``data.labels``; eye rows)."""
    from kfundus.data.readers import load_source, select_labels

    d = config.data
    path = data_path or d.path
    if not path:
        raise ConfigError("no dataset given: pass --data DIR (or set data.path)")
    manifest = load_source(d.source, path, **d.options)
    if manifest.level != "eye":
        raise ConfigError(
            f"data.source={d.source}: transfer works on one image per row; read it at eye level "
            "(e.g. --set 'data.options={level: eye}')"
        )
    if d.labels:
        if len(d.labels) != 1:
            raise ConfigError(
                f"data.labels={d.labels}: the transfer study predicts one binary label; name one "
                f"(e.g. --set 'data.labels=[{d.labels[0]}]')"
            )
        manifest = select_labels(manifest, list(d.labels))
    elif len(manifest.labels) != 1:
        raise ConfigError(
            f"data.labels: the dataset has labels {manifest.labels}; name the one to predict "
            f"(e.g. --set 'data.labels=[{manifest.labels[0]}]')"
        )
    manifest = manifest.with_labels(manifest.labels, task="binary")
    counts = manifest.frame[manifest.labels[0]].value_counts()
    if len(counts) < 2 or counts.min() < config.transfer.folds:
        raise DataError(
            f"label {manifest.labels[0]!r} of {path}: {counts.to_dict()} rows per class; k-fold with "
            f"transfer.folds={config.transfer.folds} needs at least that many of each class"
        )
    return manifest


def load_images(manifest: Manifest, config: Config):
    """Decode every image once (cached on disk by ``prepare``) -> ``(manifest of readable rows,
    uint8 array (n, size, size, 3), preprocessing)``."""
    from kfundus.data.pipeline import make_dataset, prepare

    pre = Preprocess.from_config(config.data)
    prepared = prepare(manifest, pre, cache_dir=config.data.cache_dir, skip_unreadable=config.data.skip_unreadable)
    batches = make_dataset(prepared, batch_size=256, with_targets=False).as_numpy_iterator()
    images = np.concatenate([np.asarray(b).astype(np.uint8) for b in batches])
    return prepared.manifest, images, pre


def make_folds(manifest: Manifest, config: Config) -> list[dict]:
    """Per fold: row indices ``train``, ``val`` (early stopping) and ``test``, patient-level."""
    from kfundus.data.splits import kfold, split_patients

    s = config.data.split
    m = dataclasses.replace(manifest, frame=manifest.frame.assign(_pos=np.arange(len(manifest))))
    m.frame = m.frame.drop(columns=[c for c in ("split",) if c in m.frame])
    folds = []
    for i, (train_part, test_part) in enumerate(kfold(m, config.transfer.folds, seed=s.seed)):
        parts = split_patients(train_part, val=s.val, test=0.0, seed=s.seed + i, use_official=False)
        if "val" not in parts:
            raise DataError(f"fold {i}: too few patients for a validation part of data.split.val={s.val}")
        folds.append(
            {
                "train": parts["train"].frame["_pos"].to_numpy(),
                "val": parts["val"].frame["_pos"].to_numpy(),
                "test": test_part.frame["_pos"].to_numpy(),
            }
        )
    return folds


# ---------------------------------------------------------------------------
# backbones


def build_extractor(spec: BackboneSpec, image_size: int, seed: int = 0) -> keras.Model:
    """Image (float32 RGB in [0, 255]) -> feature vector, for one backbone spec. Random
    weights are seeded by ``seed``, so every call builds the same starting network."""
    from kfundus.systems.clip_lora.encoders import input_normalization, load_encoder, token_pooling
    from kfundus.systems.efficientnet.model import efficientnet_b0_backbone

    keras.utils.set_random_seed(seed)
    family = backbone_family(spec)
    if family is None:
        raise ConfigError(
            f"backbone {spec.name}: family={spec.family!r}; set family to one of " + ", ".join(BACKBONE_FAMILIES)
        )
    inputs = keras.Input((image_size, image_size, 3), name="image")
    if family == "efficientnet_b0":
        if spec.encoder_config:
            raise ConfigError(f"backbone {spec.name}: encoder_config is for clip/vit backbones")
        backbone = efficientnet_b0_backbone(image_size, spec.weights)
        features = keras.layers.GlobalAveragePooling2D(name="features")(backbone(inputs))
    elif family == "flair":  # the pooled ResNet-50 feature (what FLAIR's linear probe reads)
        from kfundus.systems.flair.model import flair_extractor

        extractor = flair_extractor(spec.weights, image_size, resnet_config=spec.encoder_config or None)
        features = extractor(inputs)
    elif family == "retfound":  # RETFound's fine-tuning feature: patch-token mean + fc_norm
        from kfundus.systems.retfound.model import build_retfound_features

        features = build_retfound_features(spec.weights, image_size, encoder_config=spec.encoder_config or None)(inputs)
    else:
        encoder = load_encoder(family, spec.weights, image_size, spec.encoder_config or None)
        normalise = input_normalization(family)
        tokens = encoder({"images": normalise(inputs)})
        features = token_pooling("cls", int(tokens.shape[1]))(tokens)
    return keras.Model(inputs, features, name=f"{spec.name}_features")


def _spec_key(spec: BackboneSpec, seed: int) -> dict:
    key = {**dataclasses.asdict(spec), "seed": seed, "family": backbone_family(spec)}
    if spec.weights and Path(spec.weights).exists():  # a local file/folder: its contents' signature
        files = [Path(spec.weights)] if Path(spec.weights).is_file() else sorted(Path(spec.weights).rglob("*"))
        key["files"] = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    return key


def extract_features(
    spec: BackboneSpec,
    manifest: Manifest,
    images: np.ndarray,
    pre: Preprocess,
    *,
    seed: int = 0,
    cache_dir=None,
    batch_size: int = 64,
) -> np.ndarray:
    """Frozen features of every image, cached as ``<cache>/features/<hash>.npz`` (hash of the
    backbone spec and its weight files, the image set and the preprocessing)."""
    text = json.dumps(
        {
            "spec": _spec_key(spec, seed),
            "images": cache_key(manifest, pre),
            "n": len(images),
            "keras": keras.__version__,
        },
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha1(text.encode()).hexdigest()[:20]
    path = Path(cache_dir or default_cache_dir()) / "features" / f"{spec.name}-{digest}.npz"
    if path.exists():
        with np.load(path) as data:
            return data["features"]
    extractor = build_extractor(spec, images.shape[1], seed)
    print(f"features of {len(images)} images from backbone {spec.name} ...")
    features = extractor.predict(
        images.astype(np.float32), batch_size=batch_size, verbose=1 if sys.stdout.isatty() else 2
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, features=features.astype(np.float32))
    return features.astype(np.float32)


# ---------------------------------------------------------------------------
# linear probe


def fit_linear_probe(features: np.ndarray, y: np.ndarray, lp: LinearProbeConfig) -> tuple[np.ndarray, float]:
    """Logistic regression on standardised features; returns ``(w, b)`` on the *raw*
    features (the scaler folded in: ``w = coef / scale``, ``b = intercept - w . mean``),
    so ``sigmoid(x @ w + b)`` is the probe and a Dense layer can hold it exactly."""
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y).astype(int).ravel()
    scaler = StandardScaler().fit(features)
    z = scaler.transform(features)
    if lp.solver == "sklearn":
        from sklearn.linear_model import LogisticRegression

        probe = LogisticRegression(C=lp.C, class_weight="balanced", max_iter=lp.max_iter).fit(z, y)
        coef, intercept = probe.coef_[0], float(probe.intercept_[0])
    else:
        coef, intercept = _keras_probe(z.astype(np.float32), y, lp)
    w = coef / scaler.scale_
    return w.astype(np.float32), float(intercept - np.dot(w, scaler.mean_))


def _keras_probe(z: np.ndarray, y: np.ndarray, lp: LinearProbeConfig) -> tuple[np.ndarray, float]:
    """The same objective in Keras, through the engine: mean balanced log-loss + ||w||^2 /
    (2 C n), ``lp.epochs`` full-batch Adam steps (one engine epoch: no per-epoch overhead)."""
    import tensorflow as tf

    from kfundus.engine import fit

    weights = balanced_class_weight(y)
    mean_weight = np.mean([weights[int(v)] for v in y])
    objective = Objective(
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[],
        class_weight={k: v / mean_weight for k, v in weights.items()},
    )
    full_batch = tf.data.Dataset.from_tensors((z, y.astype(np.float32)[:, None])).repeat(lp.epochs)
    train = TrainConfig(
        epochs=1,
        batch_size=len(y),
        optimizer="adam",
        learning_rate=lp.learning_rate,
        schedule="constant",
        monitor="loss",
        checkpoint="last",
    )

    def build():
        return keras.Sequential(
            [
                keras.Input((z.shape[1],)),
                keras.layers.Dense(
                    1, kernel_initializer="zeros", kernel_regularizer=keras.regularizers.L2(1.0 / (2 * lp.C * len(y)))
                ),
            ]
        )

    head = fit(build, objective, full_batch, None, train, steps_per_epoch=lp.epochs).model
    kernel, bias = head.layers[-1].get_weights()
    return kernel[:, 0], float(bias[0])


def probe_predict(features: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(features.astype(np.float64) @ w + b)))


# ---------------------------------------------------------------------------
# fine-tuning


def build_classifier(extractor: keras.Model, head=None) -> keras.Model:
    """Extractor + Dense(1) ``logits`` + sigmoid ``probabilities``; ``head=(w, b)`` sets the
    Dense weights (LP-FT), else Keras' default initialisation."""
    logits = keras.layers.Dense(1, name="logits", dtype="float32")(extractor.output)
    outputs = keras.layers.Activation("sigmoid", name="probabilities", dtype="float32")(logits)
    model = keras.Model(extractor.input, outputs, name=extractor.name.replace("_features", "_classifier"))
    if head is not None:
        w, b = head
        model.get_layer("logits").set_weights([np.asarray(w, np.float32).reshape(-1, 1), np.array([b], np.float32)])
    return model


def _dataset(images, y, batch_size, *, training=False, augment=None, seed=0):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images, y.astype(np.float32).reshape(-1, 1)))
    if training:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    aug = augmenter(augment, seed) if (training and augment is not None) else None

    def cast(x, t):
        x = tf.cast(x, tf.float32)
        if aug is not None:
            x = tf.clip_by_value(aug(x, training=True), 0.0, 255.0)
        return x, t

    return ds.batch(batch_size).map(cast, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


class _StartScore(keras.callbacks.Callback):
    """Records the exact (scikit-learn) validation AUROC of the weights a fit starts from."""

    def __init__(self, images, y, batch_size):
        super().__init__()
        self.images, self.y, self.batch_size, self.auroc = images, y, batch_size, None

    def on_train_begin(self, logs=None):
        from sklearn.metrics import roc_auc_score

        probs = self.model.predict(self.images.astype(np.float32), batch_size=self.batch_size, verbose=0).ravel()
        self.auroc = float(roc_auc_score(self.y, probs))


def fine_tune(
    build,
    images: np.ndarray,
    y: np.ndarray,
    train_idx,
    val_idx,
    config: Config,
    *,
    start_is_candidate: bool,
    seed: int = 0,
):
    """Train every weight of the model ``build()`` makes, as the ``train`` section says
    (AdamW, class-balanced BCE, early stopping on validation AUROC with the best weights
    kept). Returns ``(model, history table with epoch 0 = the start, best epoch, exact
    validation AUROC of the start)``."""
    from kfundus.engine import fit

    t = config.train
    objective = Objective(
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[MacroAUROC(1)],
        class_weight=balanced_class_weight(y[train_idx]) if t.class_weight == "balanced" else None,
    )
    train_ds = _dataset(
        images[train_idx], y[train_idx], t.batch_size, training=True, augment=config.data.augment, seed=seed
    )
    val_ds = _dataset(images[val_idx], y[val_idx], t.batch_size)
    start_score = _StartScore(images[val_idx], y[val_idx], t.batch_size)
    with tempfile.TemporaryDirectory(prefix="kfundus-ft-") as run_dir:
        result = fit(
            build,
            objective,
            train_ds,
            val_ds,
            t,
            run_dir=run_dir,
            distribution=config.distribution,
            train_rows=len(train_idx),
            val_rows=len(val_idx),
            start_is_candidate=start_is_candidate,
            evaluate_start=True,
            callbacks=[start_score],
            backup=False,
            tensorboard=False,
        )
    history = result.history.copy()
    first = {"epoch": 0, "val_loss": result.start["val_loss"], "val_auroc": result.start["val_auroc"]}
    history = pd.concat([pd.DataFrame([first]), history], ignore_index=True)
    return result.model, history, result.best_epoch, start_score.auroc


# ---------------------------------------------------------------------------
# the study


def fold_metrics(y_true, y_prob, threshold) -> dict:
    from kfundus.metrics import binary_report

    report = binary_report(np.asarray(y_true), np.asarray(y_prob), threshold=threshold)
    return {k: float(report[k]) for k in METRICS}


def run_cell(spec, protocol, fold, i, y, images, features, config: Config, histories: Path) -> dict:
    """One backbone x protocol x fold: fit on ``fold["train"]``, select on ``fold["val"]``,
    score ``fold["test"]``."""
    from sklearn.metrics import roc_auc_score

    tr, va, te = fold["train"], fold["val"], fold["test"]
    start = time.time()
    row = {
        "backbone": spec.name,
        "protocol": protocol,
        "fold": i,
        "n_train": len(tr),
        "n_val": len(va),
        "n_test": len(te),
    }
    head = None
    seed = config.data.split.seed
    if protocol in ("lp", "lp_ft"):
        head = fit_linear_probe(features[tr], y[tr], config.transfer.linear_probe)
        row["lp_val_auroc"] = float(roc_auc_score(y[va], probe_predict(features[va], *head)))
    if protocol == "lp":
        probs = probe_predict(features[te], *head)
        row["val_auroc"] = row["lp_val_auroc"]
    else:
        model, history, best_epoch, initial = fine_tune(
            lambda: build_classifier(build_extractor(spec, config.data.image_size, seed), head),
            images,
            y,
            tr,
            va,
            config,
            start_is_candidate=protocol == "lp_ft",
            seed=seed + i,
        )
        history.to_csv(histories / f"{spec.name}_{protocol}_fold{i}.csv", index=False)
        batch = config.train.batch_size
        probs = model.predict(images[te].astype(np.float32), batch_size=batch, verbose=0).ravel()
        row["val_auroc"] = float(
            roc_auc_score(y[va], model.predict(images[va].astype(np.float32), batch_size=batch, verbose=0).ravel())
        )
        row.update(initial_val_auroc=initial, best_epoch=best_epoch, epochs_run=int(len(history) - 1))
        keras.backend.clear_session()
    row.update(fold_metrics(y[te], probs, config.transfer.threshold))
    row["seconds"] = round(time.time() - start, 1)
    return row


def summarize(folds: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation (ddof 1) over folds per backbone x protocol."""
    rows = []
    for (backbone, protocol), part in folds.groupby(["backbone", "protocol"], sort=False):
        row = {"backbone": backbone, "protocol": protocol, "folds": len(part)}
        for m in METRICS:
            row[f"{m}_mean"] = float(part[m].mean())
            row[f"{m}_std"] = float(part[m].std(ddof=1)) if len(part) > 1 else 0.0
        row["seconds"] = float(part["seconds"].sum())
        rows.append(row)
    return pd.DataFrame(rows)


def summary_markdown(summary: pd.DataFrame) -> str:
    from kfundus.evaluation.report import markdown_table

    table = pd.DataFrame(
        {
            "backbone": summary["backbone"],
            "protocol": summary["protocol"].map(PROTOCOL_NAMES).fillna(summary["protocol"]),
            **{m: [f"{a:.3f} ± {s:.3f}" for a, s in zip(summary[f"{m}_mean"], summary[f"{m}_std"])] for m in METRICS},
            "folds": summary["folds"].astype(str),
            "time (s)": summary["seconds"].round(0).astype(int).astype(str),
        }
    )
    return markdown_table(table)


def write_outputs(folds: pd.DataFrame, out: Path, config: Config, label: str) -> pd.DataFrame:
    from kfundus.evaluation.plots import plot_protocol_comparison

    folds.to_csv(out / "folds.csv", index=False)
    summary = summarize(folds)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(
        f"# Transfer: {config.name}, label {label}, {config.transfer.folds}-fold CV (patient-level)\n\n"
        f"{summary_markdown(summary)}\n\nmean ± std over folds; decisions at probability "
        f"{config.transfer.threshold}. LP: logistic regression on frozen features; FT: full fine-tuning; "
        "LP-FT: FT from the LP head.\n"
    )
    plot_protocol_comparison(summary, METRICS, out / "comparison.png", PROTOCOL_NAMES)
    return summary


def run_transfer(config: Config, data_path=None, out=None, overwrite=False) -> pd.DataFrame:
    """Run the whole comparison; returns the summary table (also written under ``out``)."""
    from tqdm.auto import tqdm

    out = Path(out or Path(config.output_dir) / config.name)
    (out / "histories").mkdir(parents=True, exist_ok=True)
    if data_path:
        config = replace(config, data={"path": str(data_path)})
    manifest, images, pre = load_images(load_task(config), config)
    save_config(config, out / "config.yaml")
    label = manifest.labels[0]
    y = manifest.frame[label].to_numpy().astype(int)
    folds = make_folds(manifest, config)
    pd.concat([manifest.frame.iloc[f["test"]].assign(test_fold=i) for i, f in enumerate(folds)]).to_csv(
        out / "splits.csv", index=False
    )
    backbones = config.transfer.backbones
    print(
        f"{len(manifest)} images, {int(y.sum())} positive ({label}); {config.transfer.folds} folds; "
        f"backbones {[b.name for b in backbones]}; protocols {config.transfer.protocols}"
    )
    done = pd.DataFrame()
    if (out / "folds.csv").exists() and not overwrite:
        done = pd.read_csv(out / "folds.csv")
    rows = done.to_dict("records")
    key = {(r["backbone"], r["protocol"], int(r["fold"])) for r in rows}
    cells = [(s, p, i) for s in backbones for p in config.transfer.protocols for i in range(len(folds))]
    features = {}
    for spec, protocol, i in tqdm(cells, desc="transfer cells", unit="cell"):
        if (spec.name, protocol, i) in key:
            continue
        if spec.name not in features and protocol in ("lp", "lp_ft"):
            features[spec.name] = extract_features(
                spec,
                manifest,
                images,
                pre,
                seed=config.data.split.seed,
                cache_dir=config.data.cache_dir,
                batch_size=config.transfer.feature_batch_size,
            )
        rows.append(
            run_cell(spec, protocol, folds[i], i, y, images, features.get(spec.name), config, out / "histories")
        )
        write_outputs(pd.DataFrame(rows), out, config, label)  # partial results survive an interruption
    summary = write_outputs(pd.DataFrame(rows), out, config, label)
    print(f"\n{out / 'summary.md'}\n{summary_markdown(summary)}")
    return summary
