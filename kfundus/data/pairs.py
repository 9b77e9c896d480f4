"""Image-report pairs for RET-CLIP pre-training: readers, decode cache, tf.data pipeline.

A *pairs table* is a pandas DataFrame with one row per (patient, report):

- ``patient_id`` (str), ``left`` and ``right`` (absolute image paths), ``report`` (text);
- optional extra columns: ``text_id``, ``left_keywords``/``right_keywords``, per-eye 0/1
  labels such as ``left_N, left_G, ..., right_N, ...`` (for zero-shot evaluation), ``split``.

Readers (:func:`load_pairs` picks one by name):

- :func:`read_retclip`: RET-CLIP's own format, ``{split}_imgs.tsv``
  (``patient_id<TAB>base64(left)<TAB>base64(right)``, standard or URL-safe base64 as in
  Chinese-CLIP) and ``{split}_texts.jsonl`` (``{"text_id", "text", "image_ids": [patient_id]}``).
  The images are decoded once into files, so the rest of kfundus reads files.
- :func:`read_pairs_csv`: a plain CSV ``patient_id,left,right,report``.
- :func:`odir_pairs`: ODIR-5K (or ``kfundus synth --layout odir``): the report is composed
  from the per-eye diagnostic keywords, "left eye: cataract. right eye: normal fundus.".

:func:`prepare_pairs` decodes both eyes of every row once into the shared uint8 cache of
:func:`kfundus.data.pipeline.prepare`; :func:`make_pair_dataset` streams it with the
tokenised reports.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from kfundus import labels as kl
from kfundus.data import sources
from kfundus.data.manifest import Manifest
from kfundus.data.pipeline import Prepared, Preprocess, augmenter, default_cache_dir, prepare
from kfundus.errors import ConfigError, DataError

PAIR_COLUMNS = ["patient_id", "left", "right", "report"]
_SHOW = 5


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
            raise DataError(f"{path} is not a RET-CLIP image file: give the folder holding {split}_imgs.tsv and "
                            f"{split}_texts.jsonl, or the path of a '<split>_imgs.tsv'")
        tsv, jsonl = path, path.with_name(f"{match.group(1)}_texts.jsonl")
    for file in (tsv, jsonl):
        if not file.is_file():
            raise DataError(f"RET-CLIP file {file} does not exist: a RET-CLIP split needs {tsv.name} "
                            f"(patient_id<TAB>base64(left)<TAB>base64(right)) and {jsonl.name}")
    return tsv, jsonl


def read_retclip(path, split: str = "train", extract_dir=None) -> pd.DataFrame:
    """Read a RET-CLIP split: ``{split}_imgs.tsv`` + ``{split}_texts.jsonl``.

    Args:
        path: the folder holding both files, or the ``..._imgs.tsv`` path (the jsonl is
            found beside it).
        split: the split's file prefix when ``path`` is a folder.
        extract_dir: where the decoded images go, as ``{patient_id}_{left|right}.{ext}``
            (extension from the image bytes); default a folder under
            :func:`kfundus.data.pipeline.default_cache_dir` keyed by the tsv's path, size
            and modification time. A file already there with the same size is not
            rewritten.

    Returns:
        A pairs table, one row per (patient, text): a text whose ``image_ids`` lists
        several patients gives several rows. Extra column ``text_id``. Patients without a
        text are left out (with a warning).

    Raises:
        DataError naming the file and line: a tsv line without 3 tab-separated fields,
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
    images: dict[str, tuple[str, str]] = {}
    with open(tsv, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 3:
                raise DataError(f"line {number} of {tsv}: expected 3 tab-separated fields "
                                f"patient_id, base64(left), base64(right); found {len(fields)}")
            patient = fields[0].strip()
            if not patient:
                raise DataError(f"line {number} of {tsv}: empty patient_id")
            if patient in images:
                raise DataError(f"line {number} of {tsv}: patient_id {patient!r} appears twice; each patient "
                                "has one line (left and right image)")
            paths = []
            for side, text in zip(("left", "right"), fields[1:]):
                try:
                    data = _b64decode(text)
                except (binascii.Error, ValueError) as error:
                    raise DataError(f"line {number} of {tsv}: the {side} image of patient {patient!r} is not "
                                    f"valid base64 ({error})") from error
                if not data:
                    raise DataError(f"line {number} of {tsv}: the {side} image of patient {patient!r} is empty")
                file = extract_dir / f"{_safe_name(patient)}_{side}{_image_extension(data)}"
                _write_once(file, data)
                paths.append(str(file.resolve()))
            images[patient] = (paths[0], paths[1])
    if not images:
        raise DataError(f"{tsv} has no image lines")
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
                raise DataError(f"{where}: missing key(s) {missing}; each line is "
                                '{"text_id": ..., "text": ..., "image_ids": [patient_id, ...]}')
            text, ids = str(record["text"]).strip(), record["image_ids"]
            if not text:
                raise DataError(f"{where}: empty text (text_id {record['text_id']!r})")
            ids = [ids] if isinstance(ids, (str, int)) else ids
            if not isinstance(ids, list) or not ids:
                raise DataError(f"{where}: image_ids must be a non-empty list of patient ids")
            for patient in map(lambda i: str(i).strip(), ids):
                if patient not in images:
                    raise DataError(f"{where}: image id {patient!r} (text_id {record['text_id']!r}) has no line "
                                    f"in {tsv}")
                used.add(patient)
                rows.append((patient, *images[patient], text, str(record["text_id"])))
    if not rows:
        raise DataError(f"{jsonl} has no texts")
    unused = [p for p in images if p not in used]
    if unused:
        warnings.warn(f"{len(unused)} patient(s) of {tsv} have no text in {jsonl} and are left out, e.g. "
                      f"{unused[:_SHOW]}", stacklevel=2)
    table = pd.DataFrame(rows, columns=[*PAIR_COLUMNS, "text_id"])
    table.attrs["name"] = f"retclip-{tsv.stem}"
    return table


# ---------------------------------------------------------------------------
# Plain CSV


def read_pairs_csv(csv, image_dir=None, *, check_files: bool = True, skip_missing: bool = False) -> pd.DataFrame:
    """Read a CSV with columns ``patient_id, left, right, report`` (others are kept).

    Args:
        csv: the table. Row numbers in messages count the header as row 1.
        image_dir: relative image paths are resolved against it (default: the CSV's folder).
        check_files, skip_missing: check that every image exists; drop (with a warning)
            instead of stopping at rows whose images are missing.

    A patient may have several rows (several reports); each row is one training pair.
    """
    path = Path(csv)
    df = sources._read_table(path)
    sources._require_columns(df, PAIR_COLUMNS, path, "A pairs CSV has one row per patient report: "
                             "patient_id,left,right,report (left/right: image paths).")
    for column in PAIR_COLUMNS:
        empty = (df[column] == "").to_numpy()
        if empty.any():
            i = sources._first(empty)
            what = "empty report" if column == "report" else f"empty {column!r}"
            raise DataError(f"row {sources._row(i)} of {path}: {what} ({int(empty.sum())} such row(s)); every row "
                            "needs patient_id, left, right and a report. Fill or remove them.")
    folder = Path(image_dir) if image_dir is not None else path.parent
    frame = df.assign(patient_id=df["patient_id"].map(sources._clean_id), left=sources._abs(folder, df["left"]),
                      right=sources._abs(folder, df["right"]), _row=np.arange(len(df)) + 2)
    frame, skipped = sources._check_files(frame, path, ["left", "right"], check_files, skip_missing, image_dir)
    frame = frame[PAIR_COLUMNS + [c for c in frame.columns if c not in PAIR_COLUMNS]]
    frame.attrs["name"] = path.stem
    frame.attrs["skipped"] = skipped
    return frame


# ---------------------------------------------------------------------------
# ODIR: keywords -> report


def odir_report(left_keywords: str, right_keywords: str, patient_labels=None) -> str:
    """The report text of one ODIR patient: ``"left eye: cataract. right eye: normal
    fundus."`` - each eye's keywords (split on ``,``/``，``, lower-cased, in their order,
    non-diagnostic ones such as "lens dust" kept: they describe the image), and with
    ``patient_labels`` (the letters set for the patient) ``" diagnosis: cataract,
    glaucoma."`` (names of :data:`kfundus.labels.ODIR_NAMES`)."""
    text = f"{sources._eye_text('left', left_keywords)} {sources._eye_text('right', right_keywords)}"
    if patient_labels is not None:
        names = [kl.ODIR_NAMES[c] for c in kl.ODIR_LABELS if c in set(patient_labels)]
        text += f" diagnosis: {', '.join(names) if names else 'none'}."
    return text


def odir_pairs(annotation, image_dir=None, *, labels=tuple(kl.ODIR_LABELS), patient_labels: bool = False,
               check_files: bool = True, skip_missing: bool = False) -> pd.DataFrame:
    """Image-report pairs from an ODIR-5K annotation (official columns; also what
    ``kfundus synth --layout odir`` writes).

    Args:
        annotation: the ``.xlsx``/``.csv`` table (see :func:`kfundus.data.sources.read_odir`).
        image_dir: the image folder (default as in ``read_odir``).
        labels: the per-eye labels kept as 0/1 columns ``left_<L>`` and ``right_<L>``,
            from each eye's keywords with the mapping of ``read_odir(level="eye",
            eye_labels="keywords")`` (ODIR's only per-eye truth).
        patient_labels: append the patient-level diagnosis to the report (the official
            N..O labels, decided by the graders from both eyes). Off by default: it
            repeats the keywords, and the patient labels stay available as columns
            ``patient_N`` .. ``patient_O``.
        check_files, skip_missing: as in ``read_odir``.

    Returns:
        A pairs table with ``report`` (:func:`odir_report`), ``left_keywords``,
        ``right_keywords``, the per-eye label columns, ``patient_*``, ``age``, ``sex``.
    """
    unknown = [c for c in labels if c not in kl.ODIR_LABELS]
    if unknown:
        raise ConfigError(f"labels {unknown} are not ODIR labels; valid: {kl.ODIR_LABELS}")
    manifest = sources.read_odir(annotation, image_dir, level="patient", check_files=check_files,
                                 skip_missing=skip_missing)
    frame = manifest.frame
    eyes = {side: sources._keyword_labels(frame[f"{side}_keywords"]) for side in ("left", "right")}
    reports = [odir_report(a, b, [c for c in kl.ODIR_LABELS if row[c]] if patient_labels else None)
               for a, b, (_, row) in zip(frame["left_keywords"], frame["right_keywords"], frame.iterrows())]
    table = pd.DataFrame({
        "patient_id": frame["patient_id"].astype(str), "left": frame["left_image"], "right": frame["right_image"],
        "report": reports, "left_keywords": frame["left_keywords"], "right_keywords": frame["right_keywords"],
        **{f"{side}_{c}": eyes[side][c].to_numpy() for side in ("left", "right") for c in labels},
        **{f"patient_{c}": frame[c].to_numpy() for c in kl.ODIR_LABELS},
        "age": frame["age"], "sex": frame["sex"]})
    table.attrs["name"] = "odir-pairs"
    table.attrs["skipped"] = manifest.skipped
    return table


READERS = {"retclip": read_retclip, "csv": read_pairs_csv, "odir": odir_pairs}


def load_pairs(kind: str, path, **options) -> pd.DataFrame:
    """Read image-report pairs by name, for configs: ``kind`` in ``retclip`` (folder or
    tsv; option ``split``, ``extract_dir``), ``csv`` (option ``image_dir``, ...), ``odir``
    (annotation file or the folder holding it; options of :func:`odir_pairs`)."""
    if kind not in READERS:
        raise ConfigError(f"pairs source {kind!r} is unknown; valid sources: {sorted(READERS)}")
    reader = READERS[kind]
    sources.check_reader_options(reader, options, f"pairs source {kind!r}")
    path = Path(path)
    if kind == "odir" and path.is_dir():
        path = sources._find_label_file("odir", path)
    return reader(path, **options)


# ---------------------------------------------------------------------------
# Decode cache and tf.data


@dataclasses.dataclass
class PreparedPairs:
    """A pairs table whose images are decoded into the pipeline's cache.

    ``table`` holds the rows whose two images decoded (re-indexed 0..n-1: ``index`` in
    :func:`make_pair_dataset` counts these rows); ``images`` is the shared cache (both
    eyes of a row in one record); ``skipped`` the dropped rows (patient_id, path, reason).
    """

    table: pd.DataFrame
    images: Prepared
    skipped: pd.DataFrame

    @property
    def config(self) -> Preprocess:
        return self.images.config

    def __len__(self) -> int:
        return len(self.table)


def _check_table(table) -> None:
    if not isinstance(table, pd.DataFrame):
        raise DataError(f"a pairs table is a pandas DataFrame with columns {PAIR_COLUMNS}, got {type(table).__name__}")
    sources._require_columns(table, PAIR_COLUMNS, "the pairs table", "Read it with kfundus.data.pairs.load_pairs.")
    if len(table) == 0:
        raise DataError("the pairs table has no rows")


def prepare_pairs(table: pd.DataFrame, preprocess: Preprocess, cache_dir=None, progress: bool = True, *,
                  skip_unreadable: bool = False, name: str | None = None) -> PreparedPairs:
    """Decode both images of every row once (:func:`kfundus.data.pipeline.prepare` on a
    patient-level Manifest: same uint8 cache, corrupt-file detection and progress bar).

    Args:
        table: a pairs table.
        preprocess: the image preprocessing (size, fundus crop).
        cache_dir: the cache root (default ``default_cache_dir()``).
        progress: show a progress bar while decoding.
        skip_unreadable: drop rows with an image that cannot be decoded and warn with the
            count (they are listed in ``skipped``), instead of a DataError listing them.
        name: the cache's name (default the reader's, e.g. ``odir-pairs``).
    """
    _check_table(table)
    name = name or table.attrs.get("name") or "pairs"
    table = table.reset_index(drop=True)
    frame = pd.DataFrame({"patient_id": table["patient_id"].astype(str).to_numpy(),
                          "left_image": table["left"].astype(str).to_numpy(),
                          "right_image": table["right"].astype(str).to_numpy()})
    images = prepare(Manifest(frame, [], "multilabel", name), preprocess, cache_dir=cache_dir,
                     skip_unreadable=True, progress=progress)
    bad = images.skipped
    skipped = pd.DataFrame({"patient_id": table["patient_id"].iloc[bad["row"]].astype(str).to_numpy(),
                            "path": bad["path"].to_numpy(), "reason": bad["reason"].to_numpy()})
    if len(bad) and not skip_unreadable:
        listing = "\n".join(f"  patient {p}: {f}: {why}" for p, f, why in skipped.head(10).itertuples(index=False))
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(f"{len(bad)} row(s) of the pairs '{name}' have an image that cannot be read:\n{listing}{more}\n"
                        "Fix or remove them, or pass skip_unreadable=True to leave these patients out.")
    if len(bad):
        warnings.warn(f"skipped {len(bad)} of {len(table)} pair(s) of '{name}' with an unreadable image; "
                      "see prepared.skipped", stacklevel=2)
    keep = ~np.isin(np.arange(len(table)), bad["row"].to_numpy())
    return PreparedPairs(table[keep].reset_index(drop=True), images, skipped)


_SIDE_WORDS = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b|(左)|(右)")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT",
         "左": "右", "右": "左"}


def swap_sides(text: str) -> str:
    """The report with its sides exchanged ("left" <-> "right", also capitalised, and the
    Chinese 左 <-> 右): the text of the mirrored, swapped pair ``flip=True`` makes."""
    return _SIDE_WORDS.sub(lambda m: _SWAP[m.group(0)], text)


def make_pair_dataset(prepared: PreparedPairs, packer, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                      flip: bool = False, repeat: bool = False, with_index: bool = False,
                      drop_remainder: bool = False, augment=None) -> tf.data.Dataset:
    """Stream prepared pairs as batches of dicts.

    Yields ``{"left_image": float32 (B, H, W, 3) in [0, 255], "right_image": ...,
    "token_ids": int32 (B, L), "padding_mask": bool (B, L)}`` and, with ``with_index``,
    ``"index"`` (int64 (B,): the row of ``prepared.table``, for retrieval evaluation).

    Args:
        prepared: from :func:`prepare_pairs`.
        packer: a :class:`kfundus.text.TextPacker` (tokenises inside the pipeline).
        batch_size: pairs per batch.
        shuffle: shuffle the rows, again every epoch (seeded by ``seed``).
        flip: with probability 1/2 per pair, mirror both images horizontally AND swap
            them, and swap "left"/"right" in the report (:func:`swap_sides`). Off by
            default: a mirrored left fundus looks like a right one (optic disc on the
            other side), so flipping in place would feed the left projection right-eye
            anatomy and teach it the wrong laterality. Mirror + swap keeps every input
            anatomically consistent with its slot and the text true to the images.
        repeat: repeat forever (then give ``steps_per_epoch`` to ``fit``).
        with_index: also yield ``index``.
        drop_remainder: drop a last, smaller batch (a contrastive loss on a tiny last
            batch has few negatives).
        augment: a :class:`kfundus.data.pipeline.Augment` applied to each eye on its own
            (training only; its ``hflip`` is refused for the reason above: use ``flip``).
    """
    if augment is not None and augment.hflip:
        raise ConfigError("data.augment.hflip would mirror one eye in place and teach the wrong laterality; "
                          "use data.flip (mirrors both eyes, swaps them and the report's sides)")
    aug = augmenter(augment, seed) if augment is not None else None
    size = prepared.config.image_size
    n_original = len(prepared.table) + len(prepared.skipped)
    skipped_rows = prepared.images.skipped["row"].to_numpy()
    kept = np.setdiff1d(np.arange(n_original), skipped_rows)
    position = np.full(n_original, -1, dtype=np.int64)  # cache row -> row of prepared.table
    position[kept] = np.arange(len(kept))
    reports = prepared.table["report"].astype(str).tolist()
    report_table = tf.constant(reports, dtype=tf.string)
    swapped_table = tf.constant([swap_sides(r) for r in reports], dtype=tf.string) if flip else None
    position_table = tf.constant(position)
    record_bytes = 8 + 2 * size * size * 3

    ds = tf.data.TFRecordDataset(prepared.images.files)
    ds = ds.apply(tf.data.experimental.assert_cardinality(len(prepared)))
    if repeat:
        ds = ds.repeat()
    if flip:  # one random integer per record, new ones every epoch
        coins = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, coins))
    else:
        ds = ds.map(lambda record: (record, tf.constant(0, tf.int64)))
    if shuffle:
        buffer = max(256, min(len(prepared), (512 << 20) // record_bytes))
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)

    def parse(records, coins):
        flat = tf.io.decode_raw(records, tf.uint8, fixed_length=record_bytes)
        index = tf.gather(position_table, tf.bitcast(flat[:, :8], tf.int64))
        images = tf.cast(tf.reshape(flat[:, 8:], [-1, 2, size, size, 3]), tf.float32)
        left, right = images[:, 0], images[:, 1]
        text = tf.gather(report_table, index)
        if flip:
            flipped = tf.equal(coins % 2, 1)
            pick = lambda a, b: tf.where(flipped[:, None, None, None], a, b)  # noqa: E731
            left, right = pick(tf.reverse(right, axis=[2]), left), pick(tf.reverse(left, axis=[2]), right)
            text = tf.where(flipped, tf.gather(swapped_table, index), text)
        if aug is not None:
            left = tf.clip_by_value(aug(left, training=True), 0.0, 255.0)
            right = tf.clip_by_value(aug(right, training=True), 0.0, 255.0)
        left.set_shape([None, size, size, 3])
        right.set_shape([None, size, size, 3])
        out = {"left_image": left, "right_image": right, **packer(text)}
        if with_index:
            out["index"] = index
        return out

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
