"""Shadow loss (Khan et al., arXiv 2311.14012), the CLIP + LoRA system's metric-learning term."""

from __future__ import annotations

import keras
from keras import ops

from kfundus.errors import ConfigError


@keras.saving.register_keras_serializable(package="kfundus")
class ShadowLoss(keras.losses.Loss):
    """Shadow loss on L2-normalised embeddings, with in-batch mining for multi-label targets.

    For an anchor ``a`` and another embedding ``x`` of the batch, the shadow of ``x`` on
    ``a``'s direction is ``proj_a(x) = a.x / |a|`` and its distance to the anchor is
    ``delta_a(x) = | |a| - proj_a(x) |``. For a positive ``p`` and negative ``n``:
    ``L = max(delta_a(p) - delta_a(n) + margin, 0)``.

    The loss L2-normalises every embedding first (``e / |e|``), so ``|a| = 1``,
    ``delta_a(x) = 1 - cos(a, x)`` and ``L = max(cos(a, n) - cos(a, p) + margin, 0)``: the
    cosine triplet loss, whose margin is a difference of cosines whatever the scale of the
    model's ``embedding`` output (the concatenated class tokens have a norm near
    ``sqrt(d)``; on them the unnormalised form would make the margin a distance in those
    units). The model's output itself is left as it is, so saved models and exports do
    not change.

    Mining (multi-label ``y_true``, one multi-hot row per sample): ``x`` is a positive of
    anchor ``a`` when they share at least one label, a negative when they share none (a
    sample is never its own positive or negative). The paper publishes no code and does
    not say how triplets are drawn; kfundus uses batch-hard mining (Hermans et al. 2017):
    per anchor, the positive with the largest ``delta`` (lowest cosine) and the negative
    with the smallest (highest cosine). This needs one ``batch x batch`` matrix of cosines
    and then one number per anchor, never a ``batch^3`` tensor of triplets. Anchors
    without a positive or without a negative in the batch contribute nothing; the loss is
    the mean over the anchors that have both (0 when none has).

    Args:
        margin: the margin ``m`` (>= 0), a difference of cosines (so at most 2 matters).

    Example:

    >>> loss = ShadowLoss(margin=0.5)
    >>> y = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    >>> e = [[3.0, 0.0], [0.0, 5.0], [2.0, 0.0]]
    >>> float(loss(y, e))  # each anchor: positive at cosine 0, negative at 1 or 0
    1.0
    """

    def __init__(self, margin: float = 0.5, name: str = "shadow", **kwargs):
        super().__init__(name=name, **kwargs)
        if float(margin) < 0:
            raise ConfigError(f"Shadow loss margin={margin}: must be >= 0")
        self.margin = float(margin)

    def call(self, y_true, y_pred):
        e = ops.cast(y_pred, "float32")  # (B, D)
        y = ops.cast(ops.greater(ops.cast(y_true, "float32"), 0.5), "float32")  # (B, L) multi-hot
        # L2-normalise: |a| = 1, so proj_a(x) = cos(a, x) and delta_a(x) = 1 - cos(a, x)
        e = e / ops.sqrt(ops.sum(ops.square(e), axis=-1, keepdims=True) + 1e-12)
        shadow = ops.matmul(e, ops.transpose(e))  # proj_a(x) = cos(a, x), (B, B)
        delta = ops.abs(1.0 - shadow)  # | |a| - proj_a(x) |, (B, B)
        not_self = ops.logical_not(ops.cast(ops.eye(ops.shape(e)[0]), "bool"))
        shared = ops.greater(ops.matmul(y, ops.transpose(y)), 0.5)
        positive = ops.logical_and(shared, not_self)
        negative = ops.logical_and(ops.logical_not(shared), not_self)
        hardest_positive = ops.max(ops.where(positive, delta, 0.0), axis=1)  # delta >= 0
        hardest_negative = ops.min(ops.where(negative, delta, 3.0), axis=1)  # delta <= 2
        valid = ops.logical_and(ops.any(positive, axis=1), ops.any(negative, axis=1))
        per_anchor = ops.relu(hardest_positive - hardest_negative + self.margin)
        per_anchor = ops.where(valid, per_anchor, 0.0)
        # Keras averages over the batch; rescale so that the average is over valid anchors.
        count = ops.sum(ops.cast(valid, "float32"))
        batch = ops.cast(ops.shape(e)[0], "float32")
        return per_anchor * batch / ops.maximum(count, 1.0)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}
