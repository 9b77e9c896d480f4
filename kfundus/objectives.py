"""What a model is trained to do, as data: the :class:`Objective` a system hands the engine.

Every system (``kfundus.systems``) turns a config and its training targets into an
``Objective``: the Keras losses and metrics, per-output loss weights, how the dataset's
label matrix becomes the model's targets, and which output holds the label
probabilities. The engine (``kfundus.engine.fit``) compiles and fits from it; systems
never import the engine.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kfundus.errors import ConfigError


@dataclasses.dataclass
class Objective:
    """What ``model.compile`` and ``model.fit`` get for one model.

    The default (single output, :func:`default_objective`) needs none of the optional
    fields.

    Attributes:
        loss: a Keras loss, or ``{output_name: loss}``.
        metrics: a list, or ``{output_name: [metrics]}``.
        loss_weights: ``{output_name: weight}`` (None: all 1).
        targets: ``fn(y) -> {output_name: target}`` applied in the tf.data pipeline to the
            batch label matrix ``y`` (None: ``y`` as it is).
        primary: the output whose units are the dataset's labels: thresholds, evaluation
            and the report read it (None: the model has one output).
        on_trained: ``fn(model, run_dir)`` run by the engine once the kept weights (best or
            last epoch) are in the model: files a system writes beside it (LoRA adapters).
        class_weight: ``{class index: weight}`` for ``model.fit`` (single-output models).
    """

    loss: object
    metrics: object
    loss_weights: dict | None = None
    targets: object = None
    primary: str | None = None
    on_trained: list = dataclasses.field(default_factory=list)
    class_weight: dict | None = None


def make_metrics(task: str, num_labels: int) -> list:
    """``auroc``: the macro mean of per-label ROC AUCs (one-vs-rest for softmax), plus accuracy."""
    import keras

    auroc = keras.metrics.AUC(multi_label=True, num_labels=num_labels, name="auroc")
    if task == "multiclass":
        return [auroc, keras.metrics.CategoricalAccuracy(name="accuracy")]
    return [auroc, keras.metrics.BinaryAccuracy(name="accuracy")]


def balanced_class_weight(y) -> dict:
    """``{0: n / (2 n_0), 1: n / (2 n_1)}`` for a 0/1 label vector (scikit-learn's
    ``class_weight="balanced"``)."""
    y = np.asarray(y).astype(int).ravel()
    counts = np.bincount(y, minlength=2).astype(float)
    weights = len(y) / (2.0 * np.maximum(counts, 1))
    return {0: float(weights[0]), 1: float(weights[1])}


def default_objective(config, manifest, train_targets: np.ndarray) -> Objective:
    """One output over ``manifest.labels``: the loss ``train.loss`` names, AUROC + accuracy,
    and ``train.class_weight`` (balanced: binary tasks only)."""
    from kfundus.losses import make_loss

    t = config.train
    loss = make_loss(t.loss, manifest.task, train_targets, pos_weight_cap=t.pos_weight_cap, focal_gamma=t.focal_gamma)
    class_weight = None
    if t.class_weight == "balanced":
        if np.shape(train_targets)[1] != 1:
            raise ConfigError(
                f"train.class_weight=balanced weighs the two classes of a binary task; "
                f"{manifest.name or 'the dataset'} has {np.shape(train_targets)[1]} labels "
                "(use --set train.class_weight=null, or train.loss=weighted_bce)"
            )
        class_weight = balanced_class_weight(train_targets[:, 0])
    return Objective(loss=loss, metrics=make_metrics(manifest.task, len(manifest.labels)), class_weight=class_weight)


def primary_output(predictions, primary: str | None = None) -> np.ndarray:
    """The label-probability matrix out of ``model.predict``'s result (an array, or a dict
    of named outputs of which ``primary`` is the one over the labels)."""
    if not isinstance(predictions, dict):
        return np.asarray(predictions, dtype=np.float32)
    if primary is None and len(predictions) == 1:  # one named output (a TFLite or SavedModel run)
        return np.asarray(next(iter(predictions.values())), dtype=np.float32)
    if primary is None or primary not in predictions:
        raise ConfigError(
            f"the model has outputs {sorted(predictions)}; its objective must name the "
            "one over the labels (Objective.primary)"
        )
    return np.asarray(predictions[primary], dtype=np.float32)
