"""Full-size conversion checks (ViT-L/16 RETFound; FLAIR's ResNet-50 + BERT-base; RET-CLIP's
ViT-B/16 + BERT-base) run only with ``make test-foundation``: it writes random-weight
reference checkpoints in the released layouts with the torch venv into
``$KFUNDUS_FOUNDATION`` (default ``.cache/foundation``) and sets that variable. ``pytest
tests`` does not collect them without it (minutes and gigabytes)."""

import os
from pathlib import Path

import pytest

ENABLED = bool(os.environ.get("KFUNDUS_FOUNDATION"))
collect_ignore_glob = [] if ENABLED else ["test_*.py"]


@pytest.fixture(scope="session")
def foundation_dir() -> Path:
    """The folder the full-size references were written to."""
    return Path(os.environ["KFUNDUS_FOUNDATION"])
