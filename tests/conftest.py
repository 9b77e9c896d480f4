"""Shared fixtures. Real data lives in ../shared/data beside the repository; tests that
need it skip with the reason when it is absent (a user's fresh clone has none)."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KFUNDUS_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    """Path of a real dataset in ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} is absent (it sits beside the repo as ../shared/data)")
    return path


@pytest.fixture
def odir_sample() -> Path:
    return shared_dataset("odir-sample")


@pytest.fixture
def eyepacs_sample() -> Path:
    return shared_dataset("eyepacs-sample")


@pytest.fixture
def idrid_grading() -> Path:
    return shared_dataset("idrid-grading")
