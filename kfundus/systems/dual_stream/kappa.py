"""A streaming quadratic weighted kappa metric (Keras 3 has none; tensorflow-addons is gone)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kfundus")
class QuadraticWeightedKappa(keras.metrics.Metric):
    """Streaming quadratic weighted Cohen's kappa of argmax predictions (ordinal grades).

    Keeps the K x K confusion matrix ``O`` (rows true, columns predicted) over all batches;
    with ``E = outer(row sums, column sums) / sum(O)`` and ``W_ij = (i - j)**2``::

        kappa = 1 - sum(W * O) / sum(W * E)

    which is ``sklearn.metrics.cohen_kappa_score(weights="quadratic", labels=range(K))``
    and ``kfundus.metrics.quadratic_kappa``. Where kappa is undefined (``sum(W * E) = 0``:
    one grade only, in both truth and prediction) the metric returns 0, not NaN, so that
    a checkpoint monitor keeps working; scikit-learn returns NaN there.

    Args:
        num_classes: K.
        name: metric name.

    Example:

    >>> m = QuadraticWeightedKappa(3)
    >>> m.update_state([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[.8, .1, .1], [.1, .8, .1], [.1, .8, .1]])
    >>> round(float(m.result()), 4)
    0.8
    """

    def __init__(self, num_classes, name="qwk", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.confusion = self.add_variable(
            shape=(self.num_classes, self.num_classes), initializer="zeros", dtype="float32", name="confusion"
        )

    def _indices(self, y):
        y = ops.convert_to_tensor(y)
        if len(y.shape) >= 2 and y.shape[-1] == self.num_classes:
            return ops.argmax(y, axis=-1)
        return ops.cast(ops.reshape(y, (-1,)), "int32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        t = ops.one_hot(self._indices(y_true), self.num_classes, dtype="float32")
        p = ops.one_hot(self._indices(y_pred), self.num_classes, dtype="float32")
        if sample_weight is not None:
            t = t * ops.reshape(ops.cast(sample_weight, "float32"), (-1, 1))
        self.confusion.assign_add(ops.matmul(ops.transpose(t), p))

    def result(self):
        o = self.confusion
        k = ops.arange(self.num_classes, dtype="float32")
        w = ops.square(k[:, None] - k[None, :])
        total = ops.maximum(ops.sum(o), 1.0)
        e = ops.sum(o, axis=1)[:, None] * ops.sum(o, axis=0)[None, :] / total
        expected = ops.sum(w * e)
        return ops.where(expected > 0, 1.0 - ops.sum(w * o) / ops.maximum(expected, 1e-12), 0.0)

    def reset_state(self):
        self.confusion.assign(ops.zeros((self.num_classes, self.num_classes), dtype="float32"))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}
