"""Reader of the CGI-HRDC 2023 hypertensive-retinopathy challenge layout (source ``hrdc``).

The challenge ships, per task::

    1-Hypertensive Classification/
      1-Images/1-Training Set/<name>.png
      2-Groundtruths/HRDC Hypertensive Classification Training Labels.csv   (Image,Hypertensive)
    2-Hypertensive Retinopathy Classification/
      ...                       ... Retinopathy Classification Training Labels.csv  (Image,Hypertensive Retinopathy)

(the label table also circulates as ``.xlsx``). :func:`read_hrdc` takes the table, or a
folder holding exactly one such table anywhere below it, detects the image and label
columns, and returns a ``"binary"`` Manifest. CGI-HRDC has no patient ids and one image per
patient: each image is its own patient, unless the table has a patient column (a common name
such as ``patient_id``, or ``patient_column``) or every image name says its eye
(``12_left.png``), see :func:`kfundus.data.readers.table.resolve_patients`. Any other binary CSV goes through
``kfundus.data.readers.read_csv(..., task="binary", label_columns=[...])`` (source ``csv``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kfundus.data.manifest import Manifest
from kfundus.data.readers.table import (
    IMAGE_EXTENSIONS,
    absolute_paths,
    check_image_files,
    default_image_dir,
    file_rows,
    image_file_names,
    int_column,
    option_hint,
    patient_column_of,
    read_table,
    require_columns,
    require_unique,
    resolve_patients,
)
from kfundus.errors import DataError

IMAGE_COLUMNS = ("Image", "image", "Image name", "Image Name", "filename", "file", "id")
LABEL_COLUMNS = ("Hypertensive", "Hypertensive Retinopathy", "HR", "label", "Label")
IMAGE_FOLDERS = ("../1-Images/1-Training Set", "../1-Images/2-Testing Set", "../1-Images", "images", "Images")


def find_hrdc_table(folder: Path) -> Path:
    """The one label table (``*.csv`` / ``*.xlsx``) under ``folder``, preferring ``2-Groundtruths``."""
    tables = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in (".csv", ".xlsx") and not p.name.startswith(("~$", "."))
    )
    truths = [p for p in tables if "groundtruth" in str(p.parent).lower()] or tables
    if len(truths) == 1:
        return truths[0]
    if not truths:
        raise DataError(
            f"no label table (.csv/.xlsx) under {folder}: expected CGI-HRDC's "
            "2-Groundtruths/HRDC ... Training Labels.csv; give the file itself as path"
        )
    raise DataError(
        f"{folder} holds several label tables {[str(p.relative_to(folder)) for p in truths]}: "
        f"give the one to read: --data {truths[0]}"
    )


def _pick(df, given, candidates, path, what, option):
    if given is not None:
        require_columns(df, [given], path, f"Fix {option_hint(option, 'NAME')}.")
        return given
    lower = {c.lower(): c for c in df.columns}
    found = [lower[c.lower()] for c in candidates if c.lower() in lower]
    if found:
        return found[0]
    raise DataError(
        f"{path}: cannot tell the {what} column among {list(df.columns)} (looked for "
        f"{list(candidates)}); name it with {option_hint(option, 'NAME')}"
    )


def read_hrdc(
    path,
    image_dir=None,
    *,
    image_column=None,
    label_column=None,
    patient_column=None,
    check_files=True,
    skip_missing=False,
) -> Manifest:
    """Read a CGI-HRDC label table (or the folder holding it) into a binary Manifest.

    Args:
        path: the ``.csv``/``.xlsx`` table, or a folder with one table below it.
        image_dir: the image folder; default the first of ``../1-Images/1-Training Set``
            (the challenge layout, beside ``2-Groundtruths``), ``images`` and the table's
            folder that holds the first image.
        image_column: default the first of :data:`IMAGE_COLUMNS` present (``Image``).
        label_column: default the first of :data:`LABEL_COLUMNS` present (``Hypertensive``
            for task 1, ``Hypertensive Retinopathy`` for task 2), else the one column
            left besides the image (and patient) column.
        patient_column: a column of patient ids (default: a column with a common name,
            else each image its own patient; see
            :func:`kfundus.data.readers.table.resolve_patients`).
        check_files, skip_missing: as in :func:`kfundus.data.readers.read_odir`.

    Image names without an extension get the first of ``.png, .jpg, .jpeg, .tif`` that
    exists. Labels must be 0/1: any other value stops with its row and column.
    """
    path = Path(path)
    if path.is_dir():
        path = find_hrdc_table(path)
    df = read_table(path)
    image_col = _pick(df, image_column, IMAGE_COLUMNS, path, "image", "image_column")
    patient_column = patient_column_of(df, patient_column, path, image_col)
    rest = [c for c in df.columns if c not in (image_col, patient_column)]
    if label_column is None and not any(c.lower() in {x.lower() for x in LABEL_COLUMNS} for c in rest):
        if len(rest) != 1:
            raise DataError(
                f"{path}: cannot tell the label column among {rest} (looked for "
                f"{list(LABEL_COLUMNS)}); name it with {option_hint('label_column', 'NAME')}"
            )
        label_column = rest[0]
    label_col = _pick(df, label_column, LABEL_COLUMNS, path, "label", "label_column")
    names = df[image_col].astype(str)
    rows = file_rows(df)
    require_unique(names, path, image_col, rows)
    patients, eyes, _ = resolve_patients(
        df, names, path, patient_column=patient_column, image_column=image_col, source="hrdc", warn_alone=False
    )
    y = int_column(df, label_col, path)
    folders = [str((path.parent / f).resolve()) for f in IMAGE_FOLDERS]
    probe = image_file_names(names[:1], (".png", ".jpg", ".jpeg", ".tif"), path.parent, False)
    image_dir = default_image_dir(image_dir, path.parent, folders, probe)
    files = image_file_names(names, (".png", ".jpg", ".jpeg", ".tif"), image_dir, check_files)
    bad = [n for n in files if not n.lower().endswith(IMAGE_EXTENSIONS)]
    if bad:
        raise DataError(f"{path}, column {image_col!r}: {bad[0]!r} is not an image name")
    frame = pd.DataFrame(
        {
            "image": absolute_paths(image_dir, files),
            "patient_id": patients,
            "eye": eyes if eyes is not None else "",
            label_col: y,
            "source_row": rows,
        }
    )
    frame, skipped = check_image_files(frame, path, ["image"], check_files, skip_missing, image_dir)
    return Manifest(frame, [label_col], "binary", "hrdc", skipped, source=str(path))
