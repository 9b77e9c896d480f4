"""Class-per-folder trees such as Kermany OCT (``read_class_folders``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from kfundus.data.manifest import Manifest
from kfundus.data.readers.table import IMAGE_EXTENSIONS, eye_from_name
from kfundus.data.splits import SPLIT_ALIASES
from kfundus.errors import DataError

_KERMANY_NAME = r"^[A-Za-z]+-(\d+)-\d+$"  # CNV-1016042-1: class, patient, image


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith((".", "__")))


def _patient_of(stem: str, pattern, path) -> tuple[str, str]:
    """``(patient, eye)`` of one file: ``pattern``'s first group (or whole match); without a
    pattern the Kermany number, else the id of a name that says its eye (``12_left``),
    else the stem."""
    match = re.search(pattern or _KERMANY_NAME, stem)
    if pattern is None and not match:
        eyed = eye_from_name(stem)
        return eyed if eyed else (stem, "")
    if not match:
        raise DataError(
            f"file {path} does not match data.options.patient_pattern {pattern!r}: fix the pattern "
            "(its first group, or the whole match, is the patient id)"
        )
    return (match.group(1) if match.groups() else match.group(0)), ""


def read_class_folders(root, *, classes=None, extensions=IMAGE_EXTENSIONS, patient_pattern=None) -> Manifest:
    """Read a class-per-folder tree like Kermany OCT: ``root/{train,val,test}/{class}/*``
    (``split`` from the first level) or ``root/{class}/*``.

    Args:
        root: the tree's root.
        classes: class folder names in label order; default every class folder, sorted.
        extensions: image file extensions (case-insensitive); other files are ignored.
        patient_pattern: a regular expression searched in each file stem; its first group
            (or the whole match) is the patient id. Default: Kermany names
            ``CNV-1016042-1`` give the middle number, a name that says its eye
            (``12_left``, ``12_R``, ``12_OD``) the id before it (and the eye), any other
            name its own stem.

    An empty class folder (no image with ``extensions``), or one absent from a split,
    stops the reader: a class must not silently vanish. Returns a ``"multiclass"``
    manifest (one-hot columns, and ``label``, the class name).
    """
    root = Path(root)
    if root.is_file():
        raise DataError(
            f"{root} is a file, but data.source folders reads a folder of class folders (root/<class>/<images>): "
            "give the tree's root as --data DIR"
        )
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist: check --data (or data.path)")
    top = _visible_dirs(root)
    in_splits = [d for d in top if d.name.lower() in SPLIT_ALIASES]
    if in_splits and len(in_splits) != len(top):
        odd = [d.name for d in top if d not in in_splits]
        raise DataError(
            f"{root} mixes split folders {[d.name for d in in_splits]} with other folders {odd}: "
            f"move the others away, or give one split folder as --data (e.g. --data {in_splits[0]})"
        )
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
                raise DataError(
                    f"class folder {folder} does not exist; the classes are {classes}. "
                    "Add the folder with its images, or leave the class out: --set 'data.options.classes=[...]'"
                )
            files = sorted(
                f
                for f in folder.iterdir()
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in extensions
            )
            if not files:
                raise DataError(
                    f"class folder {folder} has no images with extensions {list(extensions)}: "
                    "add its images, or leave the class out: --set 'data.options.classes=[...]'"
                )
            rows += [(os.path.abspath(f), *_patient_of(f.stem, patient_pattern, f), label, split) for f in files]
    frame = pd.DataFrame(rows, columns=["image", "patient_id", "eye", "label", "split"])
    frame = frame.assign(**{c: (frame["label"] == c).astype("int64") for c in classes})
    frame = frame[["image", "patient_id", "eye", "label", *classes] + (["split"] if in_splits else [])]
    return Manifest(frame, classes, "multiclass", "folders", source=str(root))
