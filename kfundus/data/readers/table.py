"""Table helpers every reader shares: read a label table, check its columns and values,
find the patient of every row, resolve image paths, stop at or skip rows whose images are
missing. Row numbers in messages are the rows of the user's file, counting the header as
row 1 (the row a spreadsheet shows); blank lines are counted, not skipped."""

from __future__ import annotations

import inspect
import io
import os
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from kfundus.data.manifest import SKIPPED_COLUMNS, skipped_rows
from kfundus.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
SHOW = 5  # how many offending rows a message lists
# Delimiters a text table may use: sniffed from the header line.
DELIMITERS = {",": "comma ','", ";": "semicolon ';'", "\t": "tab"}
# Delimiters that are recognised in a message, but not read.
OTHER_DELIMITERS = {"|": "vertical bar '|'", ":": "colon ':'"}


def option_hint(name: str, example) -> str:
    """The ``--set`` that sets reader option ``name`` (``data.options.<name>``)."""
    return f"--set data.options.{name}={example}"


def check_choice(name, value, valid):
    """ConfigError unless ``value`` is one of ``valid``; ``name`` is a reader option."""
    if value not in valid:
        raise ConfigError(
            f"data.options.{name}={value!r} is not valid; choose one of {list(valid)} "
            f"(e.g. {option_hint(name, list(valid)[0])})"
        )


# ---------------------------------------------------------------------------
# reading a table


def file_rows(df: pd.DataFrame) -> np.ndarray:
    """The file row of every row of a table :func:`read_table` returned (header = row 1)."""
    rows = df.attrs.get("file_rows")
    return np.asarray(rows, dtype=np.int64) if rows is not None else np.arange(len(df), dtype=np.int64) + 2


def file_row(df: pd.DataFrame, i: int) -> int:
    """The file row of data row ``i`` (a position) of a table :func:`read_table` returned."""
    return int(file_rows(df)[int(i)])


def _sniff_delimiter(header: str) -> str | None:
    """The delimiter of a header line: the most frequent of ``, ; tab`` outside quotes."""
    outside, quoted = [], False
    for ch in header:
        if ch == '"':
            quoted = not quoted
        elif not quoted:
            outside.append(ch)
    text = "".join(outside)
    counts = {d: text.count(d) for d in (*DELIMITERS, *OTHER_DELIMITERS)}
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def _read_excel(path: Path) -> pd.DataFrame:
    try:
        return pd.read_excel(path, dtype=str, header=None, engine="openpyxl")
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as error:
        raise DataError(
            f"{path} is not a readable Excel workbook ({type(error).__name__}: {error}); open it and save it "
            "again as .xlsx, or export it as a UTF-8 .csv"
        ) from error


def _read_text(path: Path) -> tuple[pd.DataFrame, str]:
    raw = path.read_bytes()
    if raw.startswith(b"PK\x03\x04"):  # an Excel workbook with another name
        return _read_excel(path), ""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not UTF-8 text (byte {raw[error.start]:#04x} at offset {error.start}): save it as "
            "'CSV UTF-8' (or .xlsx)"
        ) from error
    header = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = _sniff_delimiter(header) or ","
    if delimiter in OTHER_DELIMITERS:
        raise DataError(
            f"{path}: its header {header[:120]!r} is separated by a {OTHER_DELIMITERS[delimiter]}; kfundus reads "
            f"tables separated by a comma, a semicolon or a tab: save it with one of these"
        )
    try:
        df = pd.read_csv(
            io.StringIO(text), sep=delimiter, dtype=str, header=None, keep_default_na=False, skip_blank_lines=False
        )
    except pd.errors.EmptyDataError as error:
        raise DataError(f"{path} is empty: a label table needs a header row and data rows") from error
    except pd.errors.ParserError as error:
        match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(error))
        if match:
            expected, row, saw = match.groups()
            raise DataError(
                f"row {row} of {path} has {saw} fields but the header has {expected} (separated by "
                f"{DELIMITERS[delimiter]}): quote values that contain the delimiter, or fix the row"
            ) from error
        raise DataError(f"cannot read the label table {path}: {error}") from error
    return df, delimiter


def read_table(path, *, min_columns: int = 2) -> pd.DataFrame:
    """A ``.csv``/``.tsv``/``.xlsx`` label table as stripped strings.

    The delimiter of a text table (comma, semicolon or tab) is sniffed from its header; a
    UTF-8 byte-order mark is dropped. Empty rows and unnamed empty columns are dropped. The
    file row of every data row (header = row 1, blank lines counted) is kept for messages:
    :func:`file_rows`.

    Args:
        path: the table.
        min_columns: fewer columns than this is an error (a table read with the wrong
            delimiter comes out as one column).

    Returns:
        The table, one row per non-empty data row, with a RangeIndex.

    Raises:
        DataError: the path is a folder or missing, the file is empty, has a header but no
            rows, is not UTF-8, is an unreadable workbook, has a ragged row, a duplicated
            column name or too few columns.
    """
    path = Path(path)
    if path.is_dir():
        tables = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".csv", ".tsv", ".xlsx", ".txt"))
        holds = f"; it holds {tables[:SHOW]}" if tables else ""
        raise DataError(
            f"{path} is a folder, but a label table (.csv or .xlsx) is expected here: give the file "
            f"itself (--data {path / (tables[0] if tables else '<table>.csv')}){holds}"
        )
    if not path.is_file():
        raise DataError(f"label file {path} does not exist: check the path (--data, or data.path)")
    suffix = path.suffix.lower()
    if suffix == ".xls":
        raise DataError(f"{path} is an old Excel .xls workbook, which kfundus does not read: save it as .xlsx or .csv")
    if suffix in (".xlsx", ".xlsm"):
        raw, delimiter = _read_excel(path), ""
    else:
        raw, delimiter = _read_text(path)
    raw = raw.fillna("").astype(str).apply(lambda column: column.str.strip())
    filled = np.flatnonzero((raw != "").any(axis=1).to_numpy())
    if not len(filled):
        raise DataError(f"{path} is empty: a label table needs a header row and data rows")
    top = filled[0]  # the header: the first non-empty row
    columns = [str(c) for c in raw.iloc[top]]
    body = raw.iloc[top + 1 :]
    columns = [c or f"Unnamed: {j}" for j, c in enumerate(columns)]
    seen: dict[str, int] = {}
    for j, c in enumerate(columns):
        if c in seen:
            raise DataError(
                f"{path}: the header names the column {c!r} twice (columns {seen[c] + 1} and {j + 1}): "
                "rename one of them"
            )
        seen[c] = j
    df = pd.DataFrame(body.to_numpy(), columns=columns)
    rows = np.arange(top + 2, top + 2 + len(df))
    empty_unnamed = [c for c in columns if c.startswith("Unnamed: ") and (df[c] == "").all()]
    df = df.drop(columns=empty_unnamed)
    keep = (df != "").any(axis=1).to_numpy()
    df, rows = df[keep].reset_index(drop=True), rows[keep]
    if len(df.columns) < min_columns:
        found = {d: columns[0].count(d) for d in (" ", "|")}
        hint = " (it seems separated by spaces)" if found[" "] and len(df.columns) == 1 else ""
        raise DataError(
            f"{path} has {len(df.columns)} column(s) {list(df.columns)}{hint}: a label table needs an image "
            "column and label columns, separated by a comma, a semicolon or a tab"
        )
    if df.empty:
        shown = ", ".join(df.columns[:8]) + (", ..." if len(df.columns) > 8 else "")
        raise DataError(f"{path} has a header ({shown}) but no data rows")
    df.attrs["file_rows"] = rows
    df.attrs["delimiter"] = delimiter
    return df


def first_index(mask) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0])


def require_columns(df, required, path, hint=""):
    missing = [c for c in required if c not in df.columns]
    if missing:
        delimiter = df.attrs.get("delimiter")
        read_as = (
            f" (read as {DELIMITERS[delimiter]}-separated)" if delimiter in DELIMITERS and delimiter != "," else ""
        )
        raise DataError(
            f"{path} lacks the column(s) {missing}; its columns are {list(df.columns)}{read_as}. {hint}".rstrip()
        )


def int_column(df, column, path, high=1, what="label value") -> np.ndarray:
    """A column as int in 0..high; any other value stops with its file row and column."""
    values = pd.to_numeric(df[column], errors="coerce")
    bad = ~values.isin(range(high + 1)).to_numpy()
    if bad.any():
        i = first_index(bad)
        rows = file_rows(df)[bad][:SHOW].tolist()
        raise DataError(
            f"row {file_row(df, i)} of {path}, column {column!r}: {what} {df[column].iloc[i]!r} is not "
            f"{'0 or 1' if high == 1 else f'an integer 0-{high}'} ({int(bad.sum())} such cell(s) "
            f"in that column, rows {rows}{' ...' if bad.sum() > SHOW else ''}). Fix the table."
        )
    return values.astype("int64").to_numpy()


def binary_columns(df, columns, path) -> pd.DataFrame:
    return pd.DataFrame({c: int_column(df, c, path) for c in columns})


def require_unique(values: pd.Series, path, what: str, rows=None):
    """DataError naming the duplicated values and their file rows (``rows``: the file row
    of each value, default position + 2)."""
    values = pd.Series(np.asarray(values))
    rows = np.arange(len(values)) + 2 if rows is None else np.asarray(rows)
    dup = values.duplicated(keep=False).to_numpy()
    if dup.any():
        names = list(dict.fromkeys(values[dup]))[:SHOW]
        listed = rows[dup][: 2 * SHOW].tolist()
        raise DataError(
            f"{path}: duplicate {what}(s) {names} (rows {listed}). Each {what} must appear once: "
            "remove or rename the duplicate rows."
        )


def clean_id(value) -> str:
    text = str(value).strip()
    return text[:-2] if re.fullmatch(r"\d+\.0", text) else text


# ---------------------------------------------------------------------------
# patients

# Column names recognised as the patient column (compared without case, spaces, "_" or "-"):
# patient_id, Patient ID, PatientID, patient, patient_no, subject, subject_id, case_id, ...
SHOWN_PATIENT_COLUMNS = "patient_id, Patient ID, patient, patient_no, subject_id, case_id, ..."
PATIENT_COLUMN_NAMES = (
    "patient_id",
    "patient",
    "patient_no",
    "patient_nr",
    "patient_number",
    "patient_key",
    "subject",
    "subject_id",
    "subject_no",
    "case_id",
    "participant",
    "participant_id",
    "person_id",
    "pid",
)
# An image name that says which eye: ``{id}_{left|right}``, ``{id}_L``/``_R``, ``{id}_OD``/``_OS``
# (also with ``-`` or a space), the extension aside.
EYE_NAME = re.compile(r"^(?P<patient>.+?)[ _-](?P<eye>left|right|l|r|od|os)$", re.IGNORECASE)
EYES = {"left": "left", "l": "left", "os": "left", "right": "right", "r": "right", "od": "right"}


def _column_key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def eye_from_name(name: str) -> tuple[str, str] | None:
    """``(patient, eye)`` from an image name like ``12_left.jpg``, ``12_R.png``, ``12-OD.jpg``
    (OD: right eye, OS: left eye), or None."""
    stem = os.path.basename(str(name))
    if stem.lower().endswith(IMAGE_EXTENSIONS):  # only an image extension: "1.2_left" keeps its dot
        stem = os.path.splitext(stem)[0]
    match = EYE_NAME.match(stem)
    return (match.group("patient"), EYES[match.group("eye").lower()]) if match else None


def patient_column_of(df, given, path, image_column=None) -> str | None:
    """The patient column of a table: ``given`` (exact, else the one column matching it without
    case), else the first column with a name of :data:`PATIENT_COLUMN_NAMES` (compared
    without case, spaces, ``_`` or ``-``), else None."""
    if given is not None:
        if given in df.columns:
            return given
        matches = [c for c in df.columns if _column_key(c) == _column_key(given)]
        if len(matches) == 1:
            return matches[0]
        raise DataError(
            f"{path} has no patient column {given!r}; its columns are {list(df.columns)}. Name the column that "
            f"holds patient ids with {option_hint('patient_column', 'NAME')}"
            + (
                f", or {option_hint('patient_column', image_column)} if every image is another patient"
                if image_column
                else ""
            )
        )
    keys = {_column_key(n) for n in PATIENT_COLUMN_NAMES}
    return next((c for c in df.columns if _column_key(c) in keys and c != image_column), None)


def resolve_patients(
    df, names, path, *, patient_column=None, image_column=None, source="csv", warn_derived=True, warn_alone=True
):
    """Who every row's patient is, so that splits keep a patient's images together.

    The rule, in order:

    1. ``patient_column`` (the option ``data.options.patient_column``) names the column
       (naming the image column declares one image per patient);
    2. else a column with a recognised name (:data:`PATIENT_COLUMN_NAMES`) is used;
    3. else, when *every* image name says its eye (``12_left.jpg``, ``12_R.png``,
       ``12-OD.jpg``; :func:`eye_from_name`), the patient id and the eye are taken from the
       names, with a warning that says how to declare the column instead (unless
       ``warn_derived`` is False: EyePACS, whose documented layout this is);
    4. else, when some names say their eye and two of them share a patient id (one patient's
       eyes, which a split could separate), it stops with an error that says how to declare
       the column;
    5. else every image is its own patient, with a warning unless ``warn_alone`` is False
       (sources documented to have one image per patient).

    Args:
        df: the table (:func:`read_table`).
        names: the image name of every row.
        path: the table's path, for messages.
        patient_column: the declared column, or None.
        image_column: the table's image column (named in the fixes).
        source: the ``data.source`` (named in messages).
        warn_derived: warn in case 3.
        warn_alone: warn in case 5.

    Returns:
        ``(patient_ids, eyes, column)``: a string array; an array of ``left``/``right``
        when the eyes came from the names (else None); the patient column used (or None).

    Raises:
        DataError: an unknown ``patient_column``, or case 4.
    """
    names = [str(n) for n in names]
    column = patient_column_of(df, patient_column, path, image_column)
    if column is not None:
        ids = df[column].map(clean_id).to_numpy(dtype=object)
        empty = np.flatnonzero(ids == "")
        if len(empty):
            raise DataError(
                f"row {file_row(df, empty[0])} of {path}: the patient column {column!r} is empty ({len(empty)} such "
                "row(s)); every row needs its patient"
            )
        return ids.astype(str), None, column
    parsed = [eye_from_name(n) for n in names]
    declare = f"declare the patient column with {option_hint('patient_column', 'NAME')}" + (
        f" (or {option_hint('patient_column', image_column)} if every image is another patient)" if image_column else ""
    )
    if all(parsed):
        patients = np.array([p for p, _ in parsed], dtype=object).astype(str)
        eyes = np.array([e for _, e in parsed], dtype=object).astype(str)
        if warn_derived and len(set(patients)) < len(patients):
            example = next(n for n, p in zip(names, patients) if (patients == p).sum() > 1)
            warnings.warn(
                f"{path} has no patient column (looked for {SHOWN_PATIENT_COLUMNS}): the patient id "
                f"and the eye were taken from the image names ({example!r} -> patient "
                f"{eye_from_name(example)[0]!r}, {eye_from_name(example)[1]} eye), so a patient's eyes stay in one "
                f"split; to use a column instead, {declare}",
                stacklevel=3,
            )
        return patients, eyes, None
    paired = [p for p in parsed if p]
    ids = [p for p, _ in paired]
    if len(set(ids)) < len(ids):
        shared = next(i for i in ids if ids.count(i) > 1)
        examples = [n for n, p in zip(names, parsed) if p and p[0] == shared][:2]
        raise DataError(
            f"{path} has no patient column, and {len(paired)} of {len(names)} image names look like "
            f"'<patient>_<eye>' (e.g. {examples}): one patient's eyes could land in two splits, so the "
            f"{source} reader cannot tell the patients. Add a patient column and {declare}"
        )
    if warn_alone:
        warnings.warn(
            f"{path} has no patient column (looked for {SHOWN_PATIENT_COLUMNS}): every image is taken "
            f"as its own patient. If a patient has several images, {declare}",
            stacklevel=3,
        )
    return np.array(names, dtype=object).astype(str), None, None


# ---------------------------------------------------------------------------
# images


def default_image_dir(image_dir, base: Path, subfolders, names) -> Path:
    """``image_dir``, or the first ``base/<subfolder>`` (then ``base``) that holds the first
    of ``names``, else the first that exists."""
    if image_dir is not None:
        folder = Path(image_dir)
        if folder.is_file():
            raise DataError(
                f"image folder {folder} is a file: {option_hint('image_dir', 'DIR')} takes the folder that holds "
                "the images"
            )
        return folder
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
    """Stop at, or drop, rows whose images are missing.

    ``frame["source_row"]`` holds the file rows; it stays a column of the result, so later
    messages (splits, decoding) name the user's row. A path that is a folder counts as
    missing, with its own reason.

    Returns:
        ``(frame, skipped)``: the rows kept, and the rows dropped (``SKIPPED_COLUMNS``,
        reason ``missing``).
    """
    skipped = pd.DataFrame(columns=SKIPPED_COLUMNS)
    if not check_files:
        return frame.reset_index(drop=True), skipped
    missing = {c: ~frame[c].map(os.path.isfile).to_numpy(dtype=bool) for c in image_columns}
    any_missing = np.logical_or.reduce(list(missing.values()))
    if not any_missing.any():
        return frame.reset_index(drop=True), skipped
    found = [
        (int(frame["source_row"].iloc[i]), frame[c].iloc[i])
        for i in np.flatnonzero(any_missing)
        for c in image_columns
        if missing[c][i]
    ]
    details = [
        f"row {r} of {path}: " + ("a folder, not an image file" if os.path.isdir(p) else "image file not found")
        for r, p in found
    ]
    where = f" in {image_dir}" if image_dir is not None else ""
    if not skip_missing:
        listed = "\n  ".join(f"row {r}: {p}" + (" (a folder)" if os.path.isdir(p) else "") for r, p in found[:SHOW])
        more = f"\n  ... and {len(found) - SHOW} more" if len(found) > SHOW else ""
        raise DataError(
            f"{len(found)} image file(s) named in {path} do not exist{where}, e.g.\n  {listed}{more}\n"
            f"Fix: name the folder that holds the images with {option_hint('image_dir', 'DIR')}, or drop these "
            f"rows with {option_hint('skip_missing', 'true')} (they are then listed in the run's skipped.csv)."
        )
    if any_missing.all():
        raise DataError(
            f"none of the {len(frame)} image file(s) named in {path} exists{where} (e.g. {found[0][1]}): "
            f"name the folder that holds the images with {option_hint('image_dir', 'DIR')}"
        )
    skipped = skipped_rows([r for r, _ in found], [p for _, p in found], "missing", details)
    warnings.warn(
        f"skipped {int(any_missing.sum())} row(s) of {path} whose image files are missing; they are listed "
        "in the run's skipped.csv",
        stacklevel=3,
    )
    return frame[~any_missing].reset_index(drop=True), skipped


# ---------------------------------------------------------------------------
# finding a table in a folder, options

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
                f"{folder} holds several label tables {[p.name for p in found]}: give the file itself "
                f"(--data {found[0]})"
            )
    raise DataError(
        f"no label table for source {kind!r} in {folder} (looked for {LABEL_FILES[kind]}): give the file itself "
        f"(--data {folder / '<table>.csv'})"
    )


def check_reader_options(reader, options: dict, what: str, extra=()) -> None:
    """ConfigError naming ``what`` if ``options`` has keys that ``reader`` (its arguments
    after the path) and ``extra`` do not take, listing the valid ones."""
    valid = list(inspect.signature(reader).parameters)[1:] + list(extra)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"data.options {unknown} are not options of {what}; valid options: {valid} "
            f"(set one with --set data.options.NAME=VALUE)"
        )
