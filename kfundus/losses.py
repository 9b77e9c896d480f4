"""Losses beyond Keras' own, written in ``keras.ops`` so they run on every backend.

Class imbalance in multi-label fundus data (RFMiD's rare classes: AION, PT, RP, ... a few
examples each) is handled in one of two ways, chosen with ``train.loss``:

- ``weighted_bce``: binary cross-entropy with a weight on each label's positive term,
  ``w_k = n_negative_k / n_positive_k`` from the training split, capped at
  ``train.pos_weight_cap`` so that a label with 2 positives in 1900 does not dominate;
- ``focal``: Keras' ``BinaryFocalCrossentropy`` (Lin et al. 2017), gamma
  ``train.focal_gamma``, with alpha class balancing.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kfundus.errors import ConfigError

LOSSES = ("bce", "weighted_bce", "focal")


@keras.saving.register_keras_serializable(package="kfundus")
class WeightedBinaryCrossentropy(keras.losses.Loss):
    """BCE on sigmoid probabilities with one positive-class weight per label.

    ``loss = mean_k( -(w_k y_k log p_k + (1 - y_k) log(1 - p_k)) )``, probabilities clipped
    to ``[eps, 1 - eps]`` (``keras.config.epsilon()``).

    Args:
        pos_weight: one weight per label (list or array), applied to the positive term.

    Example:

    >>> loss = WeightedBinaryCrossentropy(pos_weight=[1.0, 10.0])
    >>> float(loss([[0.0, 1.0]], [[0.2, 0.6]]))  # doctest: +ELLIPSIS
    2.66...
    """

    def __init__(self, pos_weight, name="weighted_bce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pos_weight = [float(w) for w in np.ravel(pos_weight)]

    def call(self, y_true, y_pred):
        eps = keras.config.epsilon()
        y_pred = ops.clip(ops.cast(y_pred, "float32"), eps, 1.0 - eps)
        y_true = ops.cast(y_true, "float32")
        weight = ops.convert_to_tensor(self.pos_weight, dtype="float32")
        per_label = -(weight * y_true * ops.log(y_pred) + (1.0 - y_true) * ops.log(1.0 - y_pred))
        return ops.mean(per_label, axis=-1)

    def get_config(self):
        return {**super().get_config(), "pos_weight": self.pos_weight}


def positive_weights(targets: np.ndarray, cap: float = 50.0) -> np.ndarray:
    """``n_negative / n_positive`` per label column of a 0/1 matrix, capped at ``cap``.

    A label without positives gets the cap (the split check refuses such a label anyway).
    """
    targets = np.asarray(targets, dtype=np.float64)
    positives = targets.sum(axis=0)
    negatives = len(targets) - positives
    with np.errstate(divide="ignore"):
        weights = np.where(positives > 0, negatives / np.maximum(positives, 1), cap)
    return np.minimum(weights, cap).astype(np.float32)


def make_loss(name: str, task: str, train_targets: np.ndarray, *, pos_weight_cap=50.0, focal_gamma=2.0):
    """The training loss a config names, for a task and its training targets."""
    if name not in LOSSES:
        raise ConfigError(f"train.loss={name!r}: use one of {list(LOSSES)}")
    if task == "multiclass":
        if name != "bce":
            raise ConfigError(f"train.loss={name!r} is for sigmoid (multi-label/binary) tasks; "
                              "multi-class tasks use categorical cross-entropy (train.loss=bce)")
        return keras.losses.CategoricalCrossentropy()
    if name == "weighted_bce":
        return WeightedBinaryCrossentropy(positive_weights(train_targets, pos_weight_cap))
    if name == "focal":
        return keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, gamma=focal_gamma)
    return keras.losses.BinaryCrossentropy()


# ---------------------------------------------------------------------------
# Weighted label smoothing (WLSRL; Kaloi et al., iCoMET 2023; SPECS.md section 3)

WEIGHTINGS = ("inverse", "sqrt_inverse", "none")


def class_weights(counts, weighting: str = "inverse", cap: float = 10.0) -> np.ndarray:
    """Class weights from the training split's class counts ``n_k`` (N = their sum, K their number).

    ``"inverse"``: ``w_k = N / (K n_k)`` (1 for every class of a balanced set);
    ``"sqrt_inverse"``: its square root (milder); ``"none"``: all 1. Weights are capped at
    ``cap``; a class with no training example gets the cap.
    """
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"weighting={weighting!r}: use one of {list(WEIGHTINGS)}")
    counts = np.asarray(counts, dtype=np.float64)
    if weighting == "none":
        return np.ones(counts.shape, dtype=np.float32)
    with np.errstate(divide="ignore"):
        w = np.where(counts > 0, counts.sum() / (counts.size * np.maximum(counts, 1)), np.inf)
    w = np.sqrt(w) if weighting == "sqrt_inverse" else w
    return np.minimum(w, cap).astype(np.float32)


@keras.saving.register_keras_serializable(package="kfundus")
class WeightedLabelSmoothingLoss(keras.losses.Loss):
    """Weighted label-smoothing loss (WLSRL) on probabilities, for softmax and sigmoid heads.

    The paper does not publish its formula; this combines label smoothing with class
    weights from the training split (SPECS.md section 3). With ``eps`` = ``epsilon``, K
    classes, one-hot ``y``, probabilities ``p`` and the smoothed target
    ``y'_k = (1 - eps) * y_k + eps / K``:

    - ``weight_by="sample"`` (default): each sample is weighted by its true class's weight,
      and the smoothed target stays a distribution::

          loss = (sum_k w_k y_k) * sum_k y'_k * -log(p_k)

    - ``weight_by="class"``: the form SPECS.md writes, each class term weighted::

          loss = sum_k w_k * y'_k * -log(p_k)

      Its minimiser is ``p_k ~ w_k y'_k``, not ``y'``: the smoothing mass ``eps / K`` of a
      rare class is multiplied by its large weight, so a common-class image is pushed
      towards rare classes (with weights 0.3 and 10 and eps = 0.1 the argmax can flip).
      The ablation in the README measures both.

    ``mode="binary"`` (L sigmoid columns, each a two-class problem negative/positive with
    weights ``(w0_l, w1_l)``, ``y'_l = (1 - eps) y_l + eps / 2``)::

          ce_l = -(y'_l log p_l + (1 - y'_l) log(1 - p_l))
          sample: loss = mean_l (w1_l y_l + w0_l (1 - y_l)) * ce_l
          class:  loss = mean_l -(w1_l y'_l log p_l + w0_l (1 - y'_l) log(1 - p_l))

    ``w`` comes from the training split's class frequencies (``class_weights``:
    ``w_k = N / (K n_k)``), not from the batch: a class absent from a batch keeps its
    weight (and, with ``weight_by="class"``, still contributes through ``eps / K``).
    Probabilities are clipped to ``[1e-7, 1 - 1e-7]``; the batch is reduced by the mean
    over samples (Keras' ``sum_over_batch_size``). With unit weights both forms are Keras'
    ``CategoricalCrossentropy`` / ``BinaryCrossentropy`` with ``label_smoothing=epsilon``.

    Args:
        class_weights: ``mode="categorical"``: K weights. ``mode="binary"``: ``(w0, w1)``
            for one column, or L pairs ``[[w0, w1], ...]``.
        epsilon: smoothing in [0, 1).
        mode: ``"categorical"`` or ``"binary"``.
        weight_by: ``"sample"`` or ``"class"`` (see above).

    Example:

    >>> loss = WeightedLabelSmoothingLoss([1.0, 4.0], epsilon=0.1, weight_by="class")
    >>> round(float(loss([[0.0, 1.0]], [[0.2, 0.8]])), 4)
    0.9284
    """

    def __init__(self, class_weights, epsilon=0.1, mode="categorical", weight_by="sample", name="wlsr",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        if mode not in ("categorical", "binary"):
            raise ConfigError(f"WLSRL mode={mode!r}: use 'categorical' (softmax) or 'binary' (sigmoid)")
        if weight_by not in ("sample", "class"):
            raise ConfigError(f"WLSRL weight_by={weight_by!r}: use 'sample' or 'class'")
        if not 0.0 <= float(epsilon) < 1.0:
            raise ConfigError(f"WLSRL epsilon={epsilon}: the smoothing must be in [0, 1)")
        w = np.asarray(class_weights, dtype=np.float32)
        if mode == "binary":
            w = w.reshape(-1, 2) if w.size % 2 == 0 else None
        if w is None or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ConfigError(f"WLSRL class_weights={class_weights!r}: give finite, non-negative weights "
                              "(K of them for 'categorical', (w0, w1) pairs for 'binary')")
        self.class_weights = w.tolist()
        self.epsilon = float(epsilon)
        self.mode = mode
        self.weight_by = weight_by

    def call(self, y_true, y_pred):
        clip = 1e-7
        p = ops.clip(ops.cast(y_pred, "float32"), clip, 1.0 - clip)
        y = ops.cast(y_true, "float32")
        w = ops.convert_to_tensor(self.class_weights, dtype="float32")
        if self.mode == "categorical":
            k = float(len(self.class_weights))
            smooth = (1.0 - self.epsilon) * y + self.epsilon / k
            if self.weight_by == "class":
                return ops.sum(w * smooth * -ops.log(p), axis=-1)
            return ops.sum(w * y, axis=-1) * ops.sum(smooth * -ops.log(p), axis=-1)
        smooth = (1.0 - self.epsilon) * y + self.epsilon / 2.0
        if self.weight_by == "class":
            per_column = -(w[:, 1] * smooth * ops.log(p) + w[:, 0] * (1.0 - smooth) * ops.log(1.0 - p))
        else:
            ce = -(smooth * ops.log(p) + (1.0 - smooth) * ops.log(1.0 - p))
            per_column = (w[:, 1] * y + w[:, 0] * (1.0 - y)) * ce
        return ops.mean(per_column, axis=-1)

    def get_config(self):
        return {**super().get_config(), "class_weights": self.class_weights, "epsilon": self.epsilon,
                "mode": self.mode, "weight_by": self.weight_by}


# ---------------------------------------------------------------------------
# Shadow loss (Khan et al., arXiv 2311.14012; SPECS.md section 1)


@keras.saving.register_keras_serializable(package="kfundus")
class ShadowLoss(keras.losses.Loss):
    """Shadow loss on embeddings, with in-batch mining for multi-label targets.

    For an anchor ``a`` and another embedding ``x`` of the batch, the shadow of ``x`` on
    ``a``'s direction is ``proj_a(x) = a.x / |a|`` and its distance to the anchor is
    ``delta_a(x) = | |a| - proj_a(x) |``. For a positive ``p`` and negative ``n``:
    ``L = max(delta_a(p) - delta_a(n) + margin, 0)``. On L2-normalised embeddings
    ``delta_a(x) = 1 - cos(a, x)``, so ``L = max(cos(a, n) - cos(a, p) + margin, 0)``, the
    cosine triplet loss.

    Mining (multi-label ``y_true``, one multi-hot row per sample): ``x`` is a positive of
    anchor ``a`` when they share at least one label, a negative when they share none (a
    sample is never its own positive or negative). The paper publishes no code and does
    not say how triplets are drawn; kfundus uses batch-hard mining (Hermans et al. 2017):
    per anchor, the positive with the largest ``delta`` and the negative with the smallest.
    This needs one ``batch x batch`` matrix of shadows (``E E^T / |E|``) and then one
    number per anchor, never a ``batch^3`` tensor of triplets. Anchors without a positive
    or without a negative in the batch contribute nothing; the loss is the mean over the
    anchors that have both (0 when none has).

    Args:
        margin: the margin ``m`` (>= 0).

    Example:

    >>> loss = ShadowLoss(margin=0.5)
    >>> y = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    >>> e = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    >>> float(loss(y, e))  # each anchor: positive at cosine 0, negative at 1 or 0
    1.0
    """

    def __init__(self, margin: float = 0.5, name: str = "shadow", **kwargs):
        super().__init__(name=name, **kwargs)
        if float(margin) < 0:
            raise ConfigError(f"Shadow loss margin={margin}: must be >= 0")
        self.margin = float(margin)

    def call(self, y_true, y_pred):
        e = ops.cast(y_pred, "float32")                      # (B, D)
        y = ops.cast(ops.greater(ops.cast(y_true, "float32"), 0.5), "float32")  # (B, L) multi-hot
        norm = ops.sqrt(ops.sum(ops.square(e), axis=-1) + 1e-12)             # |a|, (B,)
        shadow = ops.matmul(e, ops.transpose(e)) / norm[:, None]            # proj_a(x), (B, B)
        delta = ops.abs(norm[:, None] - shadow)                              # (B, B)
        not_self = ops.logical_not(ops.cast(ops.eye(ops.shape(e)[0]), "bool"))
        shared = ops.greater(ops.matmul(y, ops.transpose(y)), 0.5)
        positive = ops.logical_and(shared, not_self)
        negative = ops.logical_and(ops.logical_not(shared), not_self)
        hardest_positive = ops.max(ops.where(positive, delta, 0.0), axis=1)  # delta >= 0
        big = ops.max(delta) + 1.0
        hardest_negative = ops.min(ops.where(negative, delta, big), axis=1)
        valid = ops.logical_and(ops.any(positive, axis=1), ops.any(negative, axis=1))
        per_anchor = ops.relu(hardest_positive - hardest_negative + self.margin)
        per_anchor = ops.where(valid, per_anchor, 0.0)
        # Keras averages over the batch; rescale so that the average is over valid anchors.
        count = ops.sum(ops.cast(valid, "float32"))
        batch = ops.cast(ops.shape(e)[0], "float32")
        return per_anchor * batch / ops.maximum(count, 1.0)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}
