"""``kfundus transfer``: how to transfer a backbone to a binary task, compared by k-fold CV
(FLAIR's study, SPECS.md section 5).

    kfundus transfer --config configs/hr_transfer.yaml [--data DIR] [--set key=value ...] [--out DIR]

For every backbone x protocol x fold:

- ``lp`` (linear probing): the frozen backbone's features (computed once per backbone for
  the whole image set and cached on disk), a logistic regression on the training part
  (``lp`` options, see ``kfundus.transfer_config.LPConfig``);
- ``ft`` (fine-tuning): backbone + a fresh linear head, every weight trained (AdamW, early
  stopping on the validation part's AUROC, the best epoch kept);
- ``lp_ft``: the head set to the LP solution of that fold (standardisation folded into the
  Dense weights, so the model starts as exactly the LP classifier), then fine-tuned like
  ``ft``; its starting point counts as epoch 0, so it ends at least as good on
  validation as the probe it started from.

Choices where the paper is silent: every protocol of a fold sees the same training rows
(the training folds minus a patient-level, stratified validation share ``cv.val``); LP
does not use the validation part; the feature is the backbone's pooled output
(EfficientNet-B0: global average pooling; CLIP/ViT: the class token after the final layer
norm, ``clip_lora.token_pooling("cls")``); the head is one Dense unit with a sigmoid, no
dropout; decisions at probability ``threshold`` (0.5: the balanced LP puts its boundary
there); the images are decoded once (``kfundus.data.pipeline.prepare``) and held in
memory as uint8 for the folds.

Writes ``<out>/folds.csv`` (one row per backbone, protocol and fold), ``summary.csv``,
``summary.md`` (mean ± std over folds), ``comparison.png``, ``histories/*.csv`` (per-epoch
fine-tuning curves, epoch 0 = the start) and ``config.yaml``. Cells already in
``folds.csv`` are reused when the command is run again (``--overwrite`` recomputes).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import yaml

from kfundus.data.manifest import Manifest
from kfundus.data.pipeline import Preprocess, augmenter, default_cache_dir, cache_key
from kfundus.errors import ConfigError, DataError, KfundusError
from kfundus.transfer_config import BackboneSpec, TransferConfig, config_dict, load_transfer_config

METRICS = ("auroc", "kappa", "f1", "sensitivity", "specificity")
PROTOCOL_NAMES = {"lp": "LP", "ft": "FT", "lp_ft": "LP-FT"}


# ---------------------------------------------------------------------------
# data


def load_task(config: TransferConfig, data_path=None) -> Manifest:
    """The binary manifest ``config.data`` names (one label; eye rows)."""
    from kfundus.data.sources import load_source, select_labels

    d = config.data
    path = data_path or d.path
    if not path:
        raise ConfigError("no dataset given: pass --data DIR or set data.path")
    manifest = load_source(d.source, path, **d.options)
    if manifest.level != "eye":
        raise ConfigError(f"data.source={d.source}: transfer works on one image per row; read it at eye level "
                          "(e.g. data.options.level=eye)")
    if d.label:
        manifest = select_labels(manifest, [d.label])
    elif len(manifest.labels) != 1:
        raise ConfigError(f"data.label: the dataset has labels {manifest.labels}; name the one to predict "
                          f"(e.g. --set data.label={manifest.labels[0]})")
    manifest = manifest.with_labels(manifest.labels, task="binary")
    counts = manifest.frame[manifest.labels[0]].value_counts()
    if len(counts) < 2 or counts.min() < config.cv.k:
        raise DataError(f"label {manifest.labels[0]!r} of {path}: {counts.to_dict()} rows per class; k-fold with "
                        f"k={config.cv.k} needs at least k of each class")
    return manifest


def load_images(manifest: Manifest, config: TransferConfig):
    """Decode every image once (cached on disk by ``prepare``) -> ``(manifest of readable rows,
    uint8 array (n, size, size, 3))``."""
    from kfundus.data.pipeline import make_dataset, prepare

    pre = Preprocess(image_size=config.data.image_size, crop_fundus=config.data.crop_fundus)
    prepared = prepare(manifest, pre, cache_dir=config.data.cache_dir, skip_unreadable=config.data.skip_unreadable)
    batches = make_dataset(prepared, batch_size=256, with_targets=False).as_numpy_iterator()
    images = np.concatenate([np.asarray(b).astype(np.uint8) for b in batches])
    return prepared.manifest, images, pre


def make_folds(manifest: Manifest, config: TransferConfig) -> list[dict]:
    """Per fold: row indices ``train``, ``val`` (early stopping) and ``test``, patient-level."""
    from kfundus.data.splits import kfold, split_patients

    m = dataclasses.replace(manifest, frame=manifest.frame.assign(_pos=np.arange(len(manifest))))
    m.frame = m.frame.drop(columns=[c for c in ("split",) if c in m.frame])
    folds = []
    for i, (train_part, test_part) in enumerate(kfold(m, config.cv.k, seed=config.cv.seed)):
        parts = split_patients(train_part, val=config.cv.val, test=0.0, seed=config.cv.seed + i, use_official=False)
        if "val" not in parts:
            raise DataError(f"fold {i}: too few patients for a validation part of {config.cv.val}")
        folds.append({"train": parts["train"].frame["_pos"].to_numpy(), "val": parts["val"].frame["_pos"].to_numpy(),
                      "test": test_part.frame["_pos"].to_numpy()})
    return folds


# ---------------------------------------------------------------------------
# backbones


def build_extractor(spec: BackboneSpec, image_size: int, seed: int = 0) -> keras.Model:
    """Image (float32 RGB in [0, 255]) -> feature vector, for one backbone spec. Random
    weights are seeded by ``seed``, so every call builds the same starting network."""
    from kfundus.models.clip_lora import input_normalization, load_encoder, token_pooling
    from kfundus.models.efficientnet import efficientnet_b0_backbone

    keras.utils.set_random_seed(seed)
    family = spec.resolved_family()
    inputs = keras.Input((image_size, image_size, 3), name="image")
    if family == "efficientnet_b0":
        if spec.encoder_config:
            raise ConfigError(f"backbone {spec.name}: encoder_config is for clip/vit backbones")
        backbone = efficientnet_b0_backbone(image_size, spec.weights)
        features = keras.layers.GlobalAveragePooling2D(name="features")(backbone(inputs))
    else:
        encoder = load_encoder(family, spec.weights, image_size, spec.encoder_config or None)
        normalise = input_normalization(family)
        tokens = encoder({"images": normalise(inputs)})
        features = token_pooling("cls", int(tokens.shape[1]))(tokens)
    return keras.Model(inputs, features, name=f"{spec.name}_features")


def _spec_key(spec: BackboneSpec, seed: int) -> dict:
    key = {**dataclasses.asdict(spec), "seed": seed, "family": spec.resolved_family()}
    if spec.weights and Path(spec.weights).exists():  # a local file/folder: its contents' signature
        files = [Path(spec.weights)] if Path(spec.weights).is_file() else sorted(Path(spec.weights).rglob("*"))
        key["files"] = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    return key


def extract_features(spec: BackboneSpec, manifest: Manifest, images: np.ndarray, pre: Preprocess, *,
                     seed: int = 0, cache_dir=None, batch_size: int = 64) -> np.ndarray:
    """Frozen features of every image, cached as ``<cache>/features/<hash>.npz`` (hash of the
    backbone spec and its weight files, the image set and the preprocessing)."""
    text = json.dumps({"spec": _spec_key(spec, seed), "images": cache_key(manifest, pre), "n": len(images),
                       "keras": keras.__version__}, sort_keys=True, default=str)
    digest = hashlib.sha1(text.encode()).hexdigest()[:20]
    path = Path(cache_dir or default_cache_dir()) / "features" / f"{spec.name}-{digest}.npz"
    if path.exists():
        with np.load(path) as data:
            return data["features"]
    extractor = build_extractor(spec, images.shape[1], seed)
    print(f"features of {len(images)} images from backbone {spec.name} ...")
    features = extractor.predict(images.astype(np.float32), batch_size=batch_size, verbose=1 if sys.stdout.isatty() else 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, features=features.astype(np.float32))
    return features.astype(np.float32)


# ---------------------------------------------------------------------------
# linear probe


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """Per-sample weights ``n / (2 n_class)`` (scikit-learn's ``class_weight="balanced"``)."""
    y = np.asarray(y).astype(int).ravel()
    counts = np.bincount(y, minlength=2).astype(float)
    return (len(y) / (2.0 * np.maximum(counts, 1)))[y]


def fit_linear_probe(features: np.ndarray, y: np.ndarray, lp) -> tuple[np.ndarray, float]:
    """Logistic regression on standardised features; returns ``(w, b)`` on the *raw*
    features (the scaler folded in: ``w = coef / scale``, ``b = intercept - w . mean``),
    so ``sigmoid(x @ w + b)`` is the probe and a Dense layer can hold it exactly."""
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y).astype(int).ravel()
    scaler = StandardScaler().fit(features)
    z = scaler.transform(features)
    if lp.solver == "sklearn":
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=lp.C, class_weight="balanced", max_iter=lp.max_iter)
        model.fit(z, y)
        coef, intercept = model.coef_[0], float(model.intercept_[0])
    else:  # the same objective in Keras: mean weighted log-loss + ||w||^2 / (2 C n)
        head = keras.Sequential([keras.Input((z.shape[1],)), keras.layers.Dense(
            1, kernel_initializer="zeros", kernel_regularizer=keras.regularizers.L2(1.0 / (2 * lp.C * len(y))))])
        head.compile(optimizer=keras.optimizers.Adam(lp.learning_rate),
                     loss=keras.losses.BinaryCrossentropy(from_logits=True))
        import tensorflow as tf

        w = balanced_weights(y)
        full_batch = (z.astype(np.float32), y.astype(np.float32)[:, None], (w / w.mean()).astype(np.float32))
        # full-batch gradient steps, one Keras epoch (no per-epoch overhead)
        head.fit(tf.data.Dataset.from_tensors(full_batch).repeat(lp.epochs), epochs=1, verbose=0)
        kernel, bias = head.layers[-1].get_weights()
        coef, intercept = kernel[:, 0], float(bias[0])
    w = coef / scaler.scale_
    return w.astype(np.float32), float(intercept - np.dot(w, scaler.mean_))


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


class KeepBest(keras.callbacks.Callback):
    """Early stopping on ``monitor`` (higher is better) that keeps the best weights, counting
    the weights fit starts from as epoch 0 with score ``initial`` (so LP-FT never ends below
    the probe it started from on validation)."""

    def __init__(self, monitor: str, patience: int, initial: float):
        super().__init__()
        self.monitor, self.patience, self.initial = monitor, patience, initial

    def on_train_begin(self, logs=None):
        self.best, self.best_epoch, self.wait = self.initial, 0, 0
        self.best_weights = self.model.get_weights()

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise ConfigError(f"fine-tuning monitor {self.monitor} is not in the logs {sorted(logs or {})}")
        if value > self.best:
            self.best, self.best_epoch, self.wait = float(value), epoch + 1, 0
            self.best_weights = self.model.get_weights()
        else:
            self.wait += 1
            if self.patience and self.wait >= self.patience:
                self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.model.set_weights(self.best_weights)


def _dataset(images, y, weights, batch_size, *, training=False, augment=None, seed=0):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images, y.astype(np.float32).reshape(-1, 1),
                                             weights.astype(np.float32)))
    if training:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    aug = augmenter(augment, seed) if (training and augment is not None) else None

    def cast(x, t, w):
        x = tf.cast(x, tf.float32)
        if aug is not None:
            x = tf.clip_by_value(aug(x, training=True), 0.0, 255.0)
        return x, t, w

    return ds.batch(batch_size).map(cast, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def fine_tune(model: keras.Model, images: np.ndarray, y: np.ndarray, train_idx, val_idx, ft, *, augment=None,
              seed=0):
    """Train every weight of ``model`` (AdamW, class-balanced BCE, early stopping on validation
    AUROC with the best weights kept). Returns the history table, epoch 0 = the start."""
    from sklearn.metrics import roc_auc_score

    from kfundus.training import _quiet

    model.trainable = True
    model.compile(optimizer=keras.optimizers.AdamW(ft.learning_rate, weight_decay=ft.weight_decay),
                  loss=keras.losses.BinaryCrossentropy(), metrics=[keras.metrics.AUC(name="auroc")])
    w_train = balanced_weights(y[train_idx]) if ft.balanced else np.ones(len(train_idx))
    w_val = balanced_weights(y[val_idx]) if ft.balanced else np.ones(len(val_idx))
    train_ds = _dataset(images[train_idx], y[train_idx], w_train, ft.batch_size, training=True, augment=augment,
                        seed=seed)
    val_ds = _dataset(images[val_idx], y[val_idx], w_val, ft.batch_size)
    warnings.filterwarnings("ignore", message=".*shuffle=True.*was passed")  # the dataset shuffles itself
    start = model.evaluate(val_ds, verbose=0, return_dict=True)
    initial_probs = model.predict(images[val_idx].astype(np.float32), batch_size=ft.batch_size, verbose=0).ravel()
    keep = KeepBest("val_auroc", ft.patience, float(start["auroc"]))
    history = model.fit(train_ds, validation_data=val_ds, epochs=ft.epochs, callbacks=[keep],
                        verbose=2 if _quiet() else 1)
    table = pd.DataFrame(history.history)
    table.insert(0, "epoch", np.arange(1, len(table) + 1))
    first = {"epoch": 0, "val_loss": start["loss"], "val_auroc": start["auroc"]}
    table = pd.concat([pd.DataFrame([first]), table], ignore_index=True)
    table.attrs.update(best_epoch=keep.best_epoch, initial_val_auroc_sklearn=float(
        roc_auc_score(y[val_idx], initial_probs)), initial_val_probs=initial_probs)
    return table


# ---------------------------------------------------------------------------
# the study


def fold_metrics(y_true, y_prob, threshold) -> dict:
    from kfundus.metrics import binary_report

    report = binary_report(np.asarray(y_true), np.asarray(y_prob), threshold=threshold)
    return {k: float(report[k]) for k in METRICS}


def run_cell(spec, protocol, fold, i, y, images, features, config, histories: Path) -> dict:
    """One backbone x protocol x fold: fit on ``fold["train"]``, select on ``fold["val"]``,
    score ``fold["test"]``."""
    from sklearn.metrics import roc_auc_score

    tr, va, te = fold["train"], fold["val"], fold["test"]
    start = time.time()
    row = {"backbone": spec.name, "protocol": protocol, "fold": i, "n_train": len(tr), "n_val": len(va),
           "n_test": len(te)}
    head = None
    if protocol in ("lp", "lp_ft"):
        head = fit_linear_probe(features[tr], y[tr], config.lp)
        row["lp_val_auroc"] = float(roc_auc_score(y[va], probe_predict(features[va], *head)))
    if protocol == "lp":
        probs = probe_predict(features[te], *head)
        row["val_auroc"] = row["lp_val_auroc"]
    else:
        from kfundus.distribute import strategy_scope

        with strategy_scope(config.distribution):  # model, optimizer and metrics in the strategy
            model = build_classifier(build_extractor(spec, config.data.image_size, config.cv.seed), head)
            history = fine_tune(model, images, y, tr, va, config.ft, augment=config.data.augment,
                                seed=config.cv.seed + i)
        history.to_csv(histories / f"{spec.name}_{protocol}_fold{i}.csv", index=False)
        probs = model.predict(images[te].astype(np.float32), batch_size=config.ft.batch_size, verbose=0).ravel()
        row["val_auroc"] = float(roc_auc_score(y[va], model.predict(
            images[va].astype(np.float32), batch_size=config.ft.batch_size, verbose=0).ravel()))
        row.update(initial_val_auroc=history.attrs["initial_val_auroc_sklearn"],
                   best_epoch=history.attrs["best_epoch"], epochs_run=int(len(history) - 1))
        keras.backend.clear_session()
    row.update(fold_metrics(y[te], probs, config.threshold))
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
    from kfundus.sweep import markdown_table

    table = pd.DataFrame({"backbone": summary["backbone"],
                          "protocol": summary["protocol"].map(PROTOCOL_NAMES).fillna(summary["protocol"]),
                          **{m: [f"{a:.3f} ± {s:.3f}" for a, s in zip(summary[f"{m}_mean"], summary[f"{m}_std"])]
                             for m in METRICS},
                          "folds": summary["folds"].astype(str), "time (s)": summary["seconds"].round(0).astype(int).astype(str)})
    return markdown_table(table)


def plot_comparison(summary: pd.DataFrame, path) -> Path:
    """One panel per metric: mean ± std over folds, backbones on x, one marker per protocol."""
    from kfundus.plots import _new_figure, _save

    fig = _new_figure(3.2 * len(METRICS), 3.4)
    backbones = list(dict.fromkeys(summary["backbone"]))
    protocols = list(dict.fromkeys(summary["protocol"]))
    for j, metric in enumerate(METRICS):
        ax = fig.add_subplot(1, len(METRICS), j + 1)
        for k, protocol in enumerate(protocols):
            part = summary[summary["protocol"] == protocol].set_index("backbone").reindex(backbones)
            x = np.arange(len(backbones)) + (k - (len(protocols) - 1) / 2) * 0.18
            ax.errorbar(x, part[f"{metric}_mean"], yerr=part[f"{metric}_std"], fmt="o", capsize=3,
                        color=f"C{k}", label=PROTOCOL_NAMES.get(protocol, protocol))
        ax.set_xticks(range(len(backbones)), backbones, rotation=20, fontsize=8)
        ax.set_xlim(-0.6, len(backbones) - 0.4)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
        if j == 0:
            ax.legend(fontsize="small")
    fig.suptitle("transfer protocols: mean ± std over folds", y=1.04)
    return _save(fig, path)


def write_outputs(folds: pd.DataFrame, out: Path, config: TransferConfig, label: str) -> pd.DataFrame:
    folds.to_csv(out / "folds.csv", index=False)
    summary = summarize(folds)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(
        f"# Transfer: {config.name}, label {label}, {config.cv.k}-fold CV (patient-level)\n\n"
        f"{summary_markdown(summary)}\n\nmean ± std over folds; decisions at probability {config.threshold}. "
        "LP: logistic regression on frozen features; FT: full fine-tuning; LP-FT: FT from the LP head.\n")
    plot_comparison(summary, out / "comparison.png")
    return summary


def run_transfer(config: TransferConfig, data_path=None, out=None, overwrite=False) -> pd.DataFrame:
    """Run the whole comparison; returns the summary table (also written under ``out``)."""
    from tqdm.auto import tqdm

    out = Path(out or Path(config.output_dir) / config.name)
    (out / "histories").mkdir(parents=True, exist_ok=True)
    if data_path:
        config.data.path = str(data_path)
    (out / "config.yaml").write_text(yaml.safe_dump(config_dict(config), sort_keys=False))
    manifest, images, pre = load_images(load_task(config, data_path), config)
    label = manifest.labels[0]
    y = manifest.frame[label].to_numpy().astype(int)
    folds = make_folds(manifest, config)
    pd.concat([manifest.frame.iloc[f["test"]].assign(test_fold=i) for i, f in enumerate(folds)]).to_csv(
        out / "splits.csv", index=False)
    print(f"{len(manifest)} images, {int(y.sum())} positive ({label}); {config.cv.k} folds; "
          f"backbones {[b.name for b in config.backbones]}; protocols {config.protocols}")
    done = pd.DataFrame()
    if (out / "folds.csv").exists() and not overwrite:
        done = pd.read_csv(out / "folds.csv")
    rows = done.to_dict("records")
    key = {(r["backbone"], r["protocol"], int(r["fold"])) for r in rows}
    cells = [(s, p, i) for s in config.backbones for p in config.protocols for i in range(len(folds))]
    features = {}
    for spec, protocol, i in tqdm(cells, desc="transfer cells", unit="cell"):
        if (spec.name, protocol, i) in key:
            continue
        if spec.name not in features and protocol in ("lp", "lp_ft"):
            features[spec.name] = extract_features(spec, manifest, images, pre, seed=config.cv.seed,
                                                   cache_dir=config.data.cache_dir,
                                                   batch_size=config.feature_batch_size)
        rows.append(run_cell(spec, protocol, folds[i], i, y, images, features.get(spec.name), config,
                             out / "histories"))
        write_outputs(pd.DataFrame(rows), out, config, label)  # partial results survive an interruption
    summary = write_outputs(pd.DataFrame(rows), out, config, label)
    print(f"\n{out / 'summary.md'}\n{summary_markdown(summary)}")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kfundus transfer", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML, e.g. configs/hr_transfer.yaml")
    parser.add_argument("--data", help="dataset folder or label file (overrides data.path)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set cv.k=3 (repeatable)")
    parser.add_argument("--out", help="output folder (default: <output_dir>/<name>)")
    parser.add_argument("--overwrite", action="store_true", help="recompute cells already in folds.csv")
    args = parser.parse_args(argv)
    try:
        run_transfer(load_transfer_config(args.config, args.overrides), args.data, args.out, args.overwrite)
    except KfundusError as exc:
        print(f"kfundus transfer: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
