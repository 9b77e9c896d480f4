"""ODIR-5K: the official annotation (``read_odir``) and Kaggle's per-image table (``read_odir_kaggle``)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from kfundus import labels as kl
from kfundus.data.manifest import Manifest
from kfundus.data.readers.table import (
    SHOW,
    absolute_paths,
    binary_columns,
    check_choice,
    check_image_files,
    clean_id,
    default_image_dir,
    file_row,
    first_index,
    read_table,
    require_columns,
    require_unique,
)
from kfundus.errors import DataError

ODIR_COLUMNS = [
    "ID",
    "Patient Age",
    "Patient Sex",
    "Left-Fundus",
    "Right-Fundus",
    "Left-Diagnostic Keywords",
    "Right-Diagnostic Keywords",
    *kl.ODIR_LABELS,
]
_SIDES = ("left", "right")


def eye_text(eye: str, keywords: str) -> str:
    words = kl.split_keywords(keywords)
    return f"{eye} eye: {', '.join(words) if words else 'no keywords'}."


def keyword_labels(keywords) -> pd.DataFrame:
    return pd.DataFrame([kl.odir_keywords_to_labels(k) for k in keywords], columns=kl.ODIR_LABELS)


def _report_odir_keywords(ids, keywords, eye_y, y, path):
    """Warn about eyes without diagnostic keywords, and patient labels that differ from
    their eyes' (:func:`kfundus.labels.odir_patient_labels`)."""
    empty = [f"{ids[i]} {s} ({keywords[s][i]!r})" for s in _SIDES for i in np.flatnonzero(eye_y[s].sum(axis=1) == 0)]
    if empty:
        warnings.warn(
            f"{path}: {len(empty)} eye(s) have only non-diagnostic keywords, so no label, e.g. "
            f"{empty[:SHOW]}; select_labels(..., drop_empty=True) drops them",
            stacklevel=3,
        )
    eyes = [r.to_dict("records") for r in (eye_y["left"], eye_y["right"])]
    union = pd.DataFrame([kl.odir_patient_labels(a, b) for a, b in zip(*eyes)], columns=kl.ODIR_LABELS)
    differ = np.flatnonzero((union.to_numpy() != y.to_numpy()).any(axis=1))
    if len(differ):
        warnings.warn(
            f"{path}: {len(differ)} of {len(y)} patients have labels that differ from the union of "
            f"their eyes' keyword labels, e.g. IDs {[ids[i] for i in differ[:SHOW]]}",
            stacklevel=3,
        )


def read_odir(
    annotation, image_dir=None, *, level="eye", eye_labels="keywords", check_files=True, skip_missing=False
) -> Manifest:
    """Read the official ODIR-5K annotation (``.xlsx`` or ``.csv``).

    Args:
        annotation: the table, columns :data:`ODIR_COLUMNS`.
        image_dir: the image folder; default the first existing of ``images``,
            ``Training Images`` and the annotation's own folder.
        level: ``"eye"`` (two rows per patient: ``image``, ``eye``, ``keywords``) or
            ``"patient"`` (one row: ``left_image``, ``right_image``, ``left_keywords``,
            ``right_keywords``, the official labels N..O).
        eye_labels: labels of eye rows: ``"keywords"`` (default) from that eye's keywords
            (:func:`kfundus.labels.odir_keywords_to_labels`), the only per-eye truth ODIR
            has (a ``C`` patient may have one normal eye), or ``"patient"``: the patient's.
            Eye rows also carry the patient labels as ``patient_N`` .. ``patient_O``.
        check_files, skip_missing: check that every image exists; drop (instead of stop
            at) rows whose images are missing.

    Rows also get ``age``, ``sex`` and ``text``, report-like text from the keywords for
    image-text training ("left eye: glaucoma. right eye: normal fundus." on a patient row,
    that eye's sentence on an eye row). Eyes with only non-diagnostic keywords ("lens
    dust") are warned about: keyword labels leave them with no label.
    """
    check_choice("level", level, ("eye", "patient"))
    check_choice("eye_labels", eye_labels, ("keywords", "patient"))
    path = Path(annotation)
    df = read_table(path)
    require_columns(
        df,
        ODIR_COLUMNS,
        path,
        "Is this the official ODIR-5K annotation? For Kaggle's full_df.csv use read_odir_kaggle.",
    )
    ids = df["ID"].map(clean_id)
    require_unique(ids, path, "patient ID")
    y = binary_columns(df, kl.ODIR_LABELS, path)
    image_dir = default_image_dir(image_dir, path.parent, ["images", "Training Images"], df["Left-Fundus"])
    keywords = {s: df[f"{s.capitalize()}-Diagnostic Keywords"].tolist() for s in _SIDES}
    eye_y = {s: keyword_labels(keywords[s]) for s in _SIDES}
    _report_odir_keywords(ids.tolist(), keywords, eye_y, y, path)
    texts = {s: [eye_text(s, k) for k in keywords[s]] for s in _SIDES}
    images = {s: absolute_paths(image_dir, df[f"{s.capitalize()}-Fundus"]) for s in _SIDES}
    extra = {
        "age": pd.to_numeric(df["Patient Age"], errors="coerce").to_numpy(),
        "sex": df["Patient Sex"].to_numpy(),
        "_row": np.arange(len(df)) + 2,
    }
    if level == "patient":
        frame = pd.DataFrame(
            {
                "patient_id": ids,
                "left_image": images["left"],
                "right_image": images["right"],
                **y,
                "left_keywords": keywords["left"],
                "right_keywords": keywords["right"],
                **extra,
                "text": [f"{a} {b}" for a, b in zip(texts["left"], texts["right"])],
            }
        )
    else:
        frame = pd.concat(
            [
                pd.DataFrame(
                    {
                        "patient_id": ids,
                        "image": images[s],
                        "eye": s,
                        **(eye_y[s] if eye_labels == "keywords" else y),
                        **{f"patient_{c}": y[c] for c in kl.ODIR_LABELS},
                        "keywords": keywords[s],
                        **extra,
                        "text": texts[s],
                    }
                )
                for s in _SIDES
            ],
            ignore_index=True,
        ).sort_values(["_row", "eye"], kind="stable")
    columns = ["left_image", "right_image"] if level == "patient" else ["image"]
    frame, skipped = check_image_files(frame, path, columns, check_files, skip_missing, image_dir)
    return Manifest(frame, list(kl.ODIR_LABELS), "multilabel", "odir", skipped)


def read_odir_kaggle(full_df_csv, image_dir=None, *, check_files=True, skip_missing=False) -> Manifest:
    """Read the Kaggle ODIR-5K table ``full_df.csv``: one row per image (``filename``).

    Per-eye labels come from that eye's keywords, not from the ``target``/``labels``
    columns, which the Kaggle community knows are unreliable: ``target`` is one-hot, one
    label per image even for an eye with several findings (``11_right``: DR and
    hypertensive retinopathy -> ``D`` only), picked inconsistently; it disagrees with the
    eye's keywords on about 7 % of the images. The patient labels are kept as
    ``patient_N`` .. ``patient_O``.

    Args:
        full_df_csv: the Kaggle table (``ID``, the keyword columns, ``N`` .. ``O``, ``filename``).
        image_dir: the image folder; default the first existing of ``preprocessed_images``,
            ``ODIR-5K/Training Images``, ``Training Images``, ``images``, the CSV's folder.
        check_files, skip_missing: as in :func:`read_odir`.
    """
    path = Path(full_df_csv)
    df = read_table(path)
    require_columns(
        df,
        ["filename", *ODIR_COLUMNS[:3], *ODIR_COLUMNS[5:]],
        path,
        "Is this Kaggle's full_df.csv? For the official annotation use read_odir.",
    )
    require_unique(df["filename"], path, "filename")
    eyes = df["filename"].str.extract(r"_(left|right)\.", flags=re.I)[0].str.lower()
    if eyes.isna().any():
        i = first_index(eyes.isna())
        raise DataError(
            f"row {file_row(i)} of {path}: filename {df['filename'].iloc[i]!r} does not say "
            "which eye it is (expected '<ID>_left.jpg' or '<ID>_right.jpg')"
        )
    y = binary_columns(df, kl.ODIR_LABELS, path)
    keywords = np.where(eyes == "left", df["Left-Diagnostic Keywords"], df["Right-Diagnostic Keywords"])
    image_dir = default_image_dir(
        image_dir,
        path.parent,
        ["preprocessed_images", "ODIR-5K/Training Images", "Training Images", "images"],
        df["filename"],
    )
    eye_y = keyword_labels(keywords)
    empty = df["filename"][eye_y.sum(axis=1).to_numpy() == 0].tolist()
    if empty:
        warnings.warn(
            f"{path}: {len(empty)} image(s) have only non-diagnostic keywords, e.g. {empty[:SHOW]}", stacklevel=2
        )
    frame = pd.DataFrame(
        {
            "patient_id": df["ID"].map(clean_id),
            "image": absolute_paths(image_dir, df["filename"]),
            "eye": eyes,
            **eye_y,
            **{f"patient_{c}": y[c] for c in kl.ODIR_LABELS},
            "keywords": keywords,
            "age": pd.to_numeric(df["Patient Age"], errors="coerce"),
            "sex": df["Patient Sex"],
            "text": [eye_text(e, k) for e, k in zip(eyes, keywords)],
            "_row": np.arange(len(df)) + 2,
        }
    )
    frame, skipped = check_image_files(frame, path, ["image"], check_files, skip_missing, image_dir)
    return Manifest(frame, list(kl.ODIR_LABELS), "multilabel", "odir_kaggle", skipped)
