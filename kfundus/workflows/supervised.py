"""Training: data -> splits -> cached pipelines -> model -> ``model.fit`` with callbacks.

A run directory holds everything needed to evaluate, resume or export later:

    runs/<name>/
      config.yaml        the resolved configuration
      run.json           labels, task, level, image size, data path, counts
      splits.csv         every row of the dataset with its split (patient-level)
      skipped.csv        images that could not be read (when data.skip_unreadable)
      best.keras         checkpoint at the best validation metric (``train.monitor``)
      backup/            state for resuming an interrupted run (BackupAndRestore)
      history.csv        per-epoch losses and metrics (CSVLogger), training_curves.png
      tensorboard/       TensorBoard logs
      thresholds.json    per-label decision thresholds chosen on validation (Youden's J)
      samples.npz        a few preprocessed validation images (export parity checks)
      model.keras        the final model: the best checkpoint, or the last epoch (train.checkpoint)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import warnings
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from kfundus.config import Config, save_config
from kfundus.data.manifest import Manifest
from kfundus.data.pipeline import Preprocess, make_dataset, prepare
from kfundus.distribute import drop_short_batch, strategy_scope
from kfundus.errors import ConfigError, DataError
from kfundus.models import load_model

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------
# data


def load_manifest(config: Config, data_path: str | None = None) -> Manifest:
    """Read the dataset named by ``config.data`` (path overridable) and select its labels."""
    from kfundus.data.sources import load_source, select_labels

    path = data_path or config.data.path
    if not path:
        raise ConfigError("no dataset given: pass --data DIR or set data.path in the config")
    manifest = load_source(config.data.source, path, **config.data.options)
    if config.data.labels:
        manifest = select_labels(manifest, list(config.data.labels), drop_empty=config.data.drop_empty)
    return manifest


def make_splits(manifest: Manifest, config: Config) -> dict[str, Manifest]:
    from kfundus.data.splits import split_patients

    s = config.data.split
    splits = split_patients(manifest, val=s.val, test=s.test, seed=s.seed, use_official=s.official)
    for name in ("train", "val"):
        if name not in splits or len(splits[name]) == 0:
            raise DataError(f"the {name} split is empty: set data.split fractions so it gets patients")
    empty = [c for c in manifest.labels if splits["train"].frame[c].sum() == 0]
    if empty:
        raise DataError(
            f"label(s) {empty} have no positive example in the training split of '{manifest.name}': "
            "drop them with data.labels, or add data that has them"
        )
    return splits


def splits_table(splits: dict[str, Manifest]) -> pd.DataFrame:
    frames = [m.frame.assign(split=name) for name, m in splits.items() if len(m)]
    return pd.concat(frames, ignore_index=True)


def preprocess_config(config: Config) -> Preprocess:
    return Preprocess(image_size=config.data.image_size, crop_fundus=config.data.crop_fundus)


# ---------------------------------------------------------------------------
# model pieces


@dataclasses.dataclass
class Objective:
    """What ``model.compile`` gets for one model family, and how the label matrix of the
    dataset becomes the model's targets.

    The default (single output, ``default_objective``) needs none of the optional fields.
    A multi-output model (named heads, an embedding output for a metric-learning loss)
    registers a function ``(config, manifest, train_targets) -> Objective`` in
    ``kfundus.models.OBJECTIVES`` under its ``model.name``:

    Attributes:
        loss: a Keras loss, or ``{output_name: loss}``.
        metrics: a list, or ``{output_name: [metrics]}``.
        loss_weights: ``{output_name: weight}`` (None: all 1).
        targets: ``fn(y) -> {output_name: target}`` applied in the tf.data pipeline to the
            batch label matrix ``y`` of the manifest (None: ``y`` as it is).
        primary: the output whose units are ``manifest.labels``: thresholds, evaluation
            and the report read it (None: the model has one output).
        callbacks: ``fn(run_dir) -> keras.callbacks.Callback`` factories added to the
            run's callbacks (e.g. saving LoRA adapters beside the checkpoint).
    """

    loss: object
    metrics: object
    loss_weights: dict | None = None
    targets: object = None
    primary: str | None = None
    callbacks: list = dataclasses.field(default_factory=list)


def default_objective(config: Config, manifest: Manifest, train_targets: np.ndarray) -> Objective:
    """One output over ``manifest.labels``: the loss ``train.loss`` names, AUROC + accuracy."""
    from kfundus.losses import make_loss

    t = config.train
    loss = make_loss(t.loss, manifest.task, train_targets, pos_weight_cap=t.pos_weight_cap,
                     focal_gamma=t.focal_gamma)
    return Objective(loss=loss, metrics=make_metrics(manifest.task, len(manifest.labels)))


def make_objective(config: Config, manifest: Manifest, train_targets: np.ndarray) -> Objective:
    from kfundus.models import OBJECTIVES

    return OBJECTIVES.get(config.model.name, default_objective)(config, manifest, train_targets)


def primary_output(predictions, primary: str | None = None) -> np.ndarray:
    """The label-probability matrix out of ``model.predict``'s result (an array, or a dict
    of named outputs of which ``primary`` is the one over the labels)."""
    if not isinstance(predictions, dict):
        return np.asarray(predictions, dtype=np.float32)
    if primary is None and len(predictions) == 1:  # one named output (a TFLite or SavedModel run)
        return np.asarray(next(iter(predictions.values())), dtype=np.float32)
    if primary is None or primary not in predictions:
        raise ConfigError(f"the model has outputs {sorted(predictions)}; its objective must name the "
                          "one over the labels (Objective.primary)")
    return np.asarray(predictions[primary], dtype=np.float32)


def make_metrics(task: str, num_labels: int) -> list:
    """``auroc``: the macro mean of per-label ROC AUCs (one-vs-rest for softmax), plus accuracy."""
    auroc = keras.metrics.AUC(multi_label=True, num_labels=num_labels, name="auroc")
    if task == "multiclass":
        return [auroc, keras.metrics.CategoricalAccuracy(name="accuracy")]
    return [auroc, keras.metrics.BinaryAccuracy(name="accuracy")]


def make_optimizer(train, steps_per_epoch: int):
    total = max(1, train.epochs * steps_per_epoch)
    warmup = int(round(train.warmup_epochs * steps_per_epoch))
    if train.schedule == "cosine":
        if warmup:
            lr = keras.optimizers.schedules.CosineDecay(
                0.0, max(1, total - warmup), warmup_target=train.learning_rate, warmup_steps=warmup)
        else:
            lr = keras.optimizers.schedules.CosineDecay(train.learning_rate, total)
    elif train.schedule == "constant":
        lr = train.learning_rate
    else:
        raise ConfigError(f"train.schedule={train.schedule!r}: use 'cosine' or 'constant'")
    name = train.optimizer.lower()
    ema = {"use_ema": True, "ema_momentum": train.ema} if train.ema is not None else {}
    if name == "adam":
        return keras.optimizers.Adam(lr, beta_2=train.beta_2, **ema)
    if name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=train.weight_decay or 0.004, beta_2=train.beta_2, **ema)
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, **ema)
    raise ConfigError(f"train.optimizer={train.optimizer!r}: use adam, adamw or sgd")


def _best_so_far(history_csv: Path, monitor: str, mode: str):
    if not history_csv.exists():
        return None
    history = pd.read_csv(history_csv)
    if monitor not in history or history[monitor].dropna().empty:
        return None
    return float(history[monitor].max() if mode == "max" else history[monitor].min())


def make_callbacks(run_dir: Path, train) -> list:
    mode = "min" if "loss" in train.monitor else "max"
    # With train.ema, SwapEMAWeights puts the averaged weights in the model for validation and
    # from each epoch's end (so the checkpoint holds them) to the next epoch's start. It comes
    # after BackupAndRestore, whose backup must hold the raw weights a resumed run trains on.
    swap = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if train.ema is not None else []
    callbacks = [
        keras.callbacks.BackupAndRestore(str(run_dir / "backup")),
        *swap,
        keras.callbacks.ModelCheckpoint(
            str(run_dir / "best.keras"), monitor=train.monitor, mode=mode, save_best_only=True,
            initial_value_threshold=_best_so_far(run_dir / "history.csv", train.monitor, mode)),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
        keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False),
    ]
    if train.early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=train.monitor, mode=mode, patience=train.early_stopping, restore_best_weights=False))
    return callbacks


# ---------------------------------------------------------------------------
# the run


def save_samples(prepared, path: Path, count: int = 8) -> None:
    """A few preprocessed validation images, by model input name: the export checks
    Keras-vs-TFLite parity on them (real images, not noise that saturates the outputs)."""
    batch = next(iter(make_dataset(prepared, batch_size=count, with_targets=False)))
    batch = batch if isinstance(batch, dict) else {"image": batch}
    np.savez_compressed(path, **{k: np.asarray(v).astype(np.uint8) for k, v in batch.items()})


def predict(model, prepared, batch_size: int, primary: str | None = None) -> np.ndarray:
    """Label probabilities for every row of ``prepared`` (the ``primary`` output of a
    multi-output model)."""
    ds = make_dataset(prepared, batch_size=batch_size, with_targets=False)
    return primary_output(model.predict(ds, verbose=0), primary)


def _start_or_resume(run_dir: Path, overwrite: bool) -> None:
    """An interrupted run (``backup/`` present) resumes; a finished one (``model.keras``, no
    backup) is an error unless ``overwrite``, which clears its results first."""
    finished = (run_dir / "model.keras").exists() and not (run_dir / "backup").exists()
    if finished and not overwrite:
        raise ConfigError(f"run {run_dir} has already finished (model.keras). Train again from scratch "
                          "with --overwrite, or give another --run-dir")
    if finished:
        for name in ("history.csv", "best.keras", "model.keras", "thresholds.json", "skipped.csv"):
            (run_dir / name).unlink(missing_ok=True)
        for folder in ["tensorboard", *[p.name for p in run_dir.glob("eval-*")]]:
            shutil.rmtree(run_dir / folder, ignore_errors=True)


def train(config: Config, data_path: str | None = None, run_dir: str | Path | None = None,
          overwrite: bool = False) -> Path:
    """Train the model a config describes; return the run directory.

    Re-running the same command after an interruption resumes from the last finished
    epoch (BackupAndRestore). Re-running a finished run is an error unless ``overwrite``.
    """
    from kfundus.metrics import choose_thresholds
    from kfundus.models import build_model
    from kfundus.plots import plot_training_curves

    if config.train.checkpoint not in ("best", "last"):
        raise ConfigError(f"train.checkpoint={config.train.checkpoint!r}: use 'best' (the epoch with the best "
                          f"train.monitor) or 'last' (the final epoch)")
    ema = config.train.ema
    if ema is not None and (isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 < ema < 1):
        raise ConfigError(f"train.ema={ema!r}: give the weight average's momentum, a number between 0 and 1 "
                          f"(e.g. 0.99), or null for no averaging")
    run_dir = Path(run_dir or Path(config.output_dir) / config.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    _start_or_resume(run_dir, overwrite)
    if data_path:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(data_path)))
    save_config(config, run_dir / "config.yaml")
    keras.utils.set_random_seed(config.train.seed)

    manifest = load_manifest(config, data_path)
    splits = make_splits(manifest, config)
    pre = preprocess_config(config)
    prepared = {}
    for name, part in splits.items():
        if len(part):
            prepared[name] = prepare(part, pre, cache_dir=config.data.cache_dir,
                                     skip_unreadable=config.data.skip_unreadable)
    table = splits_table({name: p.manifest for name, p in prepared.items()})
    table.to_csv(run_dir / "splits.csv", index=False)
    skipped = pd.concat([p.skipped.assign(split=n) for n, p in prepared.items()], ignore_index=True)
    if len(skipped):
        skipped.to_csv(run_dir / "skipped.csv", index=False)
        print(f"skipped {len(skipped)} unreadable image(s): listed in {run_dir / 'skipped.csv'}")

    save_samples(prepared["val"], run_dir / "samples.npz")
    two_eye = manifest.level == "patient"
    info = {
        "name": config.name, "labels": manifest.labels, "task": manifest.task, "level": manifest.level,
        "image_size": config.data.image_size, "data_path": str(config.data.path), "source": manifest.name,
        "counts": {n: {"rows": len(p), "positives": p.manifest.counts()} for n, p in prepared.items()},
        "skipped": len(skipped),
    }
    (run_dir / "run.json").write_text(json.dumps(info, indent=1))
    for name, p in prepared.items():
        print(f"{name}: {len(p)} {manifest.level} rows, positives {p.manifest.counts()}")

    train_cfg = config.train
    batch = train_cfg.batch_size
    steps = train_cfg.steps_per_epoch or math.ceil(len(prepared["train"]) / batch)
    previous_policy = keras.mixed_precision.global_policy().name
    if train_cfg.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with strategy_scope(config.distribution) as strategy:  # "none": the default strategy, a no-op
            model = build_model(config.model, num_outputs=len(manifest.labels), image_size=config.data.image_size,
                                task=manifest.task, two_eye=two_eye)
            # BCE on the sigmoid output: Keras computes it from the logits the sigmoid keeps
            # (BCE with logits), while the model still returns probabilities.
            objective = make_objective(config, manifest, prepared["train"].manifest.targets())
            model.compile(optimizer=make_optimizer(train_cfg, steps), loss=objective.loss,
                          loss_weights=objective.loss_weights, metrics=objective.metrics)
        replicas = strategy.num_replicas_in_sync
        train_ds = drop_short_batch(make_dataset(prepared["train"], batch_size=batch, training=True,
                                                 augment=config.data.augment, seed=train_cfg.seed),
                                    len(prepared["train"]), batch, replicas)
        if train_cfg.steps_per_epoch:
            train_ds = train_ds.repeat()
        val_ds = drop_short_batch(make_dataset(prepared["val"], batch_size=batch), len(prepared["val"]), batch,
                                  replicas)
        if objective.targets is not None:
            train_ds, val_ds = (ds.map(lambda x, y: (x, objective.targets(y))) for ds in (train_ds, val_ds))
        warnings.filterwarnings("ignore", message=".*shuffle=True.*was passed")  # the dataset shuffles itself
        model.fit(train_ds, validation_data=val_ds, epochs=train_cfg.epochs,
                  steps_per_epoch=train_cfg.steps_per_epoch,
                  callbacks=make_callbacks(run_dir, train_cfg) + [make(run_dir) for make in objective.callbacks],
                  verbose=2 if _quiet() else 1)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    best = run_dir / "best.keras"
    if train_cfg.checkpoint == "best" and best.exists():
        model = load_model(best)
    model.save(run_dir / "model.keras")
    val = prepared["val"]
    thresholds = choose_thresholds(val.manifest.targets(), predict(model, val, batch, objective.primary),
                                   method="youden")
    (run_dir / "thresholds.json").write_text(json.dumps(
        {"method": "youden (on validation)", "labels": manifest.labels, "primary_output": objective.primary,
         "thresholds": [float(t) for t in thresholds]}, indent=1))
    plot_training_curves(run_dir / "history.csv", run_dir / "training_curves.png")
    chosen = f"best {train_cfg.monitor} checkpoint" if train_cfg.checkpoint == "best" else "last epoch"
    print(f"trained: {run_dir / 'model.keras'} ({chosen})")
    return run_dir


def _quiet() -> bool:
    """One line per epoch instead of a live progress bar when output is not a terminal (CI, logs)."""
    import sys

    return not sys.stdout.isatty()
