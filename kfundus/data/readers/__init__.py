"""Readers for the public retinal-image dataset layouts; each returns a Manifest.

Rows are eyes (``image``) or patients (``left_image``, ``right_image``) with absolute image
paths, the ``patient_id`` that splits keep together and one 0/1 column per label. Readers
check the table (required columns, 0/1 labels, unique ids) and that every image exists;
they do not decode images (the pipeline does). A missing image stops the reader with its
CSV row, unless ``skip_missing=True``: the row is then dropped and listed in
``manifest.skipped``. Row numbers in messages count the header as row 1.

Example: ``select_labels(read_odir("ODIR-5K/annotation.xlsx"), ["N", "G", "C"], drop_empty=True)``
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from kfundus import labels as kl
from kfundus.data.manifest import Manifest
from kfundus.data.splits import SPLIT_ALIASES
from kfundus.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
_SHOW = 5  # how many offending rows a message lists


def _choice(name, value, valid):
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(valid)}")


def _read_table(path: Path) -> pd.DataFrame:
    """A .csv/.xlsx table as stripped strings, without empty rows and unnamed empty columns."""
    if not path.is_file():
        raise DataError(f"label file {path} does not exist: check the path")
    try:
        if path.suffix.lower() in (".xlsx", ".xlsm"):
            df = pd.read_excel(path, dtype=str, engine="openpyxl")
        else:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise DataError(f"cannot read the label table {path}: {error}") from error
    df.columns = [str(c).strip() for c in df.columns]
    df = df.fillna("").astype(str).apply(lambda column: column.str.strip())
    df = df.drop(columns=[c for c in df.columns if c.startswith("Unnamed:") and (df[c] == "").all()])
    return df[(df != "").any(axis=1)].reset_index(drop=True)


def _row(i: int) -> int:
    return int(i) + 2  # file row number of data row i: the header is row 1


def _first(mask) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0])


def _require_columns(df, required, path, hint=""):
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks the column(s) {missing}; its columns are {list(df.columns)}. {hint}")


def _ints(df, column, path, high=1, what="label value") -> np.ndarray:
    """A column as int in 0..high; any other value stops with its row and column."""
    values = pd.to_numeric(df[column], errors="coerce")
    bad = ~values.isin(range(high + 1)).to_numpy()
    if bad.any():
        i = _first(bad)
        raise DataError(f"row {_row(i)} of {path}, column {column!r}: {what} {df[column].iloc[i]!r} is not "
                        f"{'0 or 1' if high == 1 else f'an integer 0-{high}'} ({int(bad.sum())} such cell(s) "
                        "in that column). Fix the table.")
    return values.astype("int64").to_numpy()


def _binary(df, columns, path) -> pd.DataFrame:
    return pd.DataFrame({c: _ints(df, c, path) for c in columns})


def _unique(values: pd.Series, path, what: str):
    dup = values.duplicated(keep=False).to_numpy()
    if dup.any():
        names = list(dict.fromkeys(values[dup]))[:_SHOW]
        rows = [_row(i) for i in np.flatnonzero(dup)][: 2 * _SHOW]
        raise DataError(f"{path}: duplicate {what}(s) {names} (rows {rows}). Each {what} must appear once: "
                        "remove or rename the duplicate rows.")


def _clean_id(value) -> str:
    text = str(value).strip()
    return text[:-2] if re.fullmatch(r"\d+\.0", text) else text


def _default_dir(image_dir, base: Path, subfolders, names) -> Path:
    """``image_dir``, or the first ``base/<subfolder>`` (then ``base``) that holds the first
    of ``names``, else the first that exists."""
    if image_dir is not None:
        return Path(image_dir)
    candidates = [base / s for s in subfolders if (base / s).is_dir()] + [base]
    probe = str(list(names)[0]) if len(names) else None
    return next((c for c in candidates if probe and (c / probe).exists()), candidates[0])


def _abs(folder, names) -> list[str]:
    return [os.path.abspath(os.path.join(folder, str(n))) for n in names]


def _image_names(stems, extensions, folder, check) -> list[str]:
    """File names for ids: ``stem + extensions[0]``, or with ``check`` the first extension
    whose file exists; a stem that has an image extension already is kept."""
    def name(stem):
        if stem.lower().endswith(IMAGE_EXTENSIONS):
            return stem
        found = [stem + e for e in extensions if check and os.path.isfile(os.path.join(folder, stem + e))]
        return (found or [stem + extensions[0]])[0]
    return [name(str(stem)) for stem in stems]


def _check_files(frame, path, image_columns, check_files, skip_missing, image_dir=None):
    """Stop at, or drop, rows whose images are missing (``frame["_row"]``: file rows)."""
    skipped = pd.DataFrame({"path": pd.Series([], dtype=str), "reason": pd.Series([], dtype=str)})
    if check_files:
        missing = {c: ~frame[c].map(os.path.isfile).to_numpy(dtype=bool) for c in image_columns}
        any_missing = np.logical_or.reduce(list(missing.values()))
        if any_missing.any():
            found = [(int(frame["_row"].iloc[i]), frame[c].iloc[i])
                     for i in np.flatnonzero(any_missing) for c in image_columns if missing[c][i]]
            if not skip_missing:
                listed = "\n  ".join(f"row {r}: {p}" for r, p in found[:_SHOW])
                where = f" (image_dir={image_dir})" if image_dir is not None else ""
                raise DataError(f"{len(found)} image file(s) named in {path} do not exist{where}, e.g.\n  "
                                f"{listed}\nFix: point image_dir at the folder that holds the images, or pass "
                                "skip_missing=True to drop these rows (they are listed in manifest.skipped).")
            skipped = pd.DataFrame({"path": [p for _, p in found],
                                    "reason": [f"image file not found (row {r} of {path})" for r, _ in found]})
            warnings.warn(f"skipped {int(any_missing.sum())} row(s) of {path} whose image files are "
                          "missing; see manifest.skipped", stacklevel=3)
            frame = frame[~any_missing]
    return frame.drop(columns="_row").reset_index(drop=True), skipped


ODIR_COLUMNS = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus",
                "Left-Diagnostic Keywords", "Right-Diagnostic Keywords", *kl.ODIR_LABELS]
_SIDES = ("left", "right")


def _eye_text(eye: str, keywords: str) -> str:
    words = kl.split_keywords(keywords)
    return f"{eye} eye: {', '.join(words) if words else 'no keywords'}."


def _keyword_labels(keywords) -> pd.DataFrame:
    return pd.DataFrame([kl.odir_keywords_to_labels(k) for k in keywords], columns=kl.ODIR_LABELS)


def _report_odir_keywords(ids, keywords, eye_y, y, path):
    """Warn about eyes without diagnostic keywords, and patient labels that differ from
    their eyes' (:func:`kfundus.labels.odir_patient_labels`)."""
    empty = [f"{ids[i]} {s} ({keywords[s][i]!r})"
             for s in _SIDES for i in np.flatnonzero(eye_y[s].sum(axis=1) == 0)]
    if empty:
        warnings.warn(f"{path}: {len(empty)} eye(s) have only non-diagnostic keywords, so no label, e.g. "
                      f"{empty[:_SHOW]}; select_labels(..., drop_empty=True) drops them", stacklevel=3)
    eyes = [r.to_dict("records") for r in (eye_y["left"], eye_y["right"])]
    union = pd.DataFrame([kl.odir_patient_labels(a, b) for a, b in zip(*eyes)], columns=kl.ODIR_LABELS)
    differ = np.flatnonzero((union.to_numpy() != y.to_numpy()).any(axis=1))
    if len(differ):
        warnings.warn(f"{path}: {len(differ)} of {len(y)} patients have labels that differ from the union of "
                      f"their eyes' keyword labels, e.g. IDs {[ids[i] for i in differ[:_SHOW]]}", stacklevel=3)


def read_odir(annotation, image_dir=None, *, level="eye", eye_labels="keywords",
              check_files=True, skip_missing=False) -> Manifest:
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
    _choice("level", level, ("eye", "patient"))
    _choice("eye_labels", eye_labels, ("keywords", "patient"))
    path = Path(annotation)
    df = _read_table(path)
    _require_columns(df, ODIR_COLUMNS, path, "Is this the official ODIR-5K annotation? "
                     "For Kaggle's full_df.csv use read_odir_kaggle.")
    ids = df["ID"].map(_clean_id)
    _unique(ids, path, "patient ID")
    y = _binary(df, kl.ODIR_LABELS, path)
    image_dir = _default_dir(image_dir, path.parent, ["images", "Training Images"], df["Left-Fundus"])
    keywords = {s: df[f"{s.capitalize()}-Diagnostic Keywords"].tolist() for s in _SIDES}
    eye_y = {s: _keyword_labels(keywords[s]) for s in _SIDES}
    _report_odir_keywords(ids.tolist(), keywords, eye_y, y, path)
    texts = {s: [_eye_text(s, k) for k in keywords[s]] for s in _SIDES}
    images = {s: _abs(image_dir, df[f"{s.capitalize()}-Fundus"]) for s in _SIDES}
    extra = {"age": pd.to_numeric(df["Patient Age"], errors="coerce").to_numpy(),
             "sex": df["Patient Sex"].to_numpy(), "_row": np.arange(len(df)) + 2}
    if level == "patient":
        frame = pd.DataFrame({"patient_id": ids, "left_image": images["left"], "right_image": images["right"],
                              **y, "left_keywords": keywords["left"], "right_keywords": keywords["right"],
                              **extra, "text": [f"{a} {b}" for a, b in zip(texts["left"], texts["right"])]})
    else:
        frame = pd.concat([pd.DataFrame({
            "patient_id": ids, "image": images[s], "eye": s, **(eye_y[s] if eye_labels == "keywords" else y),
            **{f"patient_{c}": y[c] for c in kl.ODIR_LABELS}, "keywords": keywords[s], **extra, "text": texts[s]})
            for s in _SIDES], ignore_index=True).sort_values(["_row", "eye"], kind="stable")
    columns = ["left_image", "right_image"] if level == "patient" else ["image"]
    frame, skipped = _check_files(frame, path, columns, check_files, skip_missing, image_dir)
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
    df = _read_table(path)
    _require_columns(df, ["filename", *ODIR_COLUMNS[:3], *ODIR_COLUMNS[5:]], path,
                     "Is this Kaggle's full_df.csv? For the official annotation use read_odir.")
    _unique(df["filename"], path, "filename")
    eyes = df["filename"].str.extract(r"_(left|right)\.", flags=re.I)[0].str.lower()
    if eyes.isna().any():
        i = _first(eyes.isna())
        raise DataError(f"row {_row(i)} of {path}: filename {df['filename'].iloc[i]!r} does not say "
                        "which eye it is (expected '<ID>_left.jpg' or '<ID>_right.jpg')")
    y = _binary(df, kl.ODIR_LABELS, path)
    keywords = np.where(eyes == "left", df["Left-Diagnostic Keywords"], df["Right-Diagnostic Keywords"])
    image_dir = _default_dir(image_dir, path.parent, ["preprocessed_images", "ODIR-5K/Training Images",
                                                      "Training Images", "images"], df["filename"])
    eye_y = _keyword_labels(keywords)
    empty = df["filename"][eye_y.sum(axis=1).to_numpy() == 0].tolist()
    if empty:
        warnings.warn(f"{path}: {len(empty)} image(s) have only non-diagnostic keywords, e.g. {empty[:_SHOW]}",
                      stacklevel=2)
    frame = pd.DataFrame({
        "patient_id": df["ID"].map(_clean_id), "image": _abs(image_dir, df["filename"]), "eye": eyes,
        **eye_y, **{f"patient_{c}": y[c] for c in kl.ODIR_LABELS}, "keywords": keywords,
        "age": pd.to_numeric(df["Patient Age"], errors="coerce"), "sex": df["Patient Sex"],
        "text": [_eye_text(e, k) for e, k in zip(eyes, keywords)], "_row": np.arange(len(df)) + 2})
    frame, skipped = _check_files(frame, path, ["image"], check_files, skip_missing, image_dir)
    return Manifest(frame, list(kl.ODIR_LABELS), "multilabel", "odir_kaggle", skipped)


_RFMID_SPLITS = {"train": ("Training",), "val": ("Validation", "Evaluation"), "test": ("Testing", "Test")}


def _rfmid_split(path: Path) -> str | None:
    match = re.search("training|validation|evaluation|test", path.stem, re.I)
    return SPLIT_ALIASES[match.group(0).lower()] if match else None


def read_rfmid(labels_csv, image_dir=None, *, view="46", check_files=True, skip_missing=False) -> Manifest:
    """Read one RFMiD label table, ``RFMiD_{Training,Validation,Testing}_Labels.csv``.

    Args:
        labels_csv: the table: ``ID`` and the 46 label columns of :data:`kfundus.labels.RFMID_46`.
        image_dir: the folder of ``{ID}.png``; default the folder beside the CSV named after
            its split (``Training``; ``Validation`` or ``Evaluation``; ``Testing`` or
            ``Test``), else the CSV's folder.
        view: ``"46"`` (every column) or ``"29"``, the RIADD view: the 18 rare diseases
            (:data:`kfundus.labels.RFMID_RARE`) pooled into ``OTHER`` (1 if any is).
        check_files, skip_missing: as in :func:`read_odir`.

    ``split`` comes from the file name (Training -> train, Validation -> val, Testing ->
    test). RFMiD has no patient ids: every image is its own patient. The ids restart at 1
    in each split, so ``patient_id`` is ``"{split}-{ID}"`` (``ID`` when the name gives no
    split); ``id`` keeps the original.
    """
    _choice("view", str(view), ("46", "29"))
    path = Path(labels_csv)
    df = _read_table(path)
    _require_columns(df, ["ID", *kl.RFMID_46], path, "Is this an RFMiD *_Labels.csv table?")
    ids = df["ID"].map(_clean_id)
    _unique(ids, path, "ID")
    y = _binary(df, kl.RFMID_46, path)
    split = _rfmid_split(path)
    if str(view) == "29":
        y = y.drop(columns=kl.RFMID_RARE).assign(OTHER=y[kl.RFMID_RARE].max(axis=1))
    labels = list(kl.RFMID_46 if str(view) == "46" else kl.RIADD_29)
    image_dir = _default_dir(image_dir, path.parent, _RFMID_SPLITS.get(split, ()), ids + ".png")
    names = _image_names(ids, (".png", ".jpg", ".jpeg", ".tif"), image_dir, check_files)
    frame = pd.DataFrame({"patient_id": [f"{split}-{i}" if split else i for i in ids],
                          "image": _abs(image_dir, names), "eye": "", **y[labels], "id": ids.to_numpy(),
                          **({"split": split} if split else {}), "_row": np.arange(len(df)) + 2})
    frame, skipped = _check_files(frame, path, ["image"], check_files, skip_missing, image_dir)
    return Manifest(frame, labels, "multilabel", "rfmid", skipped)


def read_rfmid_dir(root, *, view="46", check_files=True, skip_missing=False) -> Manifest:
    """Find ``RFMiD_*_Labels.csv`` (train, val, test) anywhere under ``root``, read each
    with :func:`read_rfmid` and concatenate them (train, val, test order). A split that
    is absent is reported with a warning; two tables for one split stop with an error."""
    root = Path(root)
    found: dict[str, Path] = {}
    for csv in sorted(p for p in root.rglob("*.csv") if re.search(r"rfmid.*labels", p.name, re.I)):
        split = _rfmid_split(csv)
        if split in found:
            raise DataError(f"two RFMiD tables for the {split} split: {found[split]} and {csv}; "
                            "keep one, or read each with read_rfmid")
        if split:
            found[split] = csv
    if not found:
        raise DataError(f"no RFMiD_{{Training,Validation,Testing}}_Labels.csv under {root}: check the folder")
    absent = [s for s in _RFMID_SPLITS if s not in found]
    if absent:
        warnings.warn(f"{root}: no RFMiD label table for the split(s) {absent}", stacklevel=2)
    parts = [read_rfmid(found[s], view=view, check_files=check_files, skip_missing=skip_missing)
             for s in _RFMID_SPLITS if s in found]
    return Manifest(pd.concat([p.frame for p in parts], ignore_index=True), parts[0].labels, "multilabel",
                    "rfmid", pd.concat([p.skipped for p in parts], ignore_index=True))


_DR_LAYOUTS = {  # layout: (image column, grade column, image extensions)
    "aptos": ("id_code", "diagnosis", (".png", ".jpg", ".jpeg")),
    "eyepacs": ("image", "level", (".jpeg", ".jpg", ".png")),
    "idrid": ("Image name", "Retinopathy grade", (".jpg", ".jpeg", ".png", ".tif")),
}


def read_dr_grades(csv, image_dir=None, *, layout="auto", check_files=True, skip_missing=False) -> Manifest:
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

    Returns a ``"multiclass"`` manifest: one-hot :data:`kfundus.labels.DR_GRADES` and an
    int ``grade``. APTOS and IDRiD have no patient ids: each image is its own patient. No
    ``split`` column: a grading table does not tell an official split.
    """
    _choice("layout", layout, ("auto", *_DR_LAYOUTS))
    path = Path(csv)
    df = _read_table(path)
    if layout == "auto":
        known = {n: [i, g] for n, (i, g, _) in _DR_LAYOUTS.items()}
        layout = next((n for n, c in known.items() if set(c) <= set(df.columns)), None)
        if layout is None:
            raise DataError(f"{path}: cannot tell the DR-grading layout from its columns {list(df.columns)}; "
                            f"known layouts and their columns: {known}. Pass layout=... or fix the header.")
    image_col, grade_col, extensions = _DR_LAYOUTS[layout]
    required = [image_col, grade_col] + (["Risk of macular edema"] if layout == "idrid" else [])
    _require_columns(df, required, path)
    names = df[image_col].map(_clean_id)
    _unique(names, path, image_col)
    grade = _ints(df, grade_col, path, high=4, what="grade")
    subfolders = {"aptos": [f"{path.stem}_images", "train_images"], "eyepacs": ["train"],
                  "idrid": ["images/test", "images/train"]}[layout]
    image_dir = _default_dir(image_dir, path.parent, subfolders, names + extensions[0])
    patient, eye = names, ""
    if layout == "eyepacs":
        parts = names.str.extract(r"^(.*)_(left|right)$", flags=re.I)
        patient, eye = parts[0].fillna(names), parts[1].str.lower().fillna("")
    dme = {"dme_risk": _ints(df, required[-1], path, high=2, what="grade")} if layout == "idrid" else {}
    frame = pd.DataFrame({"image": _abs(image_dir, _image_names(names, extensions, image_dir, check_files)),
                          "patient_id": patient, "eye": eye, "grade": grade,
                          **{g: (grade == k).astype("int64") for k, g in enumerate(kl.DR_GRADES)},
                          **dme, "id": names, "_row": np.arange(len(df)) + 2})
    frame, skipped = _check_files(frame, path, ["image"], check_files, skip_missing, image_dir)
    return Manifest(frame, list(kl.DR_GRADES), "multiclass", layout, skipped)


_KERMANY_NAME = r"^[A-Za-z]+-(\d+)-\d+$"  # CNV-1016042-1: class, patient, image


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith((".", "__")))


def _patient_of(stem: str, pattern, path) -> str:
    match = re.search(pattern or _KERMANY_NAME, stem)
    if pattern is None and not match:
        return stem
    if not match:
        raise DataError(f"file {path} does not match patient_pattern {pattern!r}: fix the pattern "
                        "(its first group, or the whole match, is the patient id)")
    return match.group(1) if match.groups() else match.group(0)


def read_class_folders(root, *, classes=None, extensions=IMAGE_EXTENSIONS, patient_pattern=None) -> Manifest:
    """Read a class-per-folder tree like Kermany OCT: ``root/{train,val,test}/{class}/*``
    (``split`` from the first level) or ``root/{class}/*``.

    Args:
        root: the tree's root.
        classes: class folder names in label order; default every class folder, sorted.
        extensions: image file extensions (case-insensitive); other files are ignored.
        patient_pattern: a regular expression searched in each file stem; its first group
            (or the whole match) is the patient id. Default: Kermany names
            ``CNV-1016042-1`` give the middle number, any other name its own stem.

    An empty class folder (no image with ``extensions``), or one absent from a split,
    stops the reader: a class must not silently vanish. Returns a ``"multiclass"``
    manifest (one-hot columns, and ``label``, the class name).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    top = _visible_dirs(root)
    in_splits = [d for d in top if d.name.lower() in SPLIT_ALIASES]
    if in_splits and len(in_splits) != len(top):
        odd = [d.name for d in top if d not in in_splits]
        raise DataError(f"{root} mixes split folders {[d.name for d in in_splits]} with other folders {odd}: "
                        "move the others away, or point root at a split folder")
    groups = [(SPLIT_ALIASES[d.name.lower()], d) for d in in_splits] or [(None, root)]
    classes = list(classes or sorted({d.name for _, g in groups for d in _visible_dirs(g)}))
    if not classes:
        raise DataError(f"{root} has no class folders: expected root/<class>/<images> or root/<split>/<class>/...")
    extensions = tuple("." + e.lower().lstrip(".") for e in extensions)
    rows = []
    for split, group in groups:
        for label in classes:
            folder = group / label
            if not folder.is_dir():
                raise DataError(f"class folder {folder} does not exist; the classes are {classes}. "
                                "Add the folder with its images, or pass classes= without it")
            files = sorted(f for f in folder.iterdir()
                           if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in extensions)
            if not files:
                raise DataError(f"class folder {folder} has no images with extensions {list(extensions)}: "
                                "add its images, or pass classes= without it")
            rows += [(os.path.abspath(f), _patient_of(f.stem, patient_pattern, f), label, split) for f in files]
    frame = pd.DataFrame(rows, columns=["image", "patient_id", "label", "split"]).assign(eye="")
    frame = frame.assign(**{c: (frame["label"] == c).astype("int64") for c in classes})
    frame = frame[["image", "patient_id", "eye", "label", *classes] + (["split"] if in_splits else [])]
    return Manifest(frame, classes, "multiclass", "folders")


_NOT_LABELS = {"image", "patient_id", "patient", "eye", "split", "text", "keywords", "id"}


def read_csv(csv, *, image_column="image", label_columns=None, patient_column=None, image_dir=None,
             task="multilabel", check_files=True, skip_missing=False) -> Manifest:
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
    _choice("task", task, ("multilabel", "multiclass", "binary"))
    path = Path(csv)
    df = _read_table(path)
    _require_columns(df, [image_column], path, "Pass image_column= to name the image column.")
    patient_column = patient_column or ("patient_id" if "patient_id" in df.columns else None)
    if patient_column:
        _require_columns(df, [patient_column], path, "Pass patient_column= to name the patient column.")
    candidates = [c for c in df.columns if c not in _NOT_LABELS | {image_column, patient_column}]
    label_columns = candidates if label_columns is None else list(label_columns)
    unknown = [c for c in label_columns if c not in df.columns]
    if unknown or not label_columns:
        raise DataError(f"{path} has no label column(s) {unknown or '(none given)'}; valid label columns: "
                        f"{candidates}. Name them with label_columns=")
    if task == "binary" and len(label_columns) != 1:
        raise DataError(f"task='binary' needs one label column, {path} gives {list(label_columns)}")
    _unique(df[image_column], path, image_column)
    y = _binary(df, label_columns, path)
    if task == "multiclass":
        bad = y.sum(axis=1).to_numpy() != 1
        if bad.any():
            raise DataError(f"row {_row(_first(bad))} of {path}: task='multiclass' needs exactly one 1 among "
                            f"{label_columns} ({int(bad.sum())} row(s) do not); use task='multilabel'")
    folder = Path(image_dir) if image_dir is not None else path.parent
    frame = pd.DataFrame({"image": _abs(folder, df[image_column]),
                          "patient_id": df[patient_column] if patient_column else df[image_column],
                          "eye": df["eye"].str.lower() if "eye" in df.columns else "", **y})
    if "split" in df.columns:
        split = df["split"].str.lower().map(SPLIT_ALIASES)
        if split.isna().any():
            i = _first(split.isna())
            raise DataError(f"row {_row(i)} of {path}, column 'split': {df['split'].iloc[i]!r} is not "
                            "train, val or test")
        frame["split"] = split.to_numpy()
    frame = frame.assign(**({"text": df["text"]} if "text" in df.columns else {}))
    frame["_row"] = np.arange(len(df)) + 2
    frame, skipped = _check_files(frame, path, ["image"], check_files, skip_missing, folder)
    return Manifest(frame, list(label_columns), task, path.stem, skipped)


SOURCES = {"odir": read_odir, "odir_kaggle": read_odir_kaggle, "rfmid": read_rfmid,
           "dr": read_dr_grades, "folders": read_class_folders, "csv": read_csv}
from kfundus.data.hrdc import read_hrdc  # noqa: E402 - CGI-HRDC hypertensive retinopathy (binary)

SOURCES["hrdc"] = read_hrdc
_LABEL_FILES = {"odir": ["annotation.csv", "*.xlsx", "*.csv"], "odir_kaggle": ["full_df.csv", "*.csv"],
                "dr": ["trainLabels.csv", "train.csv", "test.csv", "*.csv"]}


def _find_label_file(kind: str, folder: Path) -> Path:
    for pattern in _LABEL_FILES[kind]:
        found = sorted(p for p in folder.glob(pattern) if not p.name.startswith(("~$", ".")))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise DataError(f"{folder} holds several label tables {[p.name for p in found]}: "
                            "give the file itself as path")
    raise DataError(f"no label table for source {kind!r} in {folder} (looked for {_LABEL_FILES[kind]}): "
                    "give the file itself as path")


def check_reader_options(reader, options: dict, what: str, extra=()) -> None:
    """ConfigError naming ``what`` if ``options`` has keys that ``reader`` (its arguments
    after the path) and ``extra`` do not take, listing the valid ones."""
    valid = list(inspect.signature(reader).parameters)[1:] + list(extra)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"option(s) {unknown} are not valid for {what}; valid options: {valid}")


def load_source(kind: str, path, **options) -> Manifest:
    """Read a dataset by name, for configs: ``data: {source: odir, path: ..., level: eye}``.

    Args:
        kind: a key of :data:`SOURCES`: odir, odir_kaggle, rfmid, dr, folders, csv.
        path: the label file or a folder: odir/odir_kaggle/dr find their table in it by
            name, rfmid reads every split in it (:func:`read_rfmid_dir`).
        **options: the reader's keyword arguments, and ``labels``/``drop_empty`` for
            :func:`select_labels`.
    """
    if kind not in SOURCES:
        raise ConfigError(f"data source {kind!r} is unknown; valid sources: {sorted(SOURCES)}")
    options = dict(options)
    labels, drop_empty = options.pop("labels", None), options.pop("drop_empty", False)
    path = Path(path)
    reader = read_rfmid_dir if kind == "rfmid" and path.is_dir() else SOURCES[kind]
    check_reader_options(reader, options, f"data source {kind!r}", extra=["labels", "drop_empty"])
    if kind in _LABEL_FILES and path.is_dir():
        path = _find_label_file(kind, path)
    manifest = reader(path, **options)
    if labels is not None:
        manifest = select_labels(manifest, labels, drop_empty=drop_empty)
    return manifest


def select_labels(manifest: Manifest, labels, *, drop_empty=False) -> Manifest:
    """Keep some label columns (in this order), e.g. ODIR per-eye ``N, G, C`` for a
    normal / glaucoma / cataract task. ``drop_empty`` drops rows with none of them (e.g.
    eyes with other diseases only) and lists them in ``manifest.skipped``; a multiclass
    manifest needs it whenever some rows would be left with no class."""
    labels = [labels] if isinstance(labels, str) else list(labels)
    unknown = [c for c in labels if c not in manifest.labels]
    if unknown or not labels:
        raise DataError(f"label(s) {unknown or labels} are not in the {manifest.name or 'dataset'} "
                        f"labels; valid labels: {manifest.labels}")
    out = manifest.with_labels(labels)
    keep = out.frame[labels].to_numpy().sum(axis=1) > 0
    if drop_empty:
        dropped = pd.DataFrame({"path": out.frame.loc[~keep, out.image_columns[0]].to_numpy(),
                                "reason": f"none of the labels {labels}"})
        out = out.subset(keep)
        out.skipped = pd.concat([manifest.skipped, dropped], ignore_index=True)
    elif out.task == "multiclass" and not keep.all():
        raise DataError(f"{int((~keep).sum())} row(s) have none of the classes {labels}, so they would have no "
                        "class: pass drop_empty=True to drop them")
    return out
