"""Weighted label smoothing (WLSRL; Kaloi et al., iCoMET 2023), the dual-stream system's loss."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kfundus.errors import ConfigError


@keras.saving.register_keras_serializable(package="kfundus")
class WeightedLabelSmoothingLoss(keras.losses.Loss):
    """Weighted label-smoothing loss (WLSRL) on probabilities, for softmax and sigmoid heads.

    The paper does not publish its formula; this combines label smoothing with class
    weights from the training split. With ``eps`` = ``epsilon``, K
    classes, one-hot ``y``, probabilities ``p`` and the smoothed target
    ``y'_k = (1 - eps) * y_k + eps / K``:

    - ``weight_by="sample"`` (default): each sample is weighted by its true class's weight,
      and the smoothed target stays a distribution::

          loss = (sum_k w_k y_k) * sum_k y'_k * -log(p_k)

    - ``weight_by="class"``: the form most often written, each class term weighted::

          loss = sum_k w_k * y'_k * -log(p_k)

      Its minimiser is ``p_k ~ w_k y'_k``, not ``y'``: the smoothing mass ``eps / K`` of a
      rare class is multiplied by its large weight, so a common-class image is pushed
      towards rare classes (with weights 0.3 and 10 and eps = 0.1 the argmax can flip).
      The dual-stream ablation in the docs (results) measures both.

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

    def __init__(self, class_weights, epsilon=0.1, mode="categorical", weight_by="sample", name="wlsr", **kwargs):
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
            raise ConfigError(
                f"WLSRL class_weights={class_weights!r}: give finite, non-negative weights "
                "(K of them for 'categorical', (w0, w1) pairs for 'binary')"
            )
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
        return {
            **super().get_config(),
            "class_weights": self.class_weights,
            "epsilon": self.epsilon,
            "mode": self.mode,
            "weight_by": self.weight_by,
        }
