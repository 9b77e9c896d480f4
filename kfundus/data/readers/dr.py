"""Diabetic-retinopathy grading tables: APTOS 2019, Kaggle EyePACS 2015, IDRiD (``read_dr_grades``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kfundus import labels as kl
from kfundus.data.manifest import Manifest
from kfundus.data.readers.table import (
    absolute_paths,
    check_choice,
    check_image_files,
    clean_id,
    default_image_dir,
    file_rows,
    image_file_names,
    int_column,
    option_hint,
    read_table,
    require_columns,
    require_unique,
    resolve_patients,
)
from kfundus.errors import DataError

_DR_LAYOUTS = {  # layout: (image column, grade column, image extensions)
    "aptos": ("id_code", "diagnosis", (".png", ".jpg", ".jpeg")),
    "eyepacs": ("image", "level", (".jpeg", ".jpg", ".png")),
    "idrid": ("Image name", "Retinopathy grade", (".jpg", ".jpeg", ".png", ".tif")),
}


def read_dr_grades(
    csv, image_dir=None, *, layout="auto", patient_column=None, check_files=True, skip_missing=False
) -> Manifest:
    """Read a diabetic-retinopathy grading table (grades 0-4, International Clinical scale).

    Layouts (``"auto"`` detects them from the header):

    - ``"aptos"``: APTOS 2019, ``id_code,diagnosis``, images ``{id_code}.png``; image_dir
      default ``<csv dir>/<csv stem>_images`` or ``train_images``, else the CSV's folder.
    - ``"eyepacs"``: Kaggle EyePACS 2015, ``image,level``, images ``{image}.jpeg``; the
      patient id is the text before ``_left``/``_right`` and ``eye`` the suffix; image_dir
      default ``<csv dir>/train``.
    - ``"idrid"``: IDRiD disease grading, ``Image name,Retinopathy grade,Risk of macular
      edema``, images ``{name}.jpg``, adds ``dme_risk`` (0-2); image_dir default
      ``<csv dir>/images/test`` or ``images/train``, whichever holds the first image.

    Args:
        csv: the grading table.
        image_dir: the image folder (defaults above).
        layout: ``"auto"``, ``"aptos"``, ``"eyepacs"`` or ``"idrid"``.
        patient_column: a column of patient ids, for a table that has one (a column with
            a common name such as ``patient_id`` is found without it).
        check_files, skip_missing: as in :func:`kfundus.data.readers.read_odir`.

    Returns a ``"multiclass"`` manifest: one-hot :data:`kfundus.labels.DR_GRADES` and an
    int ``grade``. APTOS and IDRiD publish no patient ids: each image is its own patient
    (unless the table has a patient column, or every image name says its eye:
    :func:`kfundus.data.readers.table.resolve_patients`). No ``split`` column: a grading
    table does not tell an official split.
    """
    check_choice("layout", layout, ("auto", *_DR_LAYOUTS))
    path = Path(csv)
    df = read_table(path)
    if layout == "auto":
        known = {n: [i, g] for n, (i, g, _) in _DR_LAYOUTS.items()}
        layout = next((n for n, c in known.items() if set(c) <= set(df.columns)), None)
        if layout is None:
            raise DataError(
                f"{path}: cannot tell the DR-grading layout from its columns {list(df.columns)}; "
                f"known layouts and their columns: {known}. Fix the header, or name the layout with "
                f"{option_hint('layout', 'aptos')}"
            )
    image_col, grade_col, extensions = _DR_LAYOUTS[layout]
    required = [image_col, grade_col] + (["Risk of macular edema"] if layout == "idrid" else [])
    require_columns(df, required, path)
    names = df[image_col].map(clean_id)
    rows = file_rows(df)
    require_unique(names, path, image_col, rows)
    grade = int_column(df, grade_col, path, high=4, what="grade")
    subfolders = {
        "aptos": [f"{path.stem}_images", "train_images"],
        "eyepacs": ["train"],
        "idrid": ["images/test", "images/train"],
    }[layout]
    image_dir = default_image_dir(image_dir, path.parent, subfolders, names + extensions[0])
    patient, eye, _ = resolve_patients(
        df,
        names,
        path,
        patient_column=patient_column,
        image_column=image_col,
        source="dr",
        warn_derived=layout != "eyepacs",
        warn_alone=False,
    )
    dme = {"dme_risk": int_column(df, required[-1], path, high=2, what="grade")} if layout == "idrid" else {}
    frame = pd.DataFrame(
        {
            "image": absolute_paths(image_dir, image_file_names(names, extensions, image_dir, check_files)),
            "patient_id": patient,
            "eye": eye if eye is not None else "",
            "grade": grade,
            **{g: (grade == k).astype("int64") for k, g in enumerate(kl.DR_GRADES)},
            **dme,
            "id": names,
            "source_row": rows,
        }
    )
    frame, skipped = check_image_files(frame, path, ["image"], check_files, skip_missing, image_dir)
    return Manifest(frame, list(kl.DR_GRADES), "multiclass", layout, skipped, source=str(path))
