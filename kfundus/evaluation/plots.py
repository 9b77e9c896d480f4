"""Evaluation plots written as PNG files: ROC and PR curves, confusion matrices, training curves.

Figures are drawn on matplotlib's Agg canvas directly (``matplotlib.figure.Figure``, no
``pyplot``): nothing needs a display, the global backend of the user's session is left
alone, and no figure outlives the call. Every function returns the path it wrote and
creates the parent folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from kfundus.errors import DataError
from kfundus.metrics import (
    apply_thresholds,
    class_indices,
    indices_to_onehot,
    multilabel_arrays,
    thresholds_vector,
)

_DPI = 120
_LINESTYLES = ("-", "--", "-.", ":")


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _style(k: int) -> dict:
    """Distinct colour / line style for curve k (10 colours x 4 styles)."""
    return {"color": f"C{k % 10}", "linestyle": _LINESTYLES[(k // 10) % len(_LINESTYLES)]}


def _place_legend(ax, handles, corner: str) -> None:
    """Legend inside ``corner`` for a few entries, beside the axes for many (RFMiD)."""
    if len(handles) <= 10:
        ax.legend(handles=handles, loc=corner, fontsize="small")
    else:
        ax.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            fontsize="x-small",
            ncol=1 + len(handles) // 25,
            frameon=False,
        )


def _curves(y_true, y_prob, labels, path, title, kind):
    """ROC (kind="roc") or precision-recall (kind="pr") curves, one per class."""
    y_true, y_prob = multilabel_arrays(y_true, y_prob, labels)
    fig = new_figure(7.0, 6.0)
    ax = fig.add_subplot()
    handles = []
    for k, label in enumerate(labels):
        y, p = y_true[:, k], y_prob[:, k]
        n_pos = int(y.sum())
        if n_pos in (0, y.size):
            missing = "positives" if n_pos == 0 else "negatives"
            handles.append(Line2D([], [], color="none", label=f"{label}: no {missing}, skipped"))
            continue
        if kind == "roc":
            fpr, tpr, _ = roc_curve(y, p)
            (line,) = ax.plot(fpr, tpr, **_style(k), label=f"{label} (AUROC {roc_auc_score(y, p):.3f}, n+={n_pos})")
        else:
            precision, recall, _ = precision_recall_curve(y, p)
            (line,) = ax.step(
                recall,
                precision,
                where="post",
                **_style(k),
                label=f"{label} (AP {average_precision_score(y, p):.3f}, n+={n_pos})",
            )
        handles.append(line)
    if kind == "roc":
        handles.append(ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")[0])
        ax.set(xlabel="False positive rate (1 - specificity)", ylabel="True positive rate (sensitivity)")
    else:
        ax.set(xlabel="Recall (sensitivity)", ylabel="Precision")
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.02),
        title=title or ("ROC curves" if kind == "roc" else "Precision-recall curves"),
    )
    ax.grid(alpha=0.3)
    _place_legend(ax, handles, "lower right" if kind == "roc" else "best")
    return save_figure(fig, path)


def plot_roc_curves(y_true, y_prob, labels, path, title=None) -> Path:
    """One ROC curve per class with its AUROC in the legend, and the chance diagonal.

    Classes without both positives and negatives in ``y_true`` have no ROC curve: they
    are listed in the legend as skipped.

    Args:
        y_true: ``(N, K)`` 0/1 labels, or class indices ``(N,)`` (one-vs-rest curves).
        y_prob: ``(N, K)`` probabilities (``(N,)`` for one binary column).
        labels: K class names.
        path: the PNG to write.
        title: figure title; "ROC curves" by default.

    Returns:
        The path written.
    """
    return _curves(y_true, y_prob, labels, path, title, "roc")


def plot_pr_curves(y_true, y_prob, labels, path, title=None) -> Path:
    """One precision-recall curve per class with its average precision (AP) in the legend.

    Classes without both positives and negatives are skipped and listed as such (their
    AP is NaN in ``kfundus.metrics``). The chance level of a class is its prevalence.

    Args:
        y_true: ``(N, K)`` 0/1 labels, or class indices ``(N,)`` (one-vs-rest curves).
        y_prob: ``(N, K)`` probabilities (``(N,)`` for one binary column).
        labels: K class names.
        path: the PNG to write.
        title: figure title; "Precision-recall curves" by default.

    Returns:
        The path written.
    """
    return _curves(y_true, y_prob, labels, path, title, "pr")


def _draw_matrix(ax, counts, colour, tick_labels, title, cmap="Blues"):
    image = ax.imshow(colour, cmap=cmap, vmin=0.0, vmax=1.0)
    n = counts.shape[0]
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                str(int(counts[i, j])),
                ha="center",
                va="center",
                fontsize="small" if n > 6 else "medium",
                color="white" if colour[i, j] > 0.6 else "black",
            )
    ax.set_xticks(range(n), tick_labels, rotation=45 if n > 2 else 0, ha="right" if n > 2 else "center")
    ax.set_yticks(range(n), tick_labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return image


def _row_normalised(counts) -> np.ndarray:
    rows = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)


def plot_confusion_matrices(y_true, y_prob, labels, path, task, thresholds=None) -> Path:
    """Confusion matrices: a 2x2 matrix per class, or one KxK matrix for multiclass.

    Cells show counts; the colour is the row-normalised fraction (the recall of each
    true class), so rare classes stay readable.

    Args:
        y_true: ``(N, K)`` 0/1 labels (multilabel / binary) or class indices / one-hot
            (multiclass).
        y_prob: ``(N, K)`` probabilities (``(N,)`` for binary).
        labels: K class names.
        path: the PNG to write.
        task: ``"multilabel"``, ``"binary"`` or ``"multiclass"`` (argmax prediction).
        thresholds: multilabel / binary: None (0.5), one number or K numbers;
            ``prob > threshold`` is positive.

    Returns:
        The path written.
    """
    if task == "multiclass":
        y_prob = np.asarray(y_prob, dtype=float)
        k = len(labels)
        if y_prob.ndim != 2 or y_prob.shape[1] != k:
            raise DataError(f"y_prob must be (N, {k}) for {k} labels; got {y_prob.shape}.")
        y = indices_to_onehot(class_indices(y_true), k).argmax(axis=1)
        pred = y_prob.argmax(axis=1)
        counts = np.zeros((k, k), dtype=int)
        np.add.at(counts, (y, pred), 1)
        side = max(4.5, 0.6 * k + 2.0)
        fig = new_figure(side + 1.0, side)
        ax = fig.add_subplot()
        image = _draw_matrix(
            ax,
            counts,
            _row_normalised(counts),
            [str(x) for x in labels],
            f"Confusion matrix (n={y.size}, accuracy {np.trace(counts) / max(y.size, 1):.3f})",
        )
        fig.colorbar(image, ax=ax, label="fraction of the true class")
        return save_figure(fig, path)
    if task not in ("multilabel", "binary"):
        raise DataError(f"task {task!r} is unknown; use multilabel, binary or multiclass.")
    if task == "binary":
        y_true, y_prob = np.asarray(y_true), np.asarray(y_prob, dtype=float)
        y_prob = y_prob[:, 1] if y_prob.ndim == 2 and y_prob.shape[1] == 2 else y_prob
        y_true = y_true[:, 1] if y_true.ndim == 2 and y_true.shape[1] == 2 else y_true
        labels = list(labels)[-1:]
    y_true, y_prob = multilabel_arrays(
        np.reshape(y_true, (len(y_true), -1)), np.reshape(y_prob, (len(y_prob), -1)), labels
    )
    thresholds = thresholds_vector(thresholds, y_prob.shape[1])
    pred = apply_thresholds(y_prob, thresholds)
    n = len(labels)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = new_figure(3.2 * ncols, 3.0 * nrows)
    for k, label in enumerate(labels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        counts = np.zeros((2, 2), dtype=int)
        np.add.at(counts, (y_true[:, k], pred[:, k]), 1)
        _draw_matrix(ax, counts, _row_normalised(counts), ["neg", "pos"], f"{label} (t={thresholds[k]:.2f})")
    fig.suptitle("Confusion matrices per class (rows: true, colour: row fraction)")
    fig.tight_layout()
    return save_figure(fig, path)


def _lower_is_better(name: str) -> bool:
    return any(word in name.lower() for word in ("loss", "error", "mse", "mae", "entropy"))


def plot_training_curves(history_csv, path) -> Path:
    """Training curves from a Keras ``CSVLogger`` file, one panel per metric.

    Each metric ``m`` with a ``val_m`` column gets one panel with both curves and a
    marker on the best validation epoch (lowest for losses and errors, highest
    otherwise); columns without a pair (``learning_rate``, ``lr``) get a panel of their
    own, on a log scale when positive. Epochs are drawn 1-based, as Keras prints them.
    When a resumed run appended epochs again, the last row of each epoch is kept.

    Args:
        history_csv: the CSV written by ``keras.callbacks.CSVLogger``.
        path: the PNG to write.

    Returns:
        The path written.
    """
    history_csv = Path(history_csv)
    if not history_csv.is_file():
        raise DataError(f"training log {history_csv} does not exist; train first (CSVLogger).")
    try:
        table = pd.read_csv(history_csv)
    except pd.errors.EmptyDataError:
        table = pd.DataFrame()
    if table.empty:
        raise DataError(f"training log {history_csv} has no epochs yet; train for one epoch first.")
    table = table.apply(pd.to_numeric, errors="coerce")
    if "epoch" in table.columns:
        table = table.drop_duplicates("epoch", keep="last").sort_values("epoch")
        epochs = table["epoch"].to_numpy() + 1
    else:
        epochs = np.arange(1, len(table) + 1)
    columns = [c for c in table.columns if c != "epoch" and table[c].notna().any()]
    names = [c for c in columns if not c.startswith("val_")]
    names += [c for c in columns if c.startswith("val_") and c[4:] not in columns]
    if not names:
        raise DataError(f"training log {history_csv} has no metric columns besides 'epoch'.")
    names.sort(key=lambda c: (c.removeprefix("val_") != "loss", c in ("learning_rate", "lr")))
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = new_figure(4.5 * ncols, 3.4 * nrows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        metric = name.removeprefix("val_")
        paired = metric in table.columns and f"val_{metric}" in table.columns
        for column, style in ((metric, "o-"), (f"val_{metric}", "s--")):
            if column in table.columns:
                label = ("validation" if column.startswith("val_") else "train") if paired else column
                ax.plot(epochs, table[column].to_numpy(), style, markersize=3, label=label)
        val = table.get(f"val_{metric}")
        if val is not None and val.notna().any():
            best = val.idxmin() if _lower_is_better(metric) else val.idxmax()
            ax.plot(
                epochs[table.index.get_loc(best)],
                val[best],
                "*",
                color="black",
                markersize=10,
                label=f"best {val[best]:.4g}",
            )
        values = table[name].to_numpy()
        if metric in ("learning_rate", "lr") and np.nanmin(values) > 0:
            ax.set_yscale("log")
        ax.set(title=metric, xlabel="epoch", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"Training history: {history_csv.name}")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_image_grid(rows: dict, path, title=None) -> Path:
    """A grid of images with captions: ``{row title: [(uint8 HxWx3, caption), ...]}``,
    one row per key (rows may have different lengths; empty rows say "none")."""
    columns = max([len(v) for v in rows.values()] + [1])
    fig = new_figure(2.2 * columns + 0.8, 2.4 * len(rows) + (0.4 if title else 0))
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for r, (row_title, items) in enumerate(rows.items()):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(items):
                image, caption = items[c]
                ax.imshow(image)
                ax.set_title(caption, fontsize=8)
            else:
                for side in ax.spines.values():
                    side.set_visible(False)
                if not items and c == 0:
                    ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
            if c == 0:
                ax.set_ylabel(row_title, fontsize=9)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_bars(names, values, path, *, ylabel: str, title: str) -> Path:
    """One bar per named value (a sweep's cells)."""
    fig = new_figure(max(4.0, 0.9 * len(names) + 2), 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(names)), np.asarray(values, dtype=float))
    ax.set_xticks(range(len(names)), list(names), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return save_figure(fig, path)


def plot_protocol_comparison(summary: pd.DataFrame, metrics, path, names=None) -> Path:
    """One panel per metric: mean ± std over folds (``<metric>_mean``, ``<metric>_std``
    columns), backbones on x, one marker per protocol (``names`` labels them)."""
    names = names or {}
    fig = new_figure(3.2 * len(metrics), 3.4)
    backbones = list(dict.fromkeys(summary["backbone"]))
    protocols = list(dict.fromkeys(summary["protocol"]))
    for j, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), j + 1)
        for k, protocol in enumerate(protocols):
            part = summary[summary["protocol"] == protocol].set_index("backbone").reindex(backbones)
            x = np.arange(len(backbones)) + (k - (len(protocols) - 1) / 2) * 0.18
            ax.errorbar(
                x,
                part[f"{metric}_mean"],
                yerr=part[f"{metric}_std"],
                fmt="o",
                capsize=3,
                color=f"C{k}",
                label=names.get(protocol, protocol),
            )
        ax.set_xticks(range(len(backbones)), backbones, rotation=20, fontsize=8)
        ax.set_xlim(-0.6, len(backbones) - 0.4)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
        if j == 0:
            ax.legend(fontsize="small")
    fig.suptitle("transfer protocols: mean ± std over folds", y=1.04)
    return save_figure(fig, path)
