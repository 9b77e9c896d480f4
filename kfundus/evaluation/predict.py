"""Label probabilities of a model on a prepared (cached) dataset, and the decision columns
that ``predictions.csv`` (``kfundus evaluate``) and ``kfundus predict`` write per head."""

from __future__ import annotations

import numpy as np
import pandas as pd

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


def decision_columns(
    y_prob, labels, task: str, thresholds=None, *, prefix: str = "", prediction: str = "prediction"
) -> pd.DataFrame:
    """One head's columns: ``<prefix>prob_<label>`` and its decision.

    Args:
        y_prob: ``(N, K)`` probabilities of the head (NaN rows: not predicted).
        labels: its K label names.
        task: ``multiclass`` (softmax: the decision is the arg-max label, column
            ``prediction``) or ``multilabel`` / ``binary`` (sigmoid: per label a
            column ``<prefix>pred_<label>``, 1 when the probability is strictly above the
            label's threshold, as ``kfundus.metrics`` counts a positive).
        thresholds: one per label for sigmoid heads (None: 0.5).
        prefix: put before the probability and ``pred_`` column names (a head whose label
            names clash with another's).
        prediction: name of the arg-max column (``<head>_prediction`` for a second head).

    Returns:
        A DataFrame with the N rows (decisions of NaN rows are empty).
    """
    y_prob = np.asarray(y_prob, dtype=np.float64)
    y_prob = y_prob[:, None] if y_prob.ndim == 1 else y_prob
    labels = [str(x) for x in labels]
    missing = np.isnan(y_prob).any(axis=1)
    columns = {f"{prefix}prob_{label}": y_prob[:, k] for k, label in enumerate(labels)}
    if task == "multiclass":
        best = np.argmax(np.where(np.isnan(y_prob), -np.inf, y_prob), axis=1)
        columns[prediction] = ["" if m else labels[b] for m, b in zip(missing, best)]
    else:
        cut = np.full(len(labels), 0.5) if thresholds is None else np.asarray(thresholds, dtype=float)
        for k, label in enumerate(labels):
            decided = (y_prob[:, k] > cut[k]).astype(float)
            columns[f"{prefix}pred_{label}"] = pd.array(np.where(missing, np.nan, decided), dtype="Int64")
    return pd.DataFrame(columns)
