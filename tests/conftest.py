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


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A finished run as a user makes it, shared by the end-to-end and deployment tests:
    ``train`` (EfficientNet-B0 from scratch on 100 synthetic patients, normal vs cataract,
    64 px), ``evaluate`` on validation and test, then ``export`` (all four TFLite variants).

    Returns ``(out, data, run_dir, bundle_dir)``.
    """
    from kfundus.cli import main
    from kfundus.data.synthetic import make_odir

    out = tmp_path_factory.mktemp("e2e")
    data = make_odir(
        out / "data", n_patients=100, size=96, seed=1, aspect=1.3, prevalence={"N": 0.4, "C": 0.6}, write_masks=False
    )
    code = main(
        train_args(
            data,
            out,
            "--no-export",
            "--set",
            "data.labels=[N, C]",
            "--set",
            "data.image_size=64",
            "--set",
            "train.epochs=6",
            "--set",
            "data.split.test=0.3",
        )
    )
    assert code == 0
    run = out / "runs" / "demo_synthetic"
    for split in ("val", "test"):
        assert main(["evaluate", "--run", str(run), "--split", split]) == 0
    assert main(["export", "--run", str(run)]) == 0
    return out, data, run, out / "saved_models" / "demo_synthetic"


def train_args(data, out, *extra):
    """``kfundus train`` arguments for the demo config, everything written under ``out``."""
    return [
        "train",
        "--config",
        "demo_synthetic",
        "--data",
        str(data),
        "--set",
        f"output_dir={out / 'runs'}",
        "--set",
        f"data.cache_dir={out / 'cache'}",
        "--set",
        f"export.dir={out / 'saved_models'}",
        *extra,
    ]
