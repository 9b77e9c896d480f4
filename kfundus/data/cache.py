"""Where kfundus keeps what it computes once: decoded images, extracted RET-CLIP images,
frozen-feature caches."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$KFUNDUS_CACHE_DIR`` or ``~/.cache/kfundus`` (``data.cache_dir`` overrides it per run)."""
    return Path(os.environ.get("KFUNDUS_CACHE_DIR", Path.home() / ".cache" / "kfundus"))
