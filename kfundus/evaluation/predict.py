"""Label probabilities of a model on a prepared (cached) dataset."""

from __future__ import annotations

import numpy as np

from kfundus.data.pipeline import make_dataset
from kfundus.objectives import primary_output


def predict_outputs(model, prepared, batch_size: int):
    """``model.predict`` over every row of ``prepared``, in order (an array, or a dict of
    named outputs)."""
    return model.predict(make_dataset(prepared, batch_size=batch_size, with_targets=False), verbose=0)


def predict(model, prepared, batch_size: int, primary: str | None = None) -> np.ndarray:
    """Label probabilities for every row of ``prepared`` (the ``primary`` output of a
    multi-output model)."""
    return primary_output(predict_outputs(model, prepared, batch_size), primary)
