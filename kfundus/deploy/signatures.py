"""Names shared by the SavedModel and TFLite exports: signature keys, and feeding named inputs."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kfundus.errors import ExportError

SIGNATURE_KEY = "serving_default"  # encoded bytes in the SavedModel; the TFLite file's only signature
TENSOR_SIGNATURE_KEY = "serving_preprocessed"  # float32 images in the SavedModel


def named_inputs(inputs, names: list[str], source) -> dict[str, np.ndarray]:
    if not isinstance(inputs, Mapping):
        if len(names) != 1:
            raise ExportError(f"{source} takes {len(names)} inputs {names}; pass a dict keyed by them.")
        inputs = {names[0]: inputs}
    if set(inputs) != set(names):
        raise ExportError(
            f"{source} takes inputs {sorted(names)} but got {sorted(inputs)}; pass a dict with exactly those keys."
        )
    return {name: as_array(inputs[name]) for name in names}


def as_array(value) -> np.ndarray:
    """numpy array of ``value``; encoded files (bytes) as an object array, since numpy's
    fixed-width bytes would drop trailing NUL bytes."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], bytes):
        return np.array(value, dtype=object)
    return np.asarray(value)
