"""The one place kfundus compiles and fits a Keras model.

``fit(build, objective, train_data, val_data, train, ...)`` does, in order:

1. sets the mixed-precision policy (``train.mixed_precision``), the seed and TensorFlow's
   op determinism (``train.deterministic``; ``kfundus.engine.reproducibility``);
2. builds the model with ``build()`` and compiles it inside the distribution strategy's
   scope (``distribution``: none, mirrored, multi_worker; ``kfundus.engine.distribute``),
   with the objective's losses, loss weights and metrics and the optimizer and schedule
   of the ``train`` section (``kfundus.engine.optimizers``);
3. maps the objective's targets over the datasets and drops a last batch too small to
   split over the replicas;
4. calls ``model.fit`` with the callbacks of ``kfundus.engine.callbacks`` (best or last
   checkpoint, EMA swap, early stopping, resume after an interruption, CSV and
   TensorBoard logs), then restores the policy;
5. puts the best epoch's weights in the model (``train.checkpoint: best``), lets the
   objective write its files (``Objective.on_trained``) and returns the model with the
   per-epoch history.

Supervised training, RET-CLIP pre-training and the transfer study's fine-tuning and
Keras linear probe all go through it; ``model.fit`` appears nowhere else in kfundus.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import tempfile
import warnings
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from kfundus.engine.callbacks import CHECKPOINT, HISTORY, make_callbacks, monitor_mode
from kfundus.engine.distribute import drop_short_batch, strategy_scope
from kfundus.engine.optimizers import make_optimizer
from kfundus.engine.reproducibility import reproducible
from kfundus.errors import KfundusError


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: the trained model, holding the best epoch's weights (``train.checkpoint:
            best``, when a checkpoint was written) or the last epoch's; after a distributed
            fit, a copy outside the strategy (one replica), ready to predict and save.
        history: one row per epoch of the whole run (a resumed run's earlier epochs
            included), with an ``epoch`` column counted from 1.
        best_epoch: the epoch whose weights the model holds (0: the starting weights,
            when they were a candidate and no epoch beat them).
        replicas: how many replicas the strategy trained on.
        start: the validation logs of the starting weights (``val_loss``, ``val_<metric>``),
            when they were evaluated (``evaluate_start`` or ``start_is_candidate``).
    """

    model: keras.Model
    history: pd.DataFrame
    best_epoch: int
    replicas: int
    start: dict | None = None


@contextlib.contextmanager
def precision_policy(mixed: bool):
    """Keras' ``mixed_float16`` policy inside the block when ``mixed``; the previous one after."""
    previous = keras.mixed_precision.global_policy().name
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def quiet() -> bool:
    """One line per epoch instead of a live progress bar when output is not a terminal."""
    return not sys.stdout.isatty()


def fit(
    build,
    objective,
    train_data,
    val_data,
    train,
    *,
    run_dir=None,
    distribution: str = "none",
    train_rows: int | None = None,
    val_rows: int | None = None,
    steps_per_epoch: int | None = None,
    start_is_candidate: bool = False,
    evaluate_start: bool = False,
    callbacks=(),
    backup: bool = True,
    tensorboard: bool = True,
) -> FitResult:
    """Build, compile and fit a model; see the module docstring.

    Args:
        build: ``() -> keras.Model``, called inside the precision policy and strategy scope.
        objective: a :class:`kfundus.objectives.Objective`.
        train_data, val_data: ``tf.data`` datasets of ``(inputs, labels)`` batches (the
            objective's ``targets`` turn the labels into the model's targets); ``val_data``
            may be None.
        train: the ``train`` config section (:class:`kfundus.config.TrainConfig`).
        run_dir: the folder for checkpoints, backups and logs (None: nothing is written,
            and the last epoch is kept).
        distribution: the strategy (``none``, ``mirrored``, ``multi_worker``).
        train_rows, val_rows: rows per epoch of each dataset (to drop a last batch smaller
            than the number of replicas, and for the learning-rate schedule).
        steps_per_epoch: optimizer steps per epoch for the schedule (default
            ``train.steps_per_epoch`` or ``ceil(train_rows / train.batch_size)``).
        start_is_candidate: the weights the fit starts from are a candidate for the best
            epoch (LP-FT's linear-probe start): they are scored on ``val_data`` first, and an
            epoch must beat that score to be checkpointed or to reset early stopping.
        evaluate_start: score the starting weights on ``val_data`` (``FitResult.start``)
            without making them a candidate.
        callbacks: more Keras callbacks, after kfundus' own.
        backup, tensorboard: write ``backup/`` (resume) and ``tensorboard/`` logs.
    """
    steps = steps_per_epoch or train.steps_per_epoch or max(1, math.ceil((train_rows or 1) / train.batch_size))
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    with reproducible(train.seed, train.deterministic), precision_policy(train.mixed_precision):
        with strategy_scope(distribution) as strategy:  # "none": the default strategy, a no-op
            model = build()
            param_groups = getattr(objective, "param_groups", None)  # layer-wise lr decay (train.layer_decay)
            groups = param_groups(model) if param_groups is not None and train.layer_decay is not None else None
            model.compile(
                optimizer=make_optimizer(train, steps, groups),
                loss=objective.loss,
                loss_weights=objective.loss_weights,
                metrics=objective.metrics,
            )
        replicas = strategy.num_replicas_in_sync
        if train_rows:
            train_data = drop_short_batch(train_data, train_rows, train.batch_size, replicas)
        if val_data is not None and val_rows:
            val_data = drop_short_batch(val_data, val_rows, train.batch_size, replicas)
        if train.steps_per_epoch:
            train_data = train_data.repeat()
        if objective.targets is not None:
            train_data = train_data.map(lambda x, y: (x, objective.targets(y)))
            if val_data is not None:
                val_data = val_data.map(lambda x, y: (x, objective.targets(y)))
        start, initial_value = None, None
        if (evaluate_start or start_is_candidate) and val_data is not None:
            start = {f"val_{k}": float(v) for k, v in model.evaluate(val_data, verbose=0, return_dict=True).items()}
            initial_value = start.get(train.monitor) if start_is_candidate else None
            if start_is_candidate and initial_value is None:
                raise KfundusError(f"train.monitor={train.monitor!r} is not among the validation logs {sorted(start)}")
        checkpoint = run_dir / CHECKPOINT if run_dir is not None else None
        if checkpoint is not None and initial_value is not None and not checkpoint.exists():
            model.save_weights(checkpoint)  # the start is the best until an epoch beats it
        all_callbacks = make_callbacks(
            run_dir, train, initial_value=initial_value, backup=backup, tensorboard=tensorboard
        )
        all_callbacks += list(callbacks)
        warnings.filterwarnings("ignore", message=".*shuffle=True.*was passed")  # the datasets shuffle themselves
        fitted = model.fit(
            train_data,
            validation_data=val_data,
            epochs=train.epochs,
            steps_per_epoch=train.steps_per_epoch,
            callbacks=all_callbacks,
            class_weight=objective.class_weight,
            verbose=2 if quiet() else 1,
        )

    if run_dir is not None and (run_dir / HISTORY).exists():
        history = pd.read_csv(run_dir / HISTORY)
    else:
        history = pd.DataFrame(fitted.history)
        history.insert(0, "epoch", np.arange(len(history)))
    if history.empty:
        raise KfundusError(f"no epoch was trained (train.epochs={train.epochs}); the run is not finished")
    history["epoch"] = np.arange(1, len(history) + 1)
    best_epoch = len(history)
    if train.checkpoint == "best" and checkpoint is not None and checkpoint.exists():
        model.load_weights(checkpoint)
        best_epoch = _best_epoch(history, train.monitor, initial_value)
    for write in objective.on_trained if run_dir is not None else []:
        write(model, run_dir)
    if replicas > 1:  # predicting splits each batch over the replicas, and a last batch of 1 leaves one empty
        with tempfile.TemporaryDirectory() as tmp:  # a copy built outside the strategy: one replica
            model.save(Path(tmp) / "model.keras")
            model = keras.saving.load_model(Path(tmp) / "model.keras")
    return FitResult(model, history, best_epoch, replicas, start)


def _best_epoch(history: pd.DataFrame, monitor: str, initial_value) -> int:
    """The first epoch with the best ``monitor`` value, as ``ModelCheckpoint`` keeps it
    (0 when the start, scored ``initial_value``, was a candidate and no epoch beat it)."""
    if monitor not in history or history[monitor].dropna().empty:
        return len(history)
    values = history[monitor].to_numpy(dtype=float)
    minimise = monitor_mode(monitor) == "min"
    best = int(np.nanargmin(values) if minimise else np.nanargmax(values))
    if initial_value is not None:
        beaten = values[best] < initial_value if minimise else values[best] > initial_value
        if not beaten:
            return 0
    return best + 1
