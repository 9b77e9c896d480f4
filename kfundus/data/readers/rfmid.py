"""RFMiD: one label table per official split (``read_rfmid``), or a folder of them (``read_rfmid_dir``)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pandas as pd

from kfundus import labels as kl
from kfundus.data.manifest import Manifest, concat_skipped
from kfundus.data.readers.table import (
    absolute_paths,
    binary_columns,
    check_choice,
    check_image_files,
    clean_id,
    default_image_dir,
    file_rows,
    image_file_names,
    read_table,
    require_columns,
    require_unique,
)
from kfundus.data.splits import SPLIT_ALIASES
from kfundus.errors import DataError

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
    split); ``id`` keeps the original. (RFMiD publishes one image per patient.)
    """
    check_choice("view", str(view), ("46", "29"))
    path = Path(labels_csv)
    df = read_table(path)
    require_columns(df, ["ID", *kl.RFMID_46], path, "Is this an RFMiD *_Labels.csv table?")
    ids = df["ID"].map(clean_id)
    rows = file_rows(df)
    require_unique(ids, path, "ID", rows)
    y = binary_columns(df, kl.RFMID_46, path)
    split = _rfmid_split(path)
    if str(view) == "29":
        y = y.drop(columns=kl.RFMID_RARE).assign(OTHER=y[kl.RFMID_RARE].max(axis=1))
    labels = list(kl.RFMID_46 if str(view) == "46" else kl.RIADD_29)
    image_dir = default_image_dir(image_dir, path.parent, _RFMID_SPLITS.get(split, ()), ids + ".png")
    names = image_file_names(ids, (".png", ".jpg", ".jpeg", ".tif"), image_dir, check_files)
    frame = pd.DataFrame(
        {
            "patient_id": [f"{split}-{i}" if split else i for i in ids],
            "image": absolute_paths(image_dir, names),
            "eye": "",
            **y[labels],
            "id": ids.to_numpy(),
            **({"split": split} if split else {}),
            "source_row": rows,
        }
    )
    frame, skipped = check_image_files(frame, path, ["image"], check_files, skip_missing, image_dir)
    return Manifest(frame, labels, "multilabel", "rfmid", skipped, source=str(path))


def read_rfmid_dir(root, *, view="46", check_files=True, skip_missing=False) -> Manifest:
    """Find ``RFMiD_*_Labels.csv`` (train, val, test) anywhere under ``root``, read each
    with :func:`read_rfmid` and concatenate them (train, val, test order). A split that
    is absent is reported with a warning; two tables for one split stop with an error."""
    root = Path(root)
    found: dict[str, Path] = {}
    for csv in sorted(p for p in root.rglob("*.csv") if re.search(r"rfmid.*labels", p.name, re.I)):
        split = _rfmid_split(csv)
        if split in found:
            raise DataError(
                f"two RFMiD tables for the {split} split: {found[split]} and {csv}; "
                "keep one, or give the table of one split as --data"
            )
        if split:
            found[split] = csv
    if not found:
        raise DataError(f"no RFMiD_{{Training,Validation,Testing}}_Labels.csv under {root}: check the folder")
    absent = [s for s in _RFMID_SPLITS if s not in found]
    if absent:
        warnings.warn(f"{root}: no RFMiD label table for the split(s) {absent}", stacklevel=2)
    parts = [
        read_rfmid(found[s], view=view, check_files=check_files, skip_missing=skip_missing)
        for s in _RFMID_SPLITS
        if s in found
    ]
    return Manifest(
        pd.concat([p.frame.assign(source_file=p.source) for p in parts], ignore_index=True),
        parts[0].labels,
        "multilabel",
        "rfmid",
        concat_skipped(*[p.skipped for p in parts]),
        source=str(root),
    )
