"""A plain CSV with one image per row and 0/1 label columns (``read_csv``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kfundus.data.manifest import Manifest
from kfundus.data.readers.table import (
    absolute_paths,
    binary_columns,
    check_choice,
    check_image_files,
    file_row,
    first_index,
    read_table,
    require_columns,
    require_unique,
)
from kfundus.data.splits import SPLIT_ALIASES
from kfundus.errors import DataError

_NOT_LABELS = {"image", "patient_id", "patient", "eye", "split", "text", "keywords", "id"}


def read_csv(
    csv,
    *,
    image_column="image",
    label_columns=None,
    patient_column=None,
    image_dir=None,
    task="multilabel",
    check_files=True,
    skip_missing=False,
) -> Manifest:
    """Read a plain CSV with one image per row and 0/1 label columns.

    Args:
        csv: the table.
        image_column: image paths; relative ones are resolved against ``image_dir``
            (default: the CSV's folder).
        label_columns: default every column but the image and patient columns and
            ``patient_id, patient, eye, split, text, keywords, id``.
        patient_column: default ``patient_id`` if present, else each image is its own
            patient (then splits cannot keep a patient's eyes together).
        task: ``"multilabel"``, ``"multiclass"`` (exactly one 1 per row) or ``"binary"``.

    ``eye``, ``split`` (train/val/test, or training/validation/testing) and ``text`` are
    kept when present.
    """
    check_choice("task", task, ("multilabel", "multiclass", "binary"))
    path = Path(csv)
    df = read_table(path)
    require_columns(df, [image_column], path, "Pass image_column= to name the image column.")
    patient_column = patient_column or ("patient_id" if "patient_id" in df.columns else None)
    if patient_column:
        require_columns(df, [patient_column], path, "Pass patient_column= to name the patient column.")
    candidates = [c for c in df.columns if c not in _NOT_LABELS | {image_column, patient_column}]
    label_columns = candidates if label_columns is None else list(label_columns)
    unknown = [c for c in label_columns if c not in df.columns]
    if unknown or not label_columns:
        raise DataError(
            f"{path} has no label column(s) {unknown or '(none given)'}; valid label columns: "
            f"{candidates}. Name them with label_columns="
        )
    if task == "binary" and len(label_columns) != 1:
        raise DataError(f"task='binary' needs one label column, {path} gives {list(label_columns)}")
    require_unique(df[image_column], path, image_column)
    y = binary_columns(df, label_columns, path)
    if task == "multiclass":
        bad = y.sum(axis=1).to_numpy() != 1
        if bad.any():
            raise DataError(
                f"row {file_row(first_index(bad))} of {path}: task='multiclass' needs exactly one 1 among "
                f"{label_columns} ({int(bad.sum())} row(s) do not); use task='multilabel'"
            )
    folder = Path(image_dir) if image_dir is not None else path.parent
    frame = pd.DataFrame(
        {
            "image": absolute_paths(folder, df[image_column]),
            "patient_id": df[patient_column] if patient_column else df[image_column],
            "eye": df["eye"].str.lower() if "eye" in df.columns else "",
            **y,
        }
    )
    if "split" in df.columns:
        split = df["split"].str.lower().map(SPLIT_ALIASES)
        if split.isna().any():
            i = first_index(split.isna())
            raise DataError(
                f"row {file_row(i)} of {path}, column 'split': {df['split'].iloc[i]!r} is not train, val or test"
            )
        frame["split"] = split.to_numpy()
    frame = frame.assign(**({"text": df["text"]} if "text" in df.columns else {}))
    frame["_row"] = np.arange(len(df)) + 2
    frame, skipped = check_image_files(frame, path, ["image"], check_files, skip_missing, folder)
    return Manifest(frame, list(label_columns), task, path.stem, skipped)
