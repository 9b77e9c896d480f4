"""Supervised training (``kfundus train``): dataset -> patient-level splits -> cached
pipelines -> the system's model and objective -> the engine -> decision thresholds.

Everything lands in a run folder (``kfundus.run``): evaluate, explain and export read it.
Re-running the same command after an interruption resumes from the last finished epoch;
re-running a finished run is an error unless ``overwrite``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kfundus.config import Config, replace
from kfundus.data.images import Preprocess
from kfundus.data.manifest import Manifest
from kfundus.data.pipeline import make_dataset, prepare
from kfundus.errors import DataError
from kfundus.run import CURVES, HISTORY, SAMPLES, RunFolder, now


def make_splits(manifest: Manifest, config: Config) -> dict[str, Manifest]:
    """Train / val / test by patient (``data.split``); the train and val splits must not be
    empty and every label needs a positive example in training."""
    from kfundus.data.splits import split_patients

    s = config.data.split
    splits = split_patients(manifest, val=s.val, test=s.test, seed=s.seed, use_official=s.official)
    for name in ("train", "val"):
        if name not in splits or len(splits[name]) == 0:
            raise DataError(
                f"the {name} split is empty: set data.split fractions so it gets patients "
                "(e.g. --set data.split.val=0.2)"
            )
    empty = [c for c in manifest.labels if splits["train"].frame[c].sum() == 0]
    if empty:
        raise DataError(
            f"label(s) {empty} have no positive example in the training split of '{manifest.name}': "
            "drop them with --set 'data.labels=[...]', or add data that has them"
        )
    return splits


def skipped_table(manifest: Manifest, prepared: dict) -> pd.DataFrame:
    """Every row left out, one table: the reader's (missing images, rows without any of the
    labels, split ``""``: before splitting) and each split's (unreadable, too small), with
    the file row, path, reason, detail and split (``kfundus.run.SKIPPED_TABLE``)."""
    from kfundus.data.manifest import concat_skipped

    parts = [manifest.skipped.assign(split="")] + [p.skipped.assign(split=n) for n, p in prepared.items()]
    return concat_skipped(*parts).drop(columns=["row"], errors="ignore")


def splits_table(splits: dict[str, Manifest]) -> pd.DataFrame:
    frames = [m.frame.assign(split=name) for name, m in splits.items() if len(m)]
    return pd.concat(frames, ignore_index=True)


def save_samples(prepared, path: Path, count: int = 8) -> None:
    """A few preprocessed validation images, by model input name: the export checks
    Keras-vs-TFLite parity on them (real images, not noise that saturates the outputs)."""
    batch = next(iter(make_dataset(prepared, batch_size=count, with_targets=False)))
    batch = batch if isinstance(batch, dict) else {"image": batch}
    np.savez_compressed(path, **{k: np.asarray(v).astype(np.uint8) for k, v in batch.items()})


def data_root(path) -> str:
    """The folder a dataset path stands for (a label file's folder)."""
    path = Path(path).resolve()
    return str(path if path.is_dir() else path.parent)


def train(
    config: Config, data_path: str | None = None, run_dir: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Train the model a config describes; return the run folder."""
    import keras

    from kfundus.data.readers import load_dataset
    from kfundus.engine import fit
    from kfundus.evaluation.plots import plot_training_curves
    from kfundus.evaluation.predict import predict_outputs
    from kfundus.metrics import choose_thresholds
    from kfundus.objectives import head_thresholds, primary_output, score_defined_classes
    from kfundus.systems import build_model, make_objective

    run = RunFolder(run_dir or Path(config.output_dir) / config.name)
    if data_path:
        config = replace(config, data={"path": str(data_path)})
    manifest = load_dataset(config.data)  # a bad dataset stops before the run folder is touched
    run.start(overwrite)
    run.write_config(config)
    keras.utils.set_random_seed(config.train.seed)
    splits = make_splits(manifest, config)
    pre = Preprocess.from_config(config.data)
    d = config.data
    prepared = {
        name: prepare(
            part,
            pre,
            cache_dir=d.cache_dir,
            skip_unreadable=d.skip_unreadable,
            small_images=d.small_images,
            split=name,
        )
        for name, part in splits.items()
        if len(part)
    }
    run.write_splits(splits_table({name: p.manifest for name, p in prepared.items()}))
    skipped = skipped_table(manifest, prepared)
    skip_counts = run.write_skipped(skipped)
    if len(skipped):
        counts = ", ".join(f"{n} {reason}" for reason, n in skip_counts.items())
        print(f"skipped {len(skipped)} row(s) ({counts}): listed with the reason in {run / 'skipped.csv'}")
    save_samples(prepared["val"], run / SAMPLES)

    objective = make_objective(config, manifest, prepared["train"].manifest.targets())
    # val_auroc = evaluate's macro AUROC: classes validation cannot score are left out (and warned about)
    objective, auroc_excluded = score_defined_classes(
        objective, prepared["val"].manifest.targets(), manifest.labels, monitor=config.train.monitor
    )
    run.write_info(
        {
            "name": config.name,
            "workflow": "train",
            "model": config.model.name,
            "labels": manifest.labels,
            "task": manifest.task,
            "level": manifest.level,
            "primary_output": objective.primary,
            "image_size": config.data.image_size,
            "data_path": str(config.data.path),
            "data_root": data_root(config.data.path),
            "source": manifest.name,
            "counts": {n: {"rows": len(p), "positives": p.manifest.counts()} for n, p in prepared.items()},
            "skipped": len(skipped),
            "skipped_by_reason": skip_counts,
            "small_images_kept": int(sum(len(p.small) for p in prepared.values())),
            "auroc_excluded": auroc_excluded,
            "started": now(),
        }
    )
    for name, p in prepared.items():
        print(f"{name}: {len(p)} {manifest.level} rows, positives {p.manifest.counts()}")

    t = config.train
    result = fit(
        lambda: build_model(
            config.model,
            num_outputs=len(manifest.labels),
            image_size=config.data.image_size,
            task=manifest.task,
            two_eye=manifest.level == "patient",
        ),
        objective,
        make_dataset(
            prepared["train"], batch_size=t.batch_size, training=True, augment=config.data.augment, seed=t.seed
        ),
        make_dataset(prepared["val"], batch_size=t.batch_size),
        t,
        run_dir=run.path,
        distribution=config.distribution,
        train_rows=len(prepared["train"]),
        val_rows=len(prepared["val"]),
    )
    model = result.model
    model.save(run.model_file)
    val = prepared["val"]
    outputs = predict_outputs(model, val, t.batch_size)  # every head's threshold is chosen on validation
    y_val = val.manifest.targets()
    thresholds = choose_thresholds(y_val, primary_output(outputs, objective.primary), method="youden")
    run.write_thresholds(
        manifest.labels, thresholds, objective.primary, heads=head_thresholds(objective, outputs, y_val)
    )
    run.update_info(
        finished=now(), epochs_trained=len(result.history), best_epoch=result.best_epoch, replicas=result.replicas
    )
    plot_training_curves(run / HISTORY, run / CURVES)
    chosen = f"best {t.monitor} checkpoint, epoch {result.best_epoch}" if t.checkpoint == "best" else "last epoch"
    print(f"trained: {run.model_file} ({chosen})")
    return run.path
