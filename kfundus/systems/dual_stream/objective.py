"""The dual-stream system's objective: multi-task training of named heads from one label table.

One dataset label matrix ``y`` (the manifest's one-hot classes) feeds several heads:

- the **primary head** (``model.options.primary_head``, e.g. ``dr_grade`` or
  ``oct_class``) gets ``y`` itself: DR grade 0-4 (TF2) or CNV/DME/DRUSEN/NORMAL (TO1);
- the **abnormal head**, when ``model.options.normal_class`` names a class (``no_dr``,
  ``NORMAL``), gets ``1 - y[:, normal_class]``: normal vs abnormal (TF1, TO2).

``dual_stream_objective`` turns a config into the ``kfundus.objectives.Objective`` of such a
model: per-head losses (``train.loss``: ``wlsr``, Keras' ``label_smoothing`` or plain
cross-entropy ``bce``), per-head loss weights, per-head metrics (accuracy, macro F1,
AUROC, and the quadratic weighted kappa ``qwk`` for DR grades) and the target builder.
Loss parameters come from ``train.loss_options``:

    epsilon: 0.1            # label smoothing (wlsr, label_smoothing)
    weighting: inverse      # wlsr class weights: inverse (N / (K n_k)), sqrt_inverse, none
    weight_cap: 10.0        # upper bound of a class weight
    weight_by: sample       # wlsr: weight each sample by its class (sample) or each class term
                            # (class: each class term weighted; see WeightedLabelSmoothingLoss)
    loss_weights: {dr_grade: 1.0, abnormal: 0.5}   # per head (default 1 each)

Keras 3 has no Cohen's kappa metric (tensorflow-addons is gone): ``QuadraticWeightedKappa``
is a streaming one written in ``keras.ops`` (``kfundus.systems.dual_stream.kappa``).
"""

from __future__ import annotations

import keras
import numpy as np

from kfundus.errors import ConfigError
from kfundus.labels import DR_GRADES
from kfundus.objectives import MacroAUROC, Objective
from kfundus.systems.dual_stream.kappa import QuadraticWeightedKappa

LOSSES = ("wlsr", "label_smoothing", "bce")
LOSS_OPTIONS = {"epsilon": 0.1, "weighting": "inverse", "weight_cap": 10.0, "weight_by": "sample", "loss_weights": None}
ABNORMAL = "abnormal"


# ---------------------------------------------------------------------------
# heads and targets


def task_heads(manifest_labels, task: str, primary: str, normal_class: str | None) -> dict:
    """``{head: (task, labels)}`` for a manifest: the primary head over its labels, plus
    ``abnormal`` (binary) when ``normal_class`` is one of them."""
    heads = {primary: (task, list(manifest_labels))}
    if normal_class is not None:
        if normal_class not in manifest_labels:
            raise ConfigError(
                f"model.options.normal_class={normal_class!r} is not a class of the dataset; "
                f"its classes are {list(manifest_labels)}"
            )
        heads[ABNORMAL] = ("binary", [ABNORMAL])
    return heads


def make_targets(manifest_labels, primary: str, normal_class: str | None):
    """``fn(y) -> {head: target}`` for the tf.data pipeline (``y``: (batch, n_labels))."""
    index = None if normal_class is None else list(manifest_labels).index(normal_class)

    def targets(y):
        out = {primary: y}
        if index is not None:
            out[ABNORMAL] = 1.0 - y[:, index : index + 1]
        return out

    return targets


def head_targets(y: np.ndarray, manifest_labels, primary: str, normal_class: str | None) -> dict:
    """The same as ``make_targets`` on a numpy label matrix."""
    return {
        k: np.asarray(v)
        for k, v in make_targets(manifest_labels, primary, normal_class)(np.asarray(y, dtype=np.float32)).items()
    }


def head_metrics(task: str, labels, ordinal: bool = False) -> list:
    """accuracy, macro F1, AUROC (macro over classes / labels) and, for ordinal grades, ``qwk``."""
    k = len(labels)
    if task == "multiclass":
        metrics = [
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.F1Score(average="macro", name="macro_f1"),
            MacroAUROC(k, name="auroc"),
        ]
        return metrics + ([QuadraticWeightedKappa(k, name="qwk")] if ordinal else [])
    return [
        keras.metrics.BinaryAccuracy(name="accuracy"),
        keras.metrics.F1Score(average="macro", threshold=0.5, name="macro_f1"),
        MacroAUROC(k, name="auroc"),
    ]


# ---------------------------------------------------------------------------
# losses


def loss_options(options) -> dict:
    """``train.loss_options`` with defaults, unknown keys refused."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(LOSS_OPTIONS))
    if unknown:
        raise ConfigError(f"train.loss_options: unknown key(s) {unknown}; valid: {sorted(LOSS_OPTIONS)}")
    return {**LOSS_OPTIONS, **options}


def head_loss(name: str, task: str, targets: np.ndarray, options: dict):
    """The loss of one head from its training targets (``(N, K)`` one-hot or ``(N, L)`` 0/1)."""
    from kfundus.losses import class_weights
    from kfundus.systems.dual_stream.wlsr import WeightedLabelSmoothingLoss

    eps = float(options["epsilon"])
    if name not in LOSSES:
        raise ConfigError(
            f"train.loss={name!r} for model dual_stream: use one of {list(LOSSES)} "
            "(wlsr: weighted label smoothing; label_smoothing: Keras' own; bce: plain cross-entropy)"
        )
    categorical = task == "multiclass"
    if name == "bce":
        return keras.losses.CategoricalCrossentropy() if categorical else keras.losses.BinaryCrossentropy()
    if name == "label_smoothing":
        return (
            keras.losses.CategoricalCrossentropy(label_smoothing=eps)
            if categorical
            else keras.losses.BinaryCrossentropy(label_smoothing=eps)
        )
    targets = np.asarray(targets, dtype=np.float64)
    weighting, cap = options["weighting"], float(options["weight_cap"])
    if categorical:
        weights = class_weights(targets.sum(axis=0), weighting, cap)
        return WeightedLabelSmoothingLoss(weights, epsilon=eps, mode="categorical", weight_by=options["weight_by"])
    positives = targets.sum(axis=0)
    pairs = [class_weights([len(targets) - p, p], weighting, cap) for p in positives]
    return WeightedLabelSmoothingLoss(pairs, epsilon=eps, mode="binary", weight_by=options["weight_by"])


def dual_stream_objective(config, manifest, train_targets):
    """The Objective of ``model.name: dual_stream`` (see the module docstring)."""
    model_options = config.model.options or {}
    primary = model_options.get("primary_head", "classes")
    normal = model_options.get("normal_class")
    options = loss_options(config.train.loss_options)
    heads = task_heads(manifest.labels, manifest.task, primary, normal)
    targets = head_targets(train_targets, manifest.labels, primary, normal)
    weights = dict.fromkeys(heads, 1.0)
    for head, weight in (options["loss_weights"] or {}).items():
        if head not in heads:
            raise ConfigError(
                f"train.loss_options.loss_weights names head {head!r}; the model's heads are {sorted(heads)}"
            )
        weights[head] = float(weight)
    ordinal = list(manifest.labels) == DR_GRADES
    return Objective(
        loss={h: head_loss(config.train.loss, task, targets[h], options) for h, (task, _) in heads.items()},
        metrics={h: head_metrics(task, labels, ordinal and h == primary) for h, (task, labels) in heads.items()},
        loss_weights=weights,
        targets=make_targets(manifest.labels, primary, normal),
        primary=primary,
        heads=heads,
    )


# ---------------------------------------------------------------------------
# evaluation of every head


def primary_model(model: keras.Model, primary: str | None) -> keras.Model:
    """The single-output model of one head (Grad-CAM needs one output)."""
    if len(model.outputs) == 1 or primary is None:
        return model
    return keras.Model(model.inputs, model.get_layer(primary).output, name=f"{model.name}_{primary}")


def head_reports(
    predictions: dict, y: np.ndarray, manifest_labels, task: str, config, thresholds: dict | None = None
) -> dict:
    """Per-head metrics (``kfundus.metrics.evaluate_predictions``) of a multi-head model's
    ``{head: probabilities}`` against the heads' targets built from label matrix ``y``.

    Args:
        predictions: ``{head: (N, units) probabilities}``.
        y: the dataset's ``(N, K)`` label matrix.
        manifest_labels: its label names.
        task: its task.
        config: the run's config (``model.options`` name the heads).
        thresholds: ``{head: {"thresholds": [...]}}``, the ``heads`` entry of the run's
            ``thresholds.json`` (chosen on validation); a sigmoid head it does not list is
            evaluated at 0.5 and says so (``threshold_source``). Softmax heads decide by
            argmax.

    Returns:
        ``{head: report}``, each with ``task``, ``labels`` and ``threshold_source``.
    """
    from kfundus.metrics import evaluate_predictions

    options = config.model.options or {}
    primary, normal = options.get("primary_head", "classes"), options.get("normal_class")
    heads = task_heads(manifest_labels, task, primary, normal)
    targets = head_targets(y, manifest_labels, primary, normal)
    thresholds = thresholds or {}
    reports = {}
    for head, (head_task, labels) in heads.items():
        if head not in predictions:
            continue
        chosen = (thresholds.get(head) or {}).get("thresholds")
        if head_task == "multiclass":
            values, source = None, "argmax (no threshold)"
        elif chosen is not None:
            values, source = np.asarray(chosen, dtype=float), "validation (thresholds.json)"
        else:
            values, source = np.full(len(labels), 0.5), "0.5 (the run has no threshold for this head)"
        report = evaluate_predictions(
            targets[head],
            np.asarray(predictions[head]),
            labels,
            head_task,
            thresholds=values,
            ordinal=head == primary and list(manifest_labels) == DR_GRADES,
        )
        reports[head] = {**report, "threshold_source": source}
    return reports
