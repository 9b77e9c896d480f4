"""A plain CSV with one image per row and 0/1 label columns (``read_csv``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kfundus.data.manifest import Manifest
from kfundus.data.readers.table import (
    EYES,
    PATIENT_COLUMN_NAMES,
    absolute_paths,
    binary_columns,
    check_choice,
    check_image_files,
    file_row,
    file_rows,
    first_index,
    option_hint,
    read_table,
    require_columns,
    require_unique,
    resolve_patients,
)
from kfundus.data.splits import SPLIT_ALIASES
from kfundus.errors import DataError

_NOT_LABELS = {"image", "eye", "split", "text", "keywords", "id", *PATIENT_COLUMN_NAMES}


def _eyes(df, path) -> pd.Series:
    """The ``eye`` column as left / right / "" (L, R, OD, OS and any case accepted)."""
    raw = df["eye"].str.strip().str.lower()
    eyes = raw.map(lambda e: EYES.get(e, "" if e == "" else None))
    if eyes.isna().any():
        i = first_index(eyes.isna())
        raise DataError(
            f"row {file_row(df, i)} of {path}, column 'eye': {df['eye'].iloc[i]!r} is not an eye; write left or "
            "right (L / R, OD / OS), or leave it empty"
        )
    return eyes


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
        csv: the table (``.csv`` separated by comma, semicolon or tab, or ``.xlsx``).
        image_column: image paths; relative ones are resolved against ``image_dir``
            (default: the CSV's folder).
        label_columns: default every column but the image, patient, ``eye``, ``split``,
            ``text``, ``keywords`` and ``id`` columns.
        patient_column: the column of patient ids (``data.options.patient_column``). By
            default a column with a common name (``patient_id``, ``Patient ID``,
            ``patient``, ``subject_id``, ``case_id``, ...:
            :data:`kfundus.data.readers.table.PATIENT_COLUMN_NAMES`), else the patient and
            eye come from image names like ``12_left.jpg`` (with a warning), else every
            image is its own patient (with a warning);
            :func:`kfundus.data.readers.table.resolve_patients` has the rule. Naming the
            image column declares one image per patient.
        image_dir: the folder relative image paths start from.
        task: ``"multilabel"``, ``"multiclass"`` (exactly one 1 per row) or ``"binary"``.
        check_files, skip_missing: check that every image exists; drop (instead of stop
            at) rows whose images are missing.

    Returns:
        A Manifest; ``eye`` (left / right, also from L / R / OD / OS), ``split``
        (train/val/test, or training/validation/testing) and ``text`` are kept when present.
    """
    check_choice("task", task, ("multilabel", "multiclass", "binary"))
    path = Path(csv)
    df = read_table(path)
    require_columns(df, [image_column], path, f"Name the image column with {option_hint('image_column', 'NAME')}.")
    patients, derived_eyes, patient_column = resolve_patients(
        df, df[image_column], path, patient_column=patient_column, image_column=image_column, source="csv"
    )
    excluded = {c.lower() for c in _NOT_LABELS} | {image_column.lower()} | {str(patient_column or "").lower()}
    candidates = [c for c in df.columns if c.lower() not in excluded]
    label_columns = candidates if label_columns is None else list(label_columns)
    unknown = [c for c in label_columns if c not in df.columns]
    if unknown or not label_columns:
        raise DataError(
            f"{path} has no label column(s) {unknown or '(none given)'}; valid label columns: "
            f"{candidates}. Name them with --set 'data.options.label_columns=[{', '.join(candidates[:2]) or 'A, B'}]'"
        )
    if task == "binary" and len(label_columns) != 1:
        raise DataError(
            f"data.options.task=binary needs one label column, {path} gives {list(label_columns)}: name it with "
            f"--set 'data.options.label_columns=[{label_columns[0]}]'"
        )
    y = binary_columns(df, label_columns, path)
    if task == "multiclass":
        bad = y.sum(axis=1).to_numpy() != 1
        if bad.any():
            raise DataError(
                f"row {file_row(df, first_index(bad))} of {path}: data.options.task=multiclass needs exactly one 1 "
                f"among {label_columns} ({int(bad.sum())} row(s) do not); for several labels per image use "
                f"{option_hint('task', 'multilabel')}"
            )
    folder = Path(image_dir) if image_dir is not None else path.parent
    images = absolute_paths(folder, df[image_column])
    require_unique(pd.Series(images), path, "image path", file_rows(df))
    if "eye" in df.columns:
        eye = _eyes(df, path).to_numpy()
    else:
        eye = derived_eyes if derived_eyes is not None else np.full(len(df), "", dtype=object)
    frame = pd.DataFrame({"image": images, "patient_id": patients, "eye": eye, **y})
    if "split" in df.columns:
        split = df["split"].str.lower().map(SPLIT_ALIASES)
        if split.isna().any():
            i = first_index(split.isna())
            raise DataError(
                f"row {file_row(df, i)} of {path}, column 'split': {df['split'].iloc[i]!r} is not train, val or "
                "test (or training, validation, testing)"
            )
        frame["split"] = split.to_numpy()
    frame = frame.assign(**({"text": df["text"].to_numpy()} if "text" in df.columns else {}))
    frame["source_row"] = file_rows(df)
    frame, skipped = check_image_files(frame, path, ["image"], check_files, skip_missing, folder)
    return Manifest(frame, list(label_columns), task, path.stem, skipped, source=str(path))
