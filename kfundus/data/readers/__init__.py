"""Readers for the public retinal-image dataset layouts; each returns a Manifest.

Rows are eyes (``image``) or patients (``left_image``, ``right_image``) with absolute image
paths, the ``patient_id`` that splits keep together, one 0/1 column per label and ``source_row``,
the row of the user's file. Readers check the table (required columns, 0/1 labels, unique
ids) and that every image exists; they do not decode images (the pipeline does). A missing
image stops the reader with its file row, unless ``skip_missing=True``
(``--set data.options.skip_missing=true``): the row is then dropped and listed in
``manifest.skipped``. Row numbers in messages count the header as row 1.

Example: ``select_labels(read_odir("ODIR-5K/annotation.xlsx"), ["N", "G", "C"], drop_empty=True)``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kfundus.data.manifest import Manifest, concat_skipped, skipped_rows
from kfundus.data.readers.csv import read_csv
from kfundus.data.readers.dr import read_dr_grades
from kfundus.data.readers.folders import read_class_folders
from kfundus.data.readers.hrdc import read_hrdc
from kfundus.data.readers.odir import ODIR_COLUMNS, read_odir, read_odir_kaggle
from kfundus.data.readers.pairs import PAIR_SOURCES, load_pairs, odir_pairs, read_pairs_csv, read_retclip
from kfundus.data.readers.rfmid import read_rfmid, read_rfmid_dir
from kfundus.data.readers.table import LABEL_FILES, check_reader_options, find_label_file
from kfundus.errors import ConfigError, DataError

SOURCES = {
    "odir": read_odir,
    "odir_kaggle": read_odir_kaggle,
    "rfmid": read_rfmid,
    "dr": read_dr_grades,
    "folders": read_class_folders,
    "csv": read_csv,
    "hrdc": read_hrdc,
}
__all__ = [
    "ODIR_COLUMNS",
    "PAIR_SOURCES",
    "SOURCES",
    "load_dataset",
    "load_pairs",
    "load_source",
    "odir_pairs",
    "read_class_folders",
    "read_csv",
    "read_dr_grades",
    "read_hrdc",
    "read_odir",
    "read_odir_kaggle",
    "read_pairs_csv",
    "read_retclip",
    "read_rfmid",
    "read_rfmid_dir",
    "select_labels",
]


def load_dataset(data, path=None) -> Manifest:
    """The dataset a ``data`` config section names (``path`` overrides ``data.path``), with
    its labels selected (``data.labels``, ``data.drop_empty``)."""
    path = path or data.path
    if not path:
        raise ConfigError("no dataset given: pass --data DIR (or set data.path in the config)")
    if not Path(path).exists():
        raise DataError(f"dataset {path} does not exist: check --data (or data.path)")
    manifest = load_source(data.source, path, **data.options)
    if data.labels:
        manifest = select_labels(manifest, list(data.labels), drop_empty=data.drop_empty)
    return manifest


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
    if kind in LABEL_FILES and path.is_dir():
        path = find_label_file(kind, path)
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
        raise DataError(
            f"label(s) {unknown or labels} are not in the {manifest.name or 'dataset'} "
            f"labels; valid labels: {manifest.labels} (e.g. --set 'data.labels=[{', '.join(manifest.labels[:3])}]')"
        )
    out = manifest.with_labels(labels)
    keep = out.frame[labels].to_numpy().sum(axis=1) > 0
    if drop_empty:
        if not keep.any():
            raise DataError(
                f"none of the {len(keep)} row(s) of {manifest.source or manifest.name or 'the dataset'} has any of "
                f"the labels {labels}, so data.drop_empty=true leaves nothing; check --set 'data.labels=[...]'"
            )
        lost = out.frame[~keep]
        rows = lost["source_row"] if "source_row" in lost.columns else [None] * len(lost)
        dropped = skipped_rows(rows, lost[out.image_columns[0]], "no_label", f"none of the labels {labels}")
        out = out.subset(keep)
        out.skipped = concat_skipped(manifest.skipped, dropped)
    elif out.task == "multiclass" and not keep.all():
        first = int(np.flatnonzero(~keep)[0])
        raise DataError(
            f"{int((~keep).sum())} row(s) have none of the classes {labels} (e.g. "
            f"{out.where(first) or out.frame[out.image_columns[0]].iloc[first]}), so they "
            "would have no class: --set data.drop_empty=true drops them (they are listed in the run's skipped.csv)"
        )
    return out
