"""The callbacks every fit gets: Keras' own, configured from the ``train`` section."""

from __future__ import annotations

from pathlib import Path

import keras
import pandas as pd

CHECKPOINT = "best.weights.h5"
HISTORY = "history.csv"
BACKUP = "backup"
TENSORBOARD = "tensorboard"


def monitor_mode(monitor: str) -> str:
    """``min`` for a loss, ``max`` for a score."""
    return "min" if "loss" in monitor else "max"


def best_so_far(history_csv: Path, monitor: str):
    """The best ``monitor`` value logged by an earlier (interrupted) part of this run."""
    if not Path(history_csv).exists():
        return None
    history = pd.read_csv(history_csv)
    if monitor not in history or history[monitor].dropna().empty:
        return None
    return float(history[monitor].min() if monitor_mode(monitor) == "min" else history[monitor].max())


def make_callbacks(run_dir, train, *, initial_value=None, backup: bool = True, tensorboard: bool = True) -> list:
    """Keras callbacks for a fit into ``run_dir`` (None: none that write files).

    - ``BackupAndRestore`` (``backup``): re-running an interrupted fit resumes at its last
      finished epoch;
    - ``SwapEMAWeights`` with ``train.ema``: validation and checkpoints see the averaged
      weights (after the backup, whose copy must hold the raw weights training resumes from);
    - ``ModelCheckpoint`` of the best ``train.monitor`` epoch, weights only, to
      ``best.weights.h5``; it must beat ``initial_value`` (the starting weights' score,
      for a fit whose start is a candidate) or the best of an interrupted earlier part;
    - ``CSVLogger`` (``history.csv``, appended on resume) and ``TensorBoard`` logs;
    - ``EarlyStopping`` after ``train.early_stopping`` epochs without improvement (over
      ``initial_value`` too, when given); the best weights come from the checkpoint.
    """
    mode = monitor_mode(train.monitor)
    callbacks = []
    if run_dir is not None and backup:
        callbacks.append(keras.callbacks.BackupAndRestore(str(Path(run_dir) / BACKUP)))
    if train.ema is not None:
        callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    if run_dir is not None:
        run_dir = Path(run_dir)
        threshold = initial_value if initial_value is not None else best_so_far(run_dir / HISTORY, train.monitor)
        callbacks += [
            keras.callbacks.ModelCheckpoint(
                str(run_dir / CHECKPOINT),
                monitor=train.monitor,
                mode=mode,
                save_best_only=True,
                save_weights_only=True,
                initial_value_threshold=threshold,
            ),
            keras.callbacks.CSVLogger(str(run_dir / HISTORY), append=True),
        ]
        if tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(str(run_dir / TENSORBOARD), write_graph=False))
    if train.early_stopping:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=train.monitor,
                mode=mode,
                patience=train.early_stopping,
                baseline=initial_value,
                restore_best_weights=False,
            )
        )
    return callbacks
