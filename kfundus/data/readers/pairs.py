"""Image-report pairs for RET-CLIP pre-training: readers that return a patient-level Manifest.

A pairs dataset is a Manifest with one row per (patient, report): ``patient_id``,
``left_image`` and ``right_image`` (absolute paths) and ``text`` (the report), plus
optional columns: ``text_id``, ``left_keywords``/``right_keywords``, per-eye 0/1 labels
``left_N, left_G, ..., right_N, ...`` (zero-shot evaluation), ``split``. Its labels are
the patient's labels where the source has them (ODIR: N..O, so splits are stratified),
else none.

Readers (:func:`load_pairs` picks one by name):

- :func:`read_retclip`: RET-CLIP's own format, ``{split}_imgs.tsv``
  (``patient_id<TAB>base64(left)<TAB>base64(right)``, standard or URL-safe base64 as in
  Chinese-CLIP) and ``{split}_texts.jsonl`` (``{"text_id", "text", "image_ids": [patient_id]}``).
  The images are decoded once into files, so the rest of kfundus reads files.
- :func:`read_pairs_csv`: a plain CSV ``patient_id,left,right,report``.
- :func:`odir_pairs`: ODIR-5K (or ``kfundus synth --layout odir``): the report is composed
  from the per-eye diagnostic keywords, "left eye: cataract. right eye: normal fundus.".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import pandas as pd

from kfundus import labels as kl
from kfundus.data.cache import default_cache_dir
from kfundus.data.manifest import Manifest
from kfundus.data.readers.odir import eye_text, keyword_labels, read_odir
from kfundus.data.readers.table import (
    SHOW,
    absolute_paths,
    check_image_files,
    check_reader_options,
    clean_id,
    file_row,
    file_rows,
    find_label_file,
    first_index,
    read_table,
    require_columns,
)
from kfundus.errors import ConfigError, DataError

PAIR_COLUMNS = ["patient_id", "left_image", "right_image", "text"]


def _pairs(frame: pd.DataFrame, name: str, skipped=None, labels=(), source="") -> Manifest:
    frame = frame[PAIR_COLUMNS + [c for c in frame.columns if c not in PAIR_COLUMNS]].reset_index(drop=True)
    manifest = Manifest(frame, list(labels), "multilabel", name, source=str(source))
    if skipped is not None:
        manifest.skipped = skipped
    return manifest


# ---------------------------------------------------------------------------
# RET-CLIP tsv + jsonl


def _image_extension(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:2] == b"BM":
        return ".bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tif"
    return ".img"  # the pipeline reports what it is when it cannot decode it


def _b64decode(text: str) -> bytes:
    """Standard or URL-safe base64 (Chinese-CLIP, which RET-CLIP builds on, writes URL-safe);
    missing padding is tolerated."""
    text = text.strip().translate(str.maketrans("-_", "+/"))
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _safe_name(patient_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", patient_id)
    if name != patient_id:  # keep distinct ids distinct
        name += "-" + hashlib.sha1(patient_id.encode()).hexdigest()[:8]
    return name


def _write_once(path: Path, data: bytes) -> None:
    if path.is_file() and path.stat().st_size == len(data):
        return
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _retclip_files(path, split: str) -> tuple[Path, Path]:
    path = Path(path)
    if path.is_dir():
        tsv, jsonl = path / f"{split}_imgs.tsv", path / f"{split}_texts.jsonl"
    else:
        match = re.fullmatch(r"(.*)_imgs\.tsv", path.name)
        if not match:
            raise DataError(
                f"{path} is not a RET-CLIP image file: give the folder holding {split}_imgs.tsv and "
                f"{split}_texts.jsonl, or the path of a '<split>_imgs.tsv'"
            )
        tsv, jsonl = path, path.with_name(f"{match.group(1)}_texts.jsonl")
    for file in (tsv, jsonl):
        if not file.is_file():
            raise DataError(
                f"RET-CLIP file {file} does not exist: a RET-CLIP split needs {tsv.name} "
                f"(patient_id<TAB>base64(left)<TAB>base64(right)) and {jsonl.name}"
            )
    return tsv, jsonl


def _read_tsv(tsv: Path, extract_dir: Path) -> dict[str, tuple[str, str]]:
    images: dict[str, tuple[str, str]] = {}
    with open(tsv, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 3:
                raise DataError(
                    f"line {number} of {tsv}: expected 3 tab-separated fields "
                    f"patient_id, base64(left), base64(right); found {len(fields)}"
                )
            patient = fields[0].strip()
            if not patient:
                raise DataError(f"line {number} of {tsv}: empty patient_id")
            if patient in images:
                raise DataError(
                    f"line {number} of {tsv}: patient_id {patient!r} appears twice; each patient "
                    "has one line (left and right image)"
                )
            paths = []
            for side, text in zip(("left", "right"), fields[1:]):
                try:
                    data = _b64decode(text)
                except (binascii.Error, ValueError) as error:
                    raise DataError(
                        f"line {number} of {tsv}: the {side} image of patient {patient!r} is not valid base64 ({error})"
                    ) from error
                if not data:
                    raise DataError(f"line {number} of {tsv}: the {side} image of patient {patient!r} is empty")
                file = extract_dir / f"{_safe_name(patient)}_{side}{_image_extension(data)}"
                _write_once(file, data)
                paths.append(str(file.resolve()))
            images[patient] = (paths[0], paths[1])
    if not images:
        raise DataError(f"{tsv} has no image lines")
    return images


def read_retclip(path, split: str = "train", extract_dir=None) -> Manifest:
    """Read a RET-CLIP split: ``{split}_imgs.tsv`` + ``{split}_texts.jsonl``.

    Args:
        path: the folder holding both files, or the ``..._imgs.tsv`` path (the jsonl is
            found beside it).
        split: the split's file prefix when ``path`` is a folder.
        extract_dir: where the decoded images go, as ``{patient_id}_{left|right}.{ext}``
            (extension from the image bytes); default a folder under the kfundus cache
            keyed by the tsv's path, size and modification time. A file already there
            with the same size is not rewritten.

    Returns:
        A pairs Manifest, one row per (patient, text): a text whose ``image_ids`` lists
        several patients gives several rows. Extra column ``text_id``. Patients without a
        text are left out (with a warning).

    Raises:
        DataError: naming the file and line: a tsv line without 3 tab-separated fields,
            bad base64, a duplicate patient id; a malformed JSON line, a missing key, an
            empty text, a patient id the tsv does not have.
    """
    tsv, jsonl = _retclip_files(path, split)
    if extract_dir is None:
        st = tsv.stat()
        key = hashlib.sha1(f"{tsv.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        extract_dir = default_cache_dir() / "retclip" / f"{tsv.stem}-{key}"
    extract_dir = Path(extract_dir)
    extract_dir.mkdir(parents=True, exist_ok=True)
    images = _read_tsv(tsv, extract_dir)
    rows, used = [], set()
    with open(jsonl, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"line {number} of {jsonl}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from error
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object with text_id, text, image_ids")
            missing = [k for k in ("text_id", "text", "image_ids") if k not in record]
            if missing:
                raise DataError(
                    f"{where}: missing key(s) {missing}; each line is "
                    '{"text_id": ..., "text": ..., "image_ids": [patient_id, ...]}'
                )
            text, ids = str(record["text"]).strip(), record["image_ids"]
            if not text:
                raise DataError(f"{where}: empty text (text_id {record['text_id']!r})")
            ids = [ids] if isinstance(ids, (str, int)) else ids
            if not isinstance(ids, list) or not ids:
                raise DataError(f"{where}: image_ids must be a non-empty list of patient ids")
            for patient in (str(i).strip() for i in ids):
                if patient not in images:
                    raise DataError(
                        f"{where}: image id {patient!r} (text_id {record['text_id']!r}) has no line in {tsv}"
                    )
                used.add(patient)
                rows.append((patient, *images[patient], text, str(record["text_id"])))
    if not rows:
        raise DataError(f"{jsonl} has no texts")
    unused = [p for p in images if p not in used]
    if unused:
        warnings.warn(
            f"{len(unused)} patient(s) of {tsv} have no text in {jsonl} and are left out, e.g. {unused[:SHOW]}",
            stacklevel=2,
        )
    return _pairs(pd.DataFrame(rows, columns=[*PAIR_COLUMNS, "text_id"]), f"retclip-{tsv.stem}", source=tsv)


# ---------------------------------------------------------------------------
# Plain CSV

CSV_COLUMNS = ["patient_id", "left", "right", "report"]


def read_pairs_csv(csv, image_dir=None, *, check_files: bool = True, skip_missing: bool = False) -> Manifest:
    """Read a CSV with columns ``patient_id, left, right, report`` (others are kept).

    Args:
        csv: the table. Row numbers in messages count the header as row 1.
        image_dir: relative image paths are resolved against it (default: the CSV's folder).
        check_files, skip_missing: check that every image exists; drop (with a warning)
            instead of stopping at rows whose images are missing.

    A patient may have several rows (several reports); each row is one training pair.
    """
    path = Path(csv)
    df = read_table(path)
    require_columns(
        df,
        CSV_COLUMNS,
        path,
        "A pairs CSV has one row per patient report: patient_id,left,right,report (left/right: image paths).",
    )
    for column in CSV_COLUMNS:
        empty = (df[column] == "").to_numpy()
        if empty.any():
            i = first_index(empty)
            what = "empty report" if column == "report" else f"empty {column!r}"
            raise DataError(
                f"row {file_row(df, i)} of {path}: {what} ({int(empty.sum())} such row(s)); every row "
                "needs patient_id, left, right and a report. Fill or remove them."
            )
    folder = Path(image_dir) if image_dir is not None else path.parent
    frame = df.drop(columns=CSV_COLUMNS).assign(
        patient_id=df["patient_id"].map(clean_id),
        left_image=absolute_paths(folder, df["left"]),
        right_image=absolute_paths(folder, df["right"]),
        text=df["report"],
        source_row=file_rows(df),
    )
    frame, skipped = check_image_files(frame, path, ["left_image", "right_image"], check_files, skip_missing, image_dir)
    return _pairs(frame, path.stem, skipped, source=path)


# ---------------------------------------------------------------------------
# ODIR: keywords -> report


def odir_report(left_keywords: str, right_keywords: str, patient_labels=None) -> str:
    """The report text of one ODIR patient: ``"left eye: cataract. right eye: normal
    fundus."`` - each eye's keywords (split on ``,``/``，``, lower-cased, in their order,
    non-diagnostic ones such as "lens dust" kept: they describe the image), and with
    ``patient_labels`` (the letters set for the patient) ``" diagnosis: cataract,
    glaucoma."`` (names of :data:`kfundus.labels.ODIR_NAMES`)."""
    text = f"{eye_text('left', left_keywords)} {eye_text('right', right_keywords)}"
    if patient_labels is not None:
        names = [kl.ODIR_NAMES[c] for c in kl.ODIR_LABELS if c in set(patient_labels)]
        text += f" diagnosis: {', '.join(names) if names else 'none'}."
    return text


def odir_pairs(
    annotation,
    image_dir=None,
    *,
    labels=tuple(kl.ODIR_LABELS),
    patient_labels: bool = False,
    unknown_keywords: str = "error",
    check_files: bool = True,
    skip_missing: bool = False,
) -> Manifest:
    """Image-report pairs from an ODIR-5K annotation (official columns; also what
    ``kfundus synth --layout odir`` writes).

    Args:
        annotation: the ``.xlsx``/``.csv`` table (see :func:`kfundus.data.readers.read_odir`).
        image_dir: the image folder (default as in ``read_odir``).
        labels: the per-eye labels kept as 0/1 columns ``left_<L>`` and ``right_<L>``,
            from each eye's keywords with the mapping of ``read_odir(level="eye",
            eye_labels="keywords")`` (ODIR's only per-eye truth).
        patient_labels: append the patient-level diagnosis to the report (the official
            N..O labels, decided by the graders from both eyes). Off by default: it
            repeats the keywords; the patient labels are the manifest's labels anyway.
        unknown_keywords, check_files, skip_missing: as in ``read_odir``.

    Returns:
        A pairs Manifest labelled with the patient's N..O, with ``text``
        (:func:`odir_report`), ``left_keywords``, ``right_keywords``, the per-eye label
        columns, ``age`` and ``sex``.
    """
    unknown = [c for c in labels if c not in kl.ODIR_LABELS]
    if unknown:
        raise ConfigError(f"labels {unknown} are not ODIR labels; valid: {kl.ODIR_LABELS}")
    manifest = read_odir(
        annotation,
        image_dir,
        level="patient",
        unknown_keywords=unknown_keywords,
        check_files=check_files,
        skip_missing=skip_missing,
    )
    frame = manifest.frame
    eyes = {side: keyword_labels(frame[f"{side}_keywords"], unknown_keywords) for side in ("left", "right")}
    reports = [
        odir_report(a, b, [c for c in kl.ODIR_LABELS if row[c]] if patient_labels else None)
        for a, b, (_, row) in zip(frame["left_keywords"], frame["right_keywords"], frame.iterrows())
    ]
    table = pd.DataFrame(
        {
            "patient_id": frame["patient_id"].astype(str),
            "left_image": frame["left_image"],
            "right_image": frame["right_image"],
            "text": reports,
            **{c: frame[c].to_numpy() for c in kl.ODIR_LABELS},
            "left_keywords": frame["left_keywords"],
            "right_keywords": frame["right_keywords"],
            **{f"{side}_{c}": eyes[side][c].to_numpy() for side in ("left", "right") for c in labels},
            "age": frame["age"],
            "sex": frame["sex"],
            "source_row": frame["source_row"],
        }
    )
    return _pairs(table, "odir-pairs", manifest.skipped, kl.ODIR_LABELS, source=manifest.source)


PAIR_SOURCES = {"retclip": read_retclip, "csv": read_pairs_csv, "odir": odir_pairs}


def load_pairs(kind: str, path, **options) -> Manifest:
    """Read image-report pairs by name, for configs: ``kind`` in ``retclip`` (folder or
    tsv; option ``split``, ``extract_dir``), ``csv`` (option ``image_dir``, ...), ``odir``
    (annotation file or the folder holding it; options of :func:`odir_pairs`)."""
    if kind not in PAIR_SOURCES:
        raise ConfigError(
            f"data.source={kind!r} is not an image-report source; valid: {sorted(PAIR_SOURCES)} "
            "(e.g. --set data.source=odir)"
        )
    reader = PAIR_SOURCES[kind]
    check_reader_options(reader, options, f"pairs source {kind!r}")
    path = Path(path)
    if kind == "odir" and path.is_dir():
        path = find_label_file("odir", path)
    return reader(path, **options)
