"""The Manifest: one table that every dataset reader produces and every pipeline reads.

A Manifest wraps a pandas DataFrame with one row per eye (image column ``image``) or per
patient (``left_image`` and ``right_image``). Standard columns:

- ``image`` or ``left_image``/``right_image``: absolute image paths (str);
- ``patient_id`` (str): the unit that splits must keep together;
- ``eye``: ``"left"``, ``"right"`` or ``""`` when unknown (eye-level rows only);
- one integer 0/1 column per label, named as in ``labels`` (multi-class tasks are stored
  one-hot too, so every task yields a float target vector of length ``len(labels)``);
- optional: ``split`` (an official split of the source: train/val/test), ``text``
  (report-like text), ``keywords`` (ODIR per-eye keywords), ``grade`` (DR grade).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

TASKS = ("multilabel", "multiclass", "binary")


@dataclasses.dataclass
class Manifest:
    """A dataset as a table plus what its label columns mean.

    Args:
        frame: the table, one row per eye or per patient (see the module docstring).
        labels: the label columns of ``frame``, in model-output order.
        task: ``"multilabel"`` (independent sigmoids), ``"multiclass"`` (one-hot, softmax)
            or ``"binary"`` (one column).
        name: the source it was read from (``"odir"``, ``"rfmid"``, ``"eyepacs"``, ...).
        skipped: rows the reader dropped, with columns ``path`` and ``reason``.
    """

    frame: pd.DataFrame
    labels: list[str]
    task: str = "multilabel"
    name: str = ""
    skipped: pd.DataFrame = dataclasses.field(default_factory=lambda: pd.DataFrame(columns=["path", "reason"]))

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

    def counts(self) -> dict[str, int]:
        """Positives per label."""
        return {c: int(self.frame[c].sum()) for c in self.labels}
