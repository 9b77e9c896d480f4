"""What a converter hands back, and the record every converted folder carries.

A converter is a function ``convert_<kind>(checkpoint, out_dir, **options) -> Converted``:
it receives the :class:`kfundus.convert.checkpoints.Checkpoint` already read (the state dict
as NumPy arrays), checks its keys (:func:`kfundus.convert.keys.check_keys`), builds the Keras
model(s), writes them into ``out_dir`` and returns a :class:`Converted`.
:func:`kfundus.convert.convert` then writes ``conversion.json`` (:data:`CONVERSION_FILE`)
beside them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kfundus.errors import DataError

CONVERSION_FILE = "conversion.json"


@dataclasses.dataclass
class Converted:
    """What a converter wrote.

    Attributes:
        model: what the folder holds, in words (``"RETFound ViT-L/16 encoder"``).
        files: the files written into the folder (relative names).
        ignored: checkpoint keys dropped on purpose (the MAE decoder, ...).
        details: architecture and preprocessing facts for ``conversion.json`` (sizes, input
            size, mean/std, pooling, ...).
        parity: how the conversion is proven exact (a sentence: the test and its figure).
        use: how to use the folder (``model.weights: DIR`` with ``model.name: retfound``).
    """

    model: str
    files: list
    ignored: list = dataclasses.field(default_factory=list)
    details: dict = dataclasses.field(default_factory=dict)
    parity: str = ""
    use: str = ""


def read_conversion(folder) -> dict:
    """The ``conversion.json`` of a converted folder (DataError when it is not one)."""
    path = Path(folder) / CONVERSION_FILE
    if not path.is_file():
        raise DataError(
            f"{folder} is not a folder `kfundus convert` wrote (no {CONVERSION_FILE}); convert the released "
            "checkpoint first: kfundus convert --from KIND CHECKPOINT --out DIR"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); convert the checkpoint again") from exc
