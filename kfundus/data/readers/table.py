"""Table helpers every reader shares: read a label table, check its columns and values,
resolve image paths, stop at or skip rows whose images are missing. Row numbers in
messages count the header as row 1 (the row a spreadsheet shows)."""

from __future__ import annotations

import inspect
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from kfundus.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
SHOW = 5  # how many offending rows a message lists


def check_choice(name, value, valid):
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(valid)}")


def read_table(path: Path) -> pd.DataFrame:
    """A .csv/.xlsx table as stripped strings, without empty rows and unnamed empty columns."""
    if not path.is_file():
        raise DataError(f"label file {path} does not exist: check the path")
    try:
        if path.suffix.lower() in (".xlsx", ".xlsm"):
            df = pd.read_excel(path, dtype=str, engine="openpyxl")
        else:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as error:
        raise DataError(f"cannot read the label table {path}: {error}") from error
    df.columns = [str(c).strip() for c in df.columns]
    df = df.fillna("").astype(str).apply(lambda column: column.str.strip())
    df = df.drop(columns=[c for c in df.columns if c.startswith("Unnamed:") and (df[c] == "").all()])
    return df[(df != "").any(axis=1)].reset_index(drop=True)


def file_row(i: int) -> int:
    return int(i) + 2  # file row number of data row i: the header is row 1


def first_index(mask) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0])


def require_columns(df, required, path, hint=""):
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks the column(s) {missing}; its columns are {list(df.columns)}. {hint}")


def int_column(df, column, path, high=1, what="label value") -> np.ndarray:
    """A column as int in 0..high; any other value stops with its row and column."""
    values = pd.to_numeric(df[column], errors="coerce")
    bad = ~values.isin(range(high + 1)).to_numpy()
    if bad.any():
        i = first_index(bad)
        raise DataError(
            f"row {file_row(i)} of {path}, column {column!r}: {what} {df[column].iloc[i]!r} is not "
            f"{'0 or 1' if high == 1 else f'an integer 0-{high}'} ({int(bad.sum())} such cell(s) "
            "in that column). Fix the table."
        )
    return values.astype("int64").to_numpy()


def binary_columns(df, columns, path) -> pd.DataFrame:
    return pd.DataFrame({c: int_column(df, c, path) for c in columns})


def require_unique(values: pd.Series, path, what: str):
    dup = values.duplicated(keep=False).to_numpy()
    if dup.any():
        names = list(dict.fromkeys(values[dup]))[:SHOW]
        rows = [file_row(i) for i in np.flatnonzero(dup)][: 2 * SHOW]
        raise DataError(
            f"{path}: duplicate {what}(s) {names} (rows {rows}). Each {what} must appear once: "
            "remove or rename the duplicate rows."
        )


def clean_id(value) -> str:
    text = str(value).strip()
    return text[:-2] if re.fullmatch(r"\d+\.0", text) else text


def default_image_dir(image_dir, base: Path, subfolders, names) -> Path:
    """``image_dir``, or the first ``base/<subfolder>`` (then ``base``) that holds the first
    of ``names``, else the first that exists."""
    if image_dir is not None:
        return Path(image_dir)
    candidates = [base / s for s in subfolders if (base / s).is_dir()] + [base]
    probe = str(list(names)[0]) if len(names) else None
    return next((c for c in candidates if probe and (c / probe).exists()), candidates[0])


def absolute_paths(folder, names) -> list[str]:
    return [os.path.abspath(os.path.join(folder, str(n))) for n in names]


def image_file_names(stems, extensions, folder, check) -> list[str]:
    """File names for ids: ``stem + extensions[0]``, or with ``check`` the first extension
    whose file exists; a stem that has an image extension already is kept."""

    def name(stem):
        if stem.lower().endswith(IMAGE_EXTENSIONS):
            return stem
        found = [stem + e for e in extensions if check and os.path.isfile(os.path.join(folder, stem + e))]
        return (found or [stem + extensions[0]])[0]

    return [name(str(stem)) for stem in stems]


def check_image_files(frame, path, image_columns, check_files, skip_missing, image_dir=None):
    """Stop at, or drop, rows whose images are missing (``frame["_row"]``: file rows)."""
    skipped = pd.DataFrame({"path": pd.Series([], dtype=str), "reason": pd.Series([], dtype=str)})
    if check_files:
        missing = {c: ~frame[c].map(os.path.isfile).to_numpy(dtype=bool) for c in image_columns}
        any_missing = np.logical_or.reduce(list(missing.values()))
        if any_missing.any():
            found = [
                (int(frame["_row"].iloc[i]), frame[c].iloc[i])
                for i in np.flatnonzero(any_missing)
                for c in image_columns
                if missing[c][i]
            ]
            if not skip_missing:
                listed = "\n  ".join(f"row {r}: {p}" for r, p in found[:SHOW])
                where = f" (image_dir={image_dir})" if image_dir is not None else ""
                raise DataError(
                    f"{len(found)} image file(s) named in {path} do not exist{where}, e.g.\n  "
                    f"{listed}\nFix: point image_dir at the folder that holds the images, or pass "
                    "skip_missing=True to drop these rows (they are listed in manifest.skipped)."
                )
            skipped = pd.DataFrame(
                {
                    "path": [p for _, p in found],
                    "reason": [f"image file not found (row {r} of {path})" for r, _ in found],
                }
            )
            warnings.warn(
                f"skipped {int(any_missing.sum())} row(s) of {path} whose image files are "
                "missing; see manifest.skipped",
                stacklevel=3,
            )
            frame = frame[~any_missing]
    return frame.drop(columns="_row").reset_index(drop=True), skipped


LABEL_FILES = {
    "odir": ["annotation.csv", "*.xlsx", "*.csv"],
    "odir_kaggle": ["full_df.csv", "*.csv"],
    "dr": ["trainLabels.csv", "train.csv", "test.csv", "*.csv"],
}


def find_label_file(kind: str, folder: Path) -> Path:
    for pattern in LABEL_FILES[kind]:
        found = sorted(p for p in folder.glob(pattern) if not p.name.startswith(("~$", ".")))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise DataError(
                f"{folder} holds several label tables {[p.name for p in found]}: give the file itself as path"
            )
    raise DataError(
        f"no label table for source {kind!r} in {folder} (looked for {LABEL_FILES[kind]}): give the file itself as path"
    )


def check_reader_options(reader, options: dict, what: str, extra=()) -> None:
    """ConfigError naming ``what`` if ``options`` has keys that ``reader`` (its arguments
    after the path) and ``extra`` do not take, listing the valid ones."""
    valid = list(inspect.signature(reader).parameters)[1:] + list(extra)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"option(s) {unknown} are not valid for {what}; valid options: {valid}")
