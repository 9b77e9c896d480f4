"""CLIP's symmetric InfoNCE, the RET-CLIP system's loss (one term per branch)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kfundus")
class SymmetricInfoNCE(keras.losses.Loss):
    """CLIP's symmetric InfoNCE on a (batch, batch) logit matrix: the mean of the
    image-to-text cross-entropy (rows) and the text-to-image one (columns).

    ``y_true`` holds, for each row, the column of its match: ``range(batch)`` for aligned
    image-text batches (``kfundus.workflows.pretrain`` feeds exactly that); any permutation works.
    """

    def __init__(self, name="symmetric_infonce", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        logits = ops.cast(y_pred, "float32")
        rows = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        cols = ops.argsort(rows)  # the row whose match is column j
        image_to_text = keras.losses.sparse_categorical_crossentropy(rows, logits, from_logits=True)
        text_to_image = keras.losses.sparse_categorical_crossentropy(cols, ops.transpose(logits), from_logits=True)
        return 0.5 * (image_to_text + text_to_image)
