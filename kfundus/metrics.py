"""Metrics for retinal classification: ODIR score, quadratic kappa, per-class reports.

Every function here is a pure function of ``(y_true, y_score)`` in the manner of
``sklearn.metrics``: no hidden state, numpy in, plain Python out. Reports are
JSON-serialisable dicts (see ``to_jsonable``).

Conventions, shared by every function:

- **Label layouts.** Multi-label ``y_true`` is an ``(N, K)`` 0/1 matrix. Multi-class
  ``y_true`` is either class indices ``(N,)`` or a one-hot ``(N, K)`` matrix. Scores
  ``y_prob`` are ``(N, K)`` probabilities (a binary task also accepts ``(N,)``).
- **Thresholds.** A sample is called positive when its probability is *strictly above*
  the class threshold (``prob > threshold``), the convention of the official ODIR script.
  ``choose_thresholds`` returns midpoints between observed scores, so its thresholds
  give the same predictions under ``>`` and ``>=``.
- **Undefined values.** A class with no positives or no negatives in ``y_true`` has no
  ROC curve: its AUROC and AP are NaN, and so are sensitivity (no positives) or
  specificity (no negatives). Such classes are left out of every macro mean, and reports
  give their number (``n_classes_excluded``) and names (``excluded_classes``). NaN
  becomes ``None`` in the JSON reports.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from kfundus.errors import ConfigError, DataError
from kfundus.labels import ODIR_LABELS

TASKS = ("multilabel", "multiclass", "binary")
THRESHOLD_METHODS = ("youden", "f1", "fixed")


# ---------------------------------------------------------------------------
# Helpers


def to_jsonable(obj):
    """Convert a metrics result to plain JSON types.

    numpy scalars become Python numbers, arrays become lists, NaN and infinities become
    ``None``, paths become strings, DataFrames become lists of row dicts.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, pd.DataFrame):
        return to_jsonable(obj.to_dict(orient="records"))
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def _nanmean(values) -> float:
    """Mean of the finite values; NaN (without a warning) when there are none."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def _check_scores(y_prob, name="y_prob") -> np.ndarray:
    try:
        y_prob = np.asarray(y_prob, dtype=float)
    except (TypeError, ValueError) as err:
        raise DataError(f"{name} must be numeric probabilities: {err}") from None
    if not np.all(np.isfinite(y_prob)):
        bad = np.unique(np.argwhere(~np.isfinite(y_prob))[:, 0])
        raise DataError(
            f"{name} has NaN or infinite values in {bad.size} row(s), first row {bad[0]}; "
            "check the model outputs (a diverged model or a failed image read)."
        )
    return y_prob


def multilabel_arrays(y_true, y_prob, labels=None):
    """``(N, K)`` 0/1 ground truth and ``(N, K)`` float scores, validated.

    A 1-D ``y_prob`` is one binary column. A 1-D ``y_true`` next to a K-column
    ``y_prob`` (K > 1) is read as class indices and one-hot encoded.
    """
    y_prob = _check_scores(y_prob)
    if y_prob.ndim == 1:
        y_prob = y_prob[:, None]
    if y_prob.ndim != 2:
        raise DataError(f"y_prob must be (N, K); got shape {y_prob.shape}.")
    y_true = np.asarray(y_true)
    if y_true.ndim == 1 and y_prob.shape[1] > 1:
        y_true = indices_to_onehot(y_true, y_prob.shape[1])
    elif y_true.ndim == 1:
        y_true = y_true[:, None]
    if y_true.shape != y_prob.shape:
        raise DataError(
            f"y_true has shape {y_true.shape} but y_prob has {y_prob.shape}; "
            "pass one row per sample and one column per label in both."
        )
    if not np.isin(y_true, (0, 1)).all():
        raise DataError(f"y_true must be 0/1 labels; found values {np.unique(y_true)[:10].tolist()}.")
    if labels is not None and len(labels) != y_prob.shape[1]:
        raise DataError(
            f"{len(labels)} labels given for {y_prob.shape[1]} columns of y_prob; "
            "pass one label name per output column."
        )
    return y_true.astype(int), y_prob


def indices_to_onehot(y, n_classes: int) -> np.ndarray:
    y = np.asarray(y)
    if y.size and (y.dtype.kind not in "biuf" or np.any(y != np.round(y))):
        raise DataError("y_true class indices must be integers 0..K-1.")
    y = y.astype(int)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise DataError(
            f"y_true has class index {int(y.max()) if y.max() >= n_classes else int(y.min())}"
            f" outside 0..{n_classes - 1}; labels and model outputs disagree."
        )
    return np.eye(n_classes, dtype=int)[y]


def class_indices(y, name="y_true") -> np.ndarray:
    """Class indices from indices ``(N,)`` or a one-hot / probability matrix (argmax)."""
    y = np.asarray(y)
    if y.ndim == 2:
        return _check_scores(y, name).argmax(axis=1)
    if y.ndim != 1:
        raise DataError(f"{name} must be class indices (N,) or a matrix (N, K); got {y.shape}.")
    if y.size and (y.dtype.kind not in "biuf" or np.any(y != np.round(y))):
        raise DataError(f"{name} class indices must be integers; got {y[:5].tolist()}...")
    return y.astype(int)


def thresholds_vector(thresholds, n_classes: int) -> np.ndarray:
    if thresholds is None:
        return np.full(n_classes, 0.5)
    thresholds = np.asarray(thresholds, dtype=float)
    if thresholds.ndim == 0:
        return np.full(n_classes, float(thresholds))
    if thresholds.shape != (n_classes,):
        raise DataError(
            f"thresholds has {thresholds.size} values for {n_classes} classes; "
            "pass one per class (or one number for all)."
        )
    return thresholds


def apply_thresholds(y_prob, thresholds=None) -> np.ndarray:
    """0/1 predictions ``y_prob > thresholds`` (per column; default 0.5)."""
    y_prob = _check_scores(y_prob)
    squeeze = y_prob.ndim == 1
    y_prob = y_prob[:, None] if squeeze else y_prob
    pred = (y_prob > thresholds_vector(thresholds, y_prob.shape[1])).astype(int)
    return pred[:, 0] if squeeze else pred


# ---------------------------------------------------------------------------
# ODIR


def odir_score(y_true, y_prob, threshold: float = 0.5) -> dict:
    """The official ODIR-5K score.

    As in the organisers' script: the ``patients x 8`` matrices are flattened;
    ``kappa = cohen_kappa_score(gt, pr > threshold)``,
    ``f1 = f1_score(gt, pr > threshold, average="micro")`` (on a flat binary vector this is
    element-wise accuracy), ``auc = roc_auc_score(gt, pr)`` on one pooled curve, and
    ``final`` their mean. The pooled AUC differs from the macro mean of per-class AUROCs
    that papers sometimes report; ``multilabel_report`` gives both.

    Args:
        y_true: ``(N, 8)`` 0/1 patient labels in ``ODIR_LABELS`` order (N, D, G, C, A, H, M, O).
        y_prob: ``(N, 8)`` probabilities, same order.
        threshold: decision threshold, 0.5 in the challenge.

    Returns:
        dict with float ``kappa``, ``f1``, ``auc`` and ``final``. When the pooled ground
        truth has a single class, ``auc`` (and so ``final``) is NaN.
    """
    y_true, y_prob = np.asarray(y_true), _check_scores(y_prob)
    n_labels = len(ODIR_LABELS)
    for name, arr in (("y_true", y_true), ("y_prob", y_prob)):
        if arr.ndim != 2 or arr.shape[1] != n_labels:
            raise DataError(
                f"odir_score needs {name} of shape (patients, {n_labels}) in the order "
                f"{','.join(ODIR_LABELS)}; got {arr.shape}."
            )
    if y_true.shape != y_prob.shape:
        raise DataError(f"y_true {y_true.shape} and y_prob {y_prob.shape} differ in rows.")
    gt, pr = y_true.flatten().astype(int), y_prob.flatten()
    kappa = cohen_kappa_score(gt, pr > threshold)
    f1 = f1_score(gt, pr > threshold, average="micro")
    auc = roc_auc_score(gt, pr) if np.unique(gt).size == 2 else float("nan")
    return {
        "kappa": float(kappa),
        "f1": float(f1),
        "auc": float(auc),
        "final": float((kappa + f1 + auc) / 3.0),
    }


def write_odir_submission(ids, y_prob, path, labels=ODIR_LABELS) -> Path:
    """Write probabilities as an ODIR submission CSV (``ID,N,D,G,C,A,H,M,O``).

    Args:
        ids: one patient ID per row of ``y_prob`` (unique).
        y_prob: ``(N, 8)`` probabilities in ``labels`` order.
        path: the CSV to write (parent folders are created).
        labels: column names after ``ID``; the ODIR labels by default.

    Returns:
        The path written.
    """
    ids = [str(i) for i in ids]
    y_prob = _check_scores(y_prob)
    if y_prob.ndim != 2 or y_prob.shape != (len(ids), len(labels)):
        raise DataError(
            f"write_odir_submission got {len(ids)} IDs and y_prob of shape {y_prob.shape}; "
            f"it needs ({len(ids)}, {len(labels)})."
        )
    duplicated = pd.Series(ids).duplicated()
    if duplicated.any():
        raise DataError(
            f"patient ID {ids[int(np.argmax(duplicated))]!r} appears twice; a submission has one row per patient."
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", *labels])
        for pid, row in zip(ids, y_prob):
            writer.writerow([pid, *(f"{p:.6f}" for p in row)])
    return path


# ---------------------------------------------------------------------------
# Kappa and thresholds


def quadratic_kappa(y_true, y_pred, n_classes: int | None = None) -> float:
    """Quadratic weighted Cohen's kappa, for ordinal grades (DR 0-4).

    ``cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=range(K))``. The
    explicit ``labels`` matter: scikit-learn weights disagreements by the *position* of
    a grade among the labels it sees, so a grade absent from both vectors would shrink
    the distances between the others. Here the weight of (i, j) is always ``(i - j)**2``.

    Args:
        y_true: grades ``(N,)``, or a one-hot / probability matrix ``(N, K)`` (argmax).
        y_pred: same forms as ``y_true``.
        n_classes: number of grades K; by default the matrix width, else max grade + 1.

    Returns:
        The kappa as a float; NaN when it is undefined (both raters use one grade only).
    """
    widths = [np.asarray(y).shape[1] for y in (y_true, y_pred) if np.ndim(y) == 2]
    a, b = class_indices(y_true, "y_true"), class_indices(y_pred, "y_pred")
    if a.shape != b.shape:
        raise DataError(f"y_true has {a.size} samples but y_pred has {b.size}.")
    if n_classes is None:
        n_classes = max(widths + [int(max(a.max(initial=0), b.max(initial=0))) + 1])
    return float(cohen_kappa_score(a, b, weights="quadratic", labels=np.arange(n_classes)))


def _ranked_counts(y, score):
    """Candidate thresholds and the TP / FP counts that ``score > threshold`` gives.

    One candidate per distinct score: the midpoint to the next lower score (just below
    the lowest score for the last one), so each candidate calls every sample scoring at
    or above that distinct value positive.
    """
    order = np.argsort(-score, kind="mergesort")
    s, y = score[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[last]
    fps = np.cumsum(1 - y)[last]
    upper = s[last]
    lower = np.r_[s[last[:-1] + 1], np.nextafter(s[-1], -np.inf)]
    # The midpoint of two adjacent floats rounds to one of them; stay below ``upper``.
    return np.minimum((upper + lower) / 2.0, np.nextafter(upper, -np.inf)), tps, fps


def choose_thresholds(y_true, y_prob, method: str = "youden", fixed: float = 0.5) -> np.ndarray:
    """One decision threshold per class, chosen on validation data (never on test).

    Args:
        y_true: ``(N, K)`` 0/1 labels (or ``(N,)`` for one binary column).
        y_prob: ``(N, K)`` probabilities.
        method: ``"youden"`` maximises sensitivity + specificity - 1 (Youden's J);
            ``"f1"`` maximises the class F1; ``"fixed"`` uses ``fixed`` for every class.
            Ties go to the highest threshold.
        fixed: the threshold of ``"fixed"``, and the fallback for classes without both
            positives and negatives in ``y_true`` (nothing to choose from): 0.5 by default.

    Returns:
        ``(K,)`` float array of thresholds, applied as ``prob > threshold``.
    """
    if method not in THRESHOLD_METHODS:
        raise ConfigError(f"threshold method {method!r} is unknown; use one of {', '.join(THRESHOLD_METHODS)}.")
    y_true, y_prob = multilabel_arrays(y_true, y_prob)
    out = np.full(y_prob.shape[1], float(fixed))
    if method == "fixed":
        return out
    for k in range(y_prob.shape[1]):
        y, p = y_true[:, k], y_prob[:, k]
        n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
        if n_pos == 0 or n_neg == 0:
            continue
        cand, tps, fps = _ranked_counts(y, p)
        if method == "youden":
            objective = tps / n_pos - fps / n_neg
        else:
            objective = 2 * tps / (tps + fps + n_pos)
        out[k] = cand[int(np.argmax(objective))]
    return out


# ---------------------------------------------------------------------------
# Reports


def _binary_counts(y, pred):
    tp = int(np.sum((y == 1) & (pred == 1)))
    fp = int(np.sum((y == 0) & (pred == 1)))
    fn = int(np.sum((y == 1) & (pred == 0)))
    tn = int(np.sum((y == 0) & (pred == 0)))
    return tp, fp, fn, tn


def _ratio(num, den) -> float:
    return num / den if den else float("nan")


def _binary_kappa(tp, fp, fn, tn) -> float:
    n = tp + fp + fn + tn
    if n == 0:
        return float("nan")
    observed = (tp + tn) / n
    expected = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / n**2
    return _ratio(observed - expected, 1.0 - expected)


def per_class_metrics(y_true, y_prob, labels, thresholds=None) -> pd.DataFrame:
    """One row of metrics per class of a multi-label (or binary) problem.

    Args:
        y_true: ``(N, K)`` 0/1 labels.
        y_prob: ``(N, K)`` probabilities.
        labels: K class names.
        thresholds: None (0.5), one number, or K numbers; ``prob > threshold`` is positive.

    Returns:
        DataFrame with columns ``label, support`` (positives), ``n_negative, auroc, ap,
        threshold, sensitivity, specificity, precision, f1, kappa`` (Cohen's, at the
        threshold). Undefined values are NaN: AUROC and AP without both positives and
        negatives, sensitivity without positives, specificity without negatives,
        precision without predicted positives, F1 with neither positives nor
        predicted positives.
    """
    y_true, y_prob = multilabel_arrays(y_true, y_prob, labels)
    thresholds = thresholds_vector(thresholds, y_prob.shape[1])
    pred = apply_thresholds(y_prob, thresholds)
    rows = []
    for k, label in enumerate(labels):
        y, p = y_true[:, k], y_prob[:, k]
        tp, fp, fn, tn = _binary_counts(y, pred[:, k])
        both = 0 < y.sum() < y.size
        rows.append(
            {
                "label": str(label),
                "support": tp + fn,
                "n_negative": fp + tn,
                "auroc": float(roc_auc_score(y, p)) if both else float("nan"),
                "ap": float(average_precision_score(y, p)) if both else float("nan"),
                "threshold": float(thresholds[k]),
                "sensitivity": _ratio(tp, tp + fn),
                "specificity": _ratio(tn, tn + fp),
                "precision": _ratio(tp, tp + fp),
                "f1": _ratio(2 * tp, 2 * tp + fp + fn),
                "kappa": _binary_kappa(tp, fp, fn, tn),
            }
        )
    return pd.DataFrame(rows)


def multilabel_report(y_true, y_prob, labels, thresholds=None) -> dict:
    """Per-class and averaged metrics of a multi-label problem.

    Macro means are over the classes with both positives and negatives in ``y_true``
    (the same set for every metric); the others are listed in ``excluded_classes``.
    ``micro_auroc`` is one ROC curve over all (sample, class) pairs. When ``labels`` are
    the ODIR labels the official ODIR score (at 0.5, whatever ``thresholds`` say) is
    added as ``odir``.

    Args:
        y_true: ``(N, K)`` 0/1 labels.
        y_prob: ``(N, K)`` probabilities.
        labels: K class names.
        thresholds: None (0.5), one number, or K numbers (see ``choose_thresholds``).

    Returns:
        JSON-serialisable dict: ``task, labels, n_samples, thresholds, per_class`` (list
        of row dicts from ``per_class_metrics``), ``macro_auroc, macro_ap,
        macro_sensitivity, macro_specificity, macro_f1, micro_auroc,
        n_classes_excluded, excluded_classes`` and, for ODIR, ``odir``.
    """
    y_true, y_prob = multilabel_arrays(y_true, y_prob, labels)
    table = per_class_metrics(y_true, y_prob, labels, thresholds)
    valid = ((table["support"] > 0) & (table["n_negative"] > 0)).to_numpy()
    flat = y_true.ravel()
    report = {
        "task": "multilabel",
        "labels": [str(x) for x in labels],
        "n_samples": int(y_true.shape[0]),
        "thresholds": table["threshold"].tolist(),
        "per_class": table.to_dict(orient="records"),
    }
    for name in ("auroc", "ap", "sensitivity", "specificity", "f1"):
        report[f"macro_{name}"] = _nanmean(table[name].to_numpy()[valid])
    report["micro_auroc"] = float(roc_auc_score(flat, y_prob.ravel())) if 0 < flat.sum() < flat.size else float("nan")
    report["n_classes_excluded"] = int((~valid).sum())
    report["excluded_classes"] = table["label"][~valid].tolist()
    if [str(x) for x in labels] == ODIR_LABELS:
        report["odir"] = odir_score(y_true, y_prob)
    return to_jsonable(report)


def binary_report(y_true, y_prob, labels=None, threshold=None) -> dict:
    """Kappa, F1, sensitivity, specificity and AUC of a binary problem (the FLAIR set).

    The multi-label path with one column, so the numbers match ``multilabel_report``.

    Args:
        y_true: 0/1 labels ``(N,)`` or ``(N, 1)``, or one-hot ``(N, 2)`` (column 1 positive).
        y_prob: positive-class probabilities ``(N,)`` or ``(N, 1)``, or softmax ``(N, 2)``.
        labels: the positive class name (a list of one), or ``[negative, positive]``;
            default ``["positive"]``.
        threshold: decision threshold (``prob > threshold``), default 0.5.

    Returns:
        The ``multilabel_report`` dict (``task`` set to ``"binary"``) plus, lifted from its
        single class, ``auroc, ap, kappa, f1, sensitivity, specificity, precision,
        threshold, support, n_negative``.
    """
    y_true, y_prob = np.asarray(y_true), _check_scores(y_prob)
    if y_prob.ndim == 2 and y_prob.shape[1] == 2:
        y_prob = y_prob[:, 1]
    if y_true.ndim == 2 and y_true.shape[1] == 2:
        y_true = y_true[:, 1]
    if y_prob.ndim == 2 and y_prob.shape[1] != 1:
        raise DataError(f"binary_report needs one probability column; got {y_prob.shape}.")
    labels = ["positive"] if labels is None else [str(x) for x in labels][-1:]
    report = multilabel_report(
        np.reshape(y_true, (-1, 1)),
        np.reshape(y_prob, (-1, 1)),
        labels,
        None if threshold is None else [float(np.ravel(threshold)[0])],
    )
    report["task"] = "binary"
    for key in (
        "auroc",
        "ap",
        "kappa",
        "f1",
        "sensitivity",
        "specificity",
        "precision",
        "threshold",
        "support",
        "n_negative",
    ):
        report[key] = report["per_class"][0][key]
    return report


def multiclass_report(y_true, y_prob, labels, ordinal: bool = False) -> dict:
    """Metrics of a single-label problem with K classes (OCT classes, DR grades).

    The prediction is the argmax of ``y_prob``. AUROC is one-vs-rest per class; classes
    absent from ``y_true`` (or present in every row) have NaN AUROC and are left out of
    ``macro_auroc``. Balanced accuracy is the mean recall over the classes present in
    ``y_true``. ``macro_f1`` averages over all K classes (scikit-learn's convention).

    Args:
        y_true: class indices ``(N,)`` or one-hot ``(N, K)``.
        y_prob: ``(N, K)`` probabilities (or logits: only order matters).
        labels: K class names, in column order.
        ordinal: add ``quadratic_kappa`` (grades such as DR 0-4).

    Returns:
        JSON-serialisable dict: ``task, labels, n_samples, accuracy, balanced_accuracy,
        macro_f1, macro_auroc, n_classes_excluded, excluded_classes, confusion_matrix``
        (rows true, columns predicted), ``per_class`` (label, support, precision, recall,
        f1, auroc) and ``quadratic_kappa`` when ``ordinal``.
    """
    y_prob = _check_scores(y_prob)
    if y_prob.ndim != 2 or y_prob.shape[1] != len(labels):
        raise DataError(f"y_prob must be (N, {len(labels)}) for {len(labels)} labels; got {y_prob.shape}.")
    k = len(labels)
    onehot = indices_to_onehot(class_indices(y_true), k)
    if onehot.shape[0] != y_prob.shape[0]:
        raise DataError(f"y_true has {onehot.shape[0]} samples but y_prob has {y_prob.shape[0]}.")
    y, pred = onehot.argmax(axis=1), y_prob.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=np.arange(k))
    support, predicted, tp = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    per_class = []
    for c, label in enumerate(labels):
        both = 0 < support[c] < y.size
        f1 = _ratio(2 * tp[c], support[c] + predicted[c])
        per_class.append(
            {
                "label": str(label),
                "support": int(support[c]),
                "precision": _ratio(tp[c], predicted[c]),
                "recall": _ratio(tp[c], support[c]),
                "f1": 0.0 if math.isnan(f1) else f1,
                "auroc": float(roc_auc_score(onehot[:, c], y_prob[:, c])) if both else float("nan"),
            }
        )
    recalls = [r["recall"] for r in per_class]
    aurocs = np.array([r["auroc"] for r in per_class])
    report = {
        "task": "multiclass",
        "labels": [str(x) for x in labels],
        "n_samples": int(y.size),
        "accuracy": _ratio(int(tp.sum()), int(y.size)),
        "balanced_accuracy": _nanmean(recalls),
        "macro_f1": float(np.mean([r["f1"] for r in per_class])),
        "macro_auroc": _nanmean(aurocs),
        "n_classes_excluded": int(np.isnan(aurocs).sum()),
        "excluded_classes": [r["label"] for r in per_class if math.isnan(r["auroc"])],
        "confusion_matrix": cm.tolist(),
        "per_class": per_class,
    }
    if ordinal:
        report["quadratic_kappa"] = quadratic_kappa(y, pred, n_classes=k)
    return to_jsonable(report)


def evaluate_predictions(y_true, y_prob, labels, task: str, thresholds=None, ordinal: bool = False) -> dict:
    """The report of one task, as the evaluation module writes it.

    Args:
        y_true: ground truth in the layout of ``task`` (see the module docstring).
        y_prob: model probabilities.
        labels: class names, one per output column.
        task: ``"multilabel"``, ``"multiclass"`` or ``"binary"``.
        thresholds: per-class thresholds for multilabel / binary (default 0.5); ignored
            for multiclass (argmax).
        ordinal: multiclass only: add the quadratic weighted kappa.

    Returns:
        A JSON-serialisable dict from ``multilabel_report``, ``multiclass_report`` or
        ``binary_report``.
    """
    if task == "multilabel":
        return multilabel_report(y_true, y_prob, labels, thresholds)
    if task == "multiclass":
        return multiclass_report(y_true, y_prob, labels, ordinal=ordinal)
    if task == "binary":
        return binary_report(y_true, y_prob, labels, thresholds)
    raise ConfigError(f"task {task!r} is unknown; use one of {', '.join(TASKS)}.")
