"""The Manifest: one table that every dataset reader produces and every pipeline reads.

A Manifest wraps a pandas DataFrame with one row per eye (image column ``image``) or per
patient (``left_image`` and ``right_image``). Standard columns:

- ``image`` or ``left_image``/``right_image``: absolute image paths (str);
- ``patient_id`` (str): the unit that splits must keep together;
- ``eye``: ``"left"``, ``"right"`` or ``""`` when unknown (eye-level rows only);
- one integer 0/1 column per label, named as in ``labels`` (multi-class tasks are stored
  one-hot too, so every task yields a float target vector of length ``len(labels)``);
- ``source_row`` (readers of a label table): the row of the user's file the row came
  from, counting the header as row 1; every later message (splits, decoding) names it;
- optional: ``split`` (an official split of the source: train/val/test), ``text``
  (report-like text), ``keywords`` (ODIR per-eye keywords), ``grade`` (DR grade).

Rows left out on the way (a missing or unreadable image, an image too small, a row with
none of the selected labels) are kept in ``Manifest.skipped`` with the columns
:data:`SKIPPED_COLUMNS`; a training run writes them to its ``skipped.csv``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

TASKS = ("multilabel", "multiclass", "binary")
# The table of rows left out: the file row, the image, why (one word: missing, unreadable,
# too_small, no_label, other_eye_missing) and the detail.
SKIPPED_COLUMNS = ["source_row", "path", "reason", "detail"]


def skipped_rows(rows, paths, reason: str, details) -> pd.DataFrame:
    """A table of left-out rows (:data:`SKIPPED_COLUMNS`); ``rows`` may hold None (no file
    row), ``details`` one text or one per row."""
    paths = [str(p) for p in paths]
    rows = [None if r is None or (isinstance(r, float) and np.isnan(r)) else int(r) for r in rows]
    details = [details] * len(paths) if isinstance(details, str) else [str(d) for d in details]
    table = pd.DataFrame({"source_row": rows, "path": paths, "reason": reason, "detail": details})
    return table.astype({"source_row": "Int64"})[SKIPPED_COLUMNS]


def concat_skipped(*tables) -> pd.DataFrame:
    """Several skipped tables as one (:data:`SKIPPED_COLUMNS` first, other columns kept)."""
    parts = [t for t in tables if t is not None and len(t)]
    if not parts:
        return pd.DataFrame(columns=SKIPPED_COLUMNS)
    out = pd.concat(parts, ignore_index=True)
    for column in SKIPPED_COLUMNS:
        if column not in out.columns:
            out[column] = None
    return out[SKIPPED_COLUMNS + [c for c in out.columns if c not in SKIPPED_COLUMNS]]


@dataclasses.dataclass
class Manifest:
    """A dataset as a table plus what its label columns mean.

    Args:
        frame: the table, one row per eye or per patient (see the module docstring).
        labels: the label columns of ``frame``, in model-output order.
        task: ``"multilabel"`` (independent sigmoids), ``"multiclass"`` (one-hot, softmax)
            or ``"binary"`` (one column).
        name: the source it was read from (``"odir"``, ``"rfmid"``, ``"eyepacs"``, ...).
        skipped: rows the reader dropped (:data:`SKIPPED_COLUMNS`).
        source: the label file (or folder) the rows were read from, named in messages
            with ``source_row``.
    """

    frame: pd.DataFrame
    labels: list[str]
    task: str = "multilabel"
    name: str = ""
    skipped: pd.DataFrame = dataclasses.field(default_factory=lambda: pd.DataFrame(columns=SKIPPED_COLUMNS))
    source: str = ""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        missing = [c for c in self.labels if c not in self.frame.columns]
        if missing:
            raise ValueError(f"label columns {missing} are not in the table")

    @property
    def level(self) -> str:
        """``"patient"`` for two-eye rows, ``"eye"`` for one image per row."""
        return "patient" if "left_image" in self.frame.columns else "eye"

    @property
    def image_columns(self) -> tuple[str, ...]:
        return ("left_image", "right_image") if self.level == "patient" else ("image",)

    def __len__(self) -> int:
        return len(self.frame)

    def targets(self) -> np.ndarray:
        """The label matrix, float32 of shape (rows, len(labels))."""
        return self.frame[self.labels].to_numpy(dtype=np.float32)

    def subset(self, mask_or_index) -> Manifest:
        """A Manifest of some rows (boolean mask or index labels), same labels and task."""
        if isinstance(mask_or_index, (pd.Series, np.ndarray)) and np.asarray(mask_or_index).dtype == bool:
            frame = self.frame[np.asarray(mask_or_index)]
        else:
            frame = self.frame.loc[mask_or_index]
        return dataclasses.replace(self, frame=frame.reset_index(drop=True))

    def with_labels(self, labels: list[str], task: str | None = None) -> Manifest:
        """The same rows with a subset of the label columns (e.g. ODIR N, G, C)."""
        return dataclasses.replace(self, labels=list(labels), task=task or self.task)

    def where(self, i: int) -> str | None:
        """Where row ``i`` (a position) came from, for messages: ``row 12 of labels.csv``
        (the user's file row, header = row 1), or None when the rows have no file rows
        (folder sources, manifests built in Python)."""
        frame = self.frame
        if "source_row" not in frame.columns or pd.isna(frame["source_row"].iloc[i]):
            return None
        file = frame["source_file"].iloc[i] if "source_file" in frame.columns else None
        return f"row {int(frame['source_row'].iloc[i])} of {file or self.source or self.name or 'the label table'}"

    def counts(self) -> dict[str, int]:
        """Positives per label."""
        return {c: int(self.frame[c].sum()) for c in self.labels}
