"""What a model is trained to do, as data: the :class:`Objective` a system hands the engine.

Every system (``kfundus.systems``) turns a config and its training targets into an
``Objective``: the Keras losses and metrics, per-output loss weights, how the dataset's
label matrix becomes the model's targets, and which output holds the label
probabilities. The engine (``kfundus.engine.fit``) compiles and fits from it; systems
never import the engine.
"""

from __future__ import annotations

import dataclasses
import warnings

import keras
import numpy as np
from keras import ops

from kfundus.errors import ConfigError, DataError

# MacroAUROC's grid: thresholds evenly spaced in logit space over LOGIT_RANGE (every float32
# probability strictly between 0 and 1 has a logit in it: at most 16.6, and -40 is p = 4e-18).
AUROC_THRESHOLDS = 4001
LOGIT_RANGE = (-40.0, 17.0)


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
        heads: ``{output_name: (task, labels)}`` of a multi-task model, primary output first:
            every head gets thresholds chosen on validation and its own evaluation report
            (None: the model has one labelled output, ``primary``).
        param_groups: ``fn(model) -> {variable path: (depth, weight_decay)}`` for layer-wise
            learning-rate decay (``train.layer_decay``): a variable's learning rate is
            multiplied by ``layer_decay ** depth`` (depth 0: the head; larger: nearer the
            input) and ``weight_decay`` says whether AdamW's weight decay applies to it
            (None: the system has no layer depths; RETFound defines them).
    """

    loss: object
    metrics: object
    loss_weights: dict | None = None
    targets: object = None
    primary: str | None = None
    on_trained: list = dataclasses.field(default_factory=list)
    class_weight: dict | None = None
    heads: dict | None = None
    param_groups: object = None


@keras.saving.register_keras_serializable(package="kfundus")
class MacroAUROC(keras.metrics.AUC):
    """The macro mean of per-label ROC AUCs (one-vs-rest for softmax), as
    ``kfundus.metrics`` computes it, streamed over batches: what ``val_auroc`` logs and
    checkpoint selection reads.

    Two differences from ``keras.metrics.AUC(multi_label=True)``:

    - **Excluded labels.** ``label_weights`` (1 or 0 per label) leave out of the mean the
      labels a split cannot score (no positives or no negatives), as the evaluation's
      ``macro_auroc`` does; :func:`score_defined_classes` sets them from the validation
      split. (Keras' own AUC gives such a label an AUC of 0 or 1 and averages it in.)
    - **A logit grid.** Keras counts scores between ``num_thresholds`` thresholds evenly
      spaced in [0, 1] (200 by default), so scores closer than 1/199 are ties: a
      confident model whose negatives all score below 0.005 gets AUC 0.5 whatever it
      ranks. Here the thresholds are ``AUROC_THRESHOLDS`` points evenly spaced in *logit*
      space over ``LOGIT_RANGE`` (a bin is 0.014 logits wide: 0.0036 in probability at
      0.5, 1.4e-4 at 0.01), through Keras' own bucketed update (the probabilities are
      mapped to ``(logit(p) - lo) / (hi - lo)``, a monotone map, which leaves every ROC
      curve unchanged).

    The only difference left from the exact (scikit-learn) AUROC is that a positive and a
    negative falling in the same bin count as a tie (half a correct pair): per label the
    error is at most ``pairs sharing a bin / (2 * positives * negatives)``. Measured on
    simulated scores (normal logits, 60-3000 samples, prevalence 0.2, spreads 0.3-3,
    shifts -20..4): at most 2.8e-3 (one bin-sharing pair in a 60-sample set), against up
    to 0.5 for Keras' default.

    Args:
        num_labels: output columns.
        label_weights: one weight per label (None: all 1).
        num_thresholds: grid points.
        logit_range: ``(lo, hi)`` of the grid in logits.
        name: metric name (``auroc``).
        dtype: metric dtype.
    """

    def __init__(
        self,
        num_labels: int,
        label_weights=None,
        num_thresholds: int = AUROC_THRESHOLDS,
        logit_range=LOGIT_RANGE,
        name: str = "auroc",
        dtype=None,
    ):
        lo, hi = (float(v) for v in logit_range)
        if not hi > lo:
            raise ConfigError(f"MacroAUROC logit_range={logit_range}: needs lo < hi")
        weights = None if label_weights is None else [float(w) for w in np.ravel(label_weights)]
        if weights is not None and len(weights) != int(num_labels):
            raise ConfigError(f"MacroAUROC: {len(weights)} label weights for {num_labels} labels")
        super().__init__(
            num_thresholds=int(num_thresholds),
            multi_label=True,
            num_labels=int(num_labels),
            label_weights=weights,
            name=name,
            dtype=dtype,
        )
        self.logit_range = (lo, hi)
        self.weights_list = weights

    def update_state(self, y_true, y_pred, sample_weight=None):
        lo, hi = self.logit_range
        p = ops.cast(y_pred, "float32")
        logit = ops.log(p) - ops.log1p(-p)  # p = 0 or 1: -inf / inf, clipped into the end bins
        return super().update_state(y_true, ops.clip((logit - lo) / (hi - lo), 0.0, 1.0), sample_weight)

    def get_config(self):
        return {
            "name": self.name,
            "dtype": self.dtype,
            "num_labels": self.num_labels,
            "label_weights": self.weights_list,
            "num_thresholds": self.num_thresholds,
            "logit_range": list(self.logit_range),
        }


def auroc_bins(y_prob, thresholds: int = AUROC_THRESHOLDS, logit_range=LOGIT_RANGE) -> np.ndarray:
    """The bin of :class:`MacroAUROC`'s grid each probability falls in (scores in one bin
    are ties to the metric), computed in NumPy (float32, as the metric does)."""
    lo, hi = logit_range
    p = np.asarray(y_prob, dtype=np.float32)
    with np.errstate(divide="ignore"):
        logit = np.log(p) - np.log1p(-p)
    g = np.clip((logit - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0).astype(np.float32)
    grid = np.float32([i / (thresholds - 1) for i in range(1, thresholds - 1)])
    return np.searchsorted(grid, g, side="left")  # thresholds strictly below the score


def auroc_tie_bound(y_true, y_prob, **grid) -> np.ndarray:
    """Per label, the largest possible difference between :class:`MacroAUROC` and the exact
    AUROC on these scores: ``positive-negative pairs sharing a bin / (2 P N)`` (NaN for a
    label without both classes)."""
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    y_true = y_true[:, None] if y_true.ndim == 1 else y_true
    y_prob = y_prob[:, None] if y_prob.ndim == 1 else y_prob
    bins = auroc_bins(y_prob, **grid)
    bounds = []
    for k in range(y_prob.shape[1]):
        pos, neg = bins[y_true[:, k] == 1, k], bins[y_true[:, k] == 0, k]
        if not len(pos) or not len(neg):
            bounds.append(float("nan"))
            continue
        shared = sum(int(np.sum(pos == b)) * int(np.sum(neg == b)) for b in np.unique(pos))
        bounds.append(shared / (2.0 * len(pos) * len(neg)))
    return np.asarray(bounds)


def defined_classes(targets) -> np.ndarray:
    """Per column of a ``(N, K)`` 0/1 target matrix: True when it has both positives and
    negatives (an AUROC exists)."""
    targets = np.asarray(targets)
    targets = targets[:, None] if targets.ndim == 1 else targets
    positives = (targets > 0.5).sum(axis=0)
    return (positives > 0) & (positives < targets.shape[0])


def _output_targets(objective: Objective, y) -> dict:
    targets = objective.targets(np.asarray(y, dtype=np.float32)) if objective.targets is not None else y
    return {k: np.asarray(v) for k, v in targets.items()} if isinstance(targets, dict) else {None: np.asarray(targets)}


def _output_labels(objective: Objective, output, width: int, labels) -> list[str]:
    if objective.heads and output in objective.heads:
        return [str(x) for x in objective.heads[output][1]]
    if width == len(labels):
        return [str(x) for x in labels]
    return [str(output)] if width == 1 else [f"{output}_{k}" for k in range(width)]


def score_defined_classes(objective: Objective, val_targets, labels, *, monitor: str | None = None):
    """Make ``val_auroc`` the evaluation's macro AUROC: every :class:`MacroAUROC` of the
    objective is rebuilt with label weight 0 for the labels its output's validation
    targets cannot score (no positives or no negatives), and a warning names them.

    Args:
        objective: the system's Objective (its ``targets`` turn the label matrix into
            each output's targets).
        val_targets: the validation split's ``(N, K)`` label matrix.
        labels: the dataset's label names.
        monitor: ``train.monitor``: when it is an AUROC and no label of that output can be
            scored, a DataError (checkpoint selection would read NaN).

    Returns:
        ``(objective, excluded)``: the objective with re-weighted metrics and, by validation
        metric name (``val_auroc``, ``val_probabilities_auroc``, ``val_<head>_auroc``), the
        labels it leaves out (empty when none).

    Raises:
        DataError: the monitored AUROC has no label to average.
    """
    targets = _output_targets(objective, val_targets)
    excluded, reasons = {}, []

    def reweigh(metric, output):
        if not isinstance(metric, MacroAUROC) or output not in targets:
            return metric
        y = targets[output]
        y = y[:, None] if y.ndim == 1 else y
        valid = defined_classes(y)
        if valid.all():
            return metric
        names = _output_labels(objective, output, y.shape[1], labels)
        prefix = "val_" if output is None else f"val_{output}_"
        excluded[f"{prefix}{metric.name}"] = [n for n, v in zip(names, valid) if not v]
        positives = (y > 0.5).sum(axis=0)
        none = [n for n, p in zip(names, positives) if p == 0]
        every = [n for n, p in zip(names, positives) if p == len(y)]
        where = f" (output {output!r})" if output is not None else ""
        reasons.append(
            (f"no positive example of {none}" if none else "")
            + (" and " if none and every else "")
            + (f"no negative example of {every}" if every else "")
            + where
        )
        if not valid.any() and monitor == f"{prefix}{metric.name}":
            raise DataError(
                f"the validation split ({len(y)} rows) has no label with both positive and negative examples"
                f"{where}, so {monitor}, which picks the checkpoint, cannot be computed: give validation more "
                "patients (--set data.split.val=0.3) or monitor the loss (--set train.monitor=val_loss)"
            )
        config = {**metric.get_config(), "label_weights": valid.astype("float32").tolist()}
        return MacroAUROC.from_config(config)

    metrics = objective.metrics
    if isinstance(metrics, dict):
        metrics = {k: [reweigh(m, k) for m in v] for k, v in metrics.items()}
    else:
        metrics = [reweigh(m, None) for m in metrics]
    if reasons:
        warnings.warn(
            f"the validation split has {'; '.join(reasons)}: these classes cannot be scored there, so "
            f"{' and '.join(excluded)} (what picks the checkpoint when it is train.monitor) averages over the "
            "others, as `kfundus evaluate`'s macro_auroc does, and their decision thresholds stay at 0.5. To "
            "score them, give validation more patients (--set data.split.val=0.3) or leave the classes out "
            "(--set 'data.labels=[...]')",
            stacklevel=2,
        )
    return dataclasses.replace(objective, metrics=metrics), excluded


def head_thresholds(objective: Objective, outputs, y, method: str = "youden") -> dict | None:
    """Decision rules of every head of a multi-task objective, chosen on validation.

    Args:
        objective: the Objective (None is returned unless it has ``heads``).
        outputs: the model's ``{head: (N, units) probabilities}`` on the validation split.
        y: the validation split's ``(N, K)`` label matrix (the objective's ``targets`` give
            each head's targets).
        method: see ``kfundus.metrics.choose_thresholds``.

    Returns:
        ``{head: {"task", "labels", "decision", "thresholds"}}`` (sigmoid heads: one
        threshold per unit, ``prob > threshold``; softmax heads: ``decision`` argmax, no
        thresholds), the ``heads`` entry of ``thresholds.json``; None for single-head models.
    """
    from kfundus.metrics import choose_thresholds

    if not objective.heads or not isinstance(outputs, dict):
        return None
    targets = _output_targets(objective, y)
    rules = {}
    for head, (task, labels) in objective.heads.items():
        rule = {"task": task, "labels": [str(x) for x in labels]}
        if task == "multiclass":
            rule["decision"] = "argmax"
        else:
            rule["decision"] = "probability > threshold"
            chosen = choose_thresholds(targets[head], np.asarray(outputs[head]), method=method)
            rule["thresholds"] = [float(v) for v in chosen]
        rules[head] = rule
    return rules


def make_metrics(task: str, num_labels: int) -> list:
    """``auroc``: the macro mean of per-label ROC AUCs (one-vs-rest for softmax,
    :class:`MacroAUROC`), plus accuracy."""
    auroc = MacroAUROC(num_labels, name="auroc")
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
