"""ODIR-5K: the official annotation (``read_odir``) and Kaggle's per-image table (``read_odir_kaggle``)."""

from __future__ import annotations

import difflib
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
    file_rows,
    first_index,
    read_table,
    require_columns,
    require_unique,
)
from kfundus.errors import DataError

ODIR_COLUMNS = kl.ODIR_COLUMNS
_SIDES = ("left", "right")


def eye_text(eye: str, keywords: str) -> str:
    words = kl.split_keywords(keywords)
    return f"{eye} eye: {', '.join(words) if words else 'no keywords'}."


def keyword_labels(keywords, unknown: str = "error") -> pd.DataFrame:
    """Per-eye labels of keyword cells (:func:`kfundus.labels.odir_keywords_to_labels`)."""
    return pd.DataFrame(
        [kl.odir_keywords_to_labels(k, unknown) for k in keywords], columns=kl.ODIR_LABELS, dtype="int64"
    )


def check_keywords(cells, rows, path, unknown: str) -> None:
    """Report every keyword of ``cells`` (keyword cells; ``rows``: the file row of each)
    that is not an ODIR-5K keyword, with its count and rows.

    ``unknown`` (``data.options.unknown_keywords``) decides: ``error`` stops with the list
    and the fix; ``other`` (label O) and ``ignore`` (no label) go on with a warning that
    lists them.

    Raises:
        DataError: unknown keywords with ``unknown="error"``.
    """
    check_choice("unknown_keywords", unknown, kl.UNKNOWN_KEYWORDS)
    found: dict[str, list[int]] = {}
    for cell, row in zip(cells, rows):
        for keyword in kl.split_keywords(cell):
            if not kl.is_odir_keyword(keyword):
                found.setdefault(keyword, []).append(int(row))
    if not found:
        return
    items = []
    for keyword, where in sorted(found.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        shown = sorted(set(where))
        close = difflib.get_close_matches(keyword, list(kl.ODIR_KEYWORDS), n=1, cutoff=0.8)
        items.append(
            f"{keyword!r}: {len(where)} time(s), row(s) {shown[:SHOW]}{' ...' if len(shown) > SHOW else ''}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
        )
    listing = "\n  ".join(items)
    if unknown == "error":
        raise DataError(
            f"{path}: {len(found)} diagnostic keyword(s) are not ODIR-5K keywords (separators: , ， 、 ; ；):\n"
            f"  {listing}\nFix the table, or decide what they mean: --set data.options.unknown_keywords=other "
            "(the O label) or --set data.options.unknown_keywords=ignore (no label from them)"
        )
    warnings.warn(
        f"{path}: {len(found)} diagnostic keyword(s) are not ODIR-5K keywords; data.options.unknown_keywords="
        f"{unknown} makes them {'the O label' if unknown == 'other' else 'give no label'}:\n  {listing}",
        stacklevel=3,
    )


def _report_odir_keywords(ids, keywords, eye_y, y, path):
    """Warn about eyes without diagnostic keywords, and patient labels that differ from
    their eyes' (:func:`kfundus.labels.odir_patient_labels`)."""
    empty = [f"{ids[i]} {s} ({keywords[s][i]!r})" for s in _SIDES for i in np.flatnonzero(eye_y[s].sum(axis=1) == 0)]
    if empty:
        warnings.warn(
            f"{path}: {len(empty)} eye(s) have only non-diagnostic keywords, so no label, e.g. "
            f"{empty[:SHOW]}; with data.labels set, --set data.drop_empty=true drops them",
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
    annotation,
    image_dir=None,
    *,
    level="eye",
    eye_labels="keywords",
    unknown_keywords="error",
    check_files=True,
    skip_missing=False,
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
        unknown_keywords: what a keyword outside :data:`kfundus.labels.ODIR_KEYWORDS`
            becomes: ``"error"`` (default: stop, listing every such keyword with its count
            and rows), ``"other"`` (the O label) or ``"ignore"`` (no label).
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
        "Is this the official ODIR-5K annotation? For Kaggle's full_df.csv use --set data.source=odir_kaggle.",
    )
    rows = file_rows(df)
    ids = df["ID"].map(clean_id)
    require_unique(ids, path, "patient ID", rows)
    y = binary_columns(df, kl.ODIR_LABELS, path)
    image_dir = default_image_dir(image_dir, path.parent, ["images", "Training Images"], df["Left-Fundus"])
    keywords = {s: df[f"{s.capitalize()}-Diagnostic Keywords"].tolist() for s in _SIDES}
    check_keywords(keywords["left"] + keywords["right"], np.concatenate([rows, rows]), path, unknown_keywords)
    eye_y = {s: keyword_labels(keywords[s], unknown_keywords) for s in _SIDES}
    _report_odir_keywords(ids.tolist(), keywords, eye_y, y, path)
    texts = {s: [eye_text(s, k) for k in keywords[s]] for s in _SIDES}
    images = {s: absolute_paths(image_dir, df[f"{s.capitalize()}-Fundus"]) for s in _SIDES}
    extra = {
        "age": pd.to_numeric(df["Patient Age"], errors="coerce").to_numpy(),
        "sex": df["Patient Sex"].to_numpy(),
        "source_row": rows,
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
        ).sort_values(["source_row", "eye"], kind="stable")
    columns = ["left_image", "right_image"] if level == "patient" else ["image"]
    frame, skipped = check_image_files(frame, path, columns, check_files, skip_missing, image_dir)
    return Manifest(frame, list(kl.ODIR_LABELS), "multilabel", "odir", skipped, source=str(path))


def read_odir_kaggle(
    full_df_csv, image_dir=None, *, unknown_keywords="error", check_files=True, skip_missing=False
) -> Manifest:
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
        unknown_keywords, check_files, skip_missing: as in :func:`read_odir`.
    """
    path = Path(full_df_csv)
    df = read_table(path)
    require_columns(
        df,
        ["filename", *ODIR_COLUMNS[:3], *ODIR_COLUMNS[5:]],
        path,
        "Is this Kaggle's full_df.csv? For the official annotation use --set data.source=odir.",
    )
    rows = file_rows(df)
    require_unique(df["filename"], path, "filename", rows)
    eyes = df["filename"].str.extract(r"_(left|right)\.", flags=re.I)[0].str.lower()
    if eyes.isna().any():
        i = first_index(eyes.isna())
        raise DataError(
            f"row {file_row(df, i)} of {path}: filename {df['filename'].iloc[i]!r} does not say "
            "which eye it is (expected '<ID>_left.jpg' or '<ID>_right.jpg')"
        )
    y = binary_columns(df, kl.ODIR_LABELS, path)
    keywords = np.where(eyes == "left", df["Left-Diagnostic Keywords"], df["Right-Diagnostic Keywords"])
    check_keywords(keywords, rows, path, unknown_keywords)
    image_dir = default_image_dir(
        image_dir,
        path.parent,
        ["preprocessed_images", "ODIR-5K/Training Images", "Training Images", "images"],
        df["filename"],
    )
    eye_y = keyword_labels(keywords, unknown_keywords)
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
            "source_row": rows,
        }
    )
    frame, skipped = check_image_files(frame, path, ["image"], check_files, skip_missing, image_dir)
    return Manifest(frame, list(kl.ODIR_LABELS), "multilabel", "odir_kaggle", skipped, source=str(path))
