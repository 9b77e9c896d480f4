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
            raise ConfigError(
                f"train.loss={name!r} is for sigmoid (multi-label/binary) tasks; "
                "multi-class tasks use categorical cross-entropy (train.loss=bce)"
            )
        return keras.losses.CategoricalCrossentropy()
    if name == "weighted_bce":
        return WeightedBinaryCrossentropy(positive_weights(train_targets, pos_weight_cap))
    if name == "focal":
        return keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, gamma=focal_gamma)
    return keras.losses.BinaryCrossentropy()


# ---------------------------------------------------------------------------
# Class weights from training-split class counts

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
