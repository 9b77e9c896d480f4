"""The run folder: what a training run writes, and how every other command reads it.

``train`` and ``pretrain`` write a run folder; ``evaluate``, ``explain``, ``export`` and
``predict`` (through the exported bundle) read it, through :class:`RunFolder` only::

    runs/<name>/
      config.yaml        the resolved configuration (kfundus.config)
      run.json           labels, task, level, image size, data path and source, counts per
                         split, skipped rows (total and by reason), primary output,
                         kfundus version, times
      splits.csv         every row of the dataset with its split (patient-level), its
                         image path(s) and labels
      skipped.csv        rows left out (missing, unreadable, too small, no label, other eye
                         missing): file row, path, reason, detail, split
      thresholds.json    per-label decision thresholds chosen on validation; for a
                         multi-task model ``heads``: every head's rule (thresholds or
                         arg-max), also chosen on validation
      samples.npz        a few preprocessed validation images (export parity checks)
      best.weights.h5    the best epoch's weights (train.monitor)
      backup/            state for resuming an interrupted run (present until it finishes)
      history.csv        per-epoch losses and metrics, training_curves.png
      tensorboard/       TensorBoard logs
      model.keras        the final model: the best epoch or the last (train.checkpoint)
      eval-<split>/      evaluation reports (metrics.json, predictions.csv, report.html, ...)

A pre-training run adds ``vision_encoder/`` and ``tokenizer/`` (keras-hub preset folders)
and ``metrics.json``. A run is *finished* when ``model.keras`` exists and ``backup/`` does
not; an *interrupted* run (``backup/`` present) resumes when the same command runs again.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import pandas as pd

from kfundus.errors import ConfigError, DataError

CONFIG = "config.yaml"
INFO = "run.json"
SPLITS = "splits.csv"
SKIPPED = "skipped.csv"
SKIPPED_TABLE = ["source_row", "path", "reason", "detail", "split"]  # the columns of skipped.csv
THRESHOLDS = "thresholds.json"
SAMPLES = "samples.npz"
CHECKPOINT = "best.weights.h5"
BACKUP = "backup"
HISTORY = "history.csv"
CURVES = "training_curves.png"
TENSORBOARD = "tensorboard"
MODEL = "model.keras"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunFolder:
    """A run folder (see the module docstring). ``RunFolder(path)`` names it; nothing is
    read or written until a method is called."""

    def __init__(self, path):
        self.path = Path(path)

    def __truediv__(self, name) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # state ------------------------------------------------------------------

    @property
    def model_file(self) -> Path:
        return self.path / MODEL

    def finished(self) -> bool:
        return self.model_file.exists() and not (self.path / BACKUP).exists()

    def require_finished(self, what: str = "this command") -> RunFolder:
        """Raise ConfigError unless the run finished (``model.keras``, no ``backup/``)."""
        if not self.path.is_dir():
            raise ConfigError(
                f"run folder {self.path} does not exist: give --run runs/NAME, a folder `kfundus train` wrote"
            )
        if not (self.path / INFO).exists():
            raise ConfigError(
                f"{self.path} is not a kfundus run folder (no {INFO}): give a folder `kfundus train` wrote"
            )
        if not self.finished():
            state = (
                "was interrupted (backup/ present): run the same train command again to finish it"
                if (self.path / BACKUP).exists()
                else f"has no {MODEL}"
            )
            raise ConfigError(f"run {self.path} {state}; {what} needs a finished run")
        return self

    def start(self, overwrite: bool = False) -> RunFolder:
        """Create the folder for a new run. An interrupted run (``backup/``) is left as it is
        to resume; a finished one is an error unless ``overwrite``, which clears its results."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.finished() and not overwrite:
            raise ConfigError(
                f"run {self.path} has already finished ({MODEL}). Train again from scratch with "
                "--overwrite, or give another --run-dir"
            )
        if self.finished():
            for name in (HISTORY, CHECKPOINT, MODEL, THRESHOLDS, SKIPPED, "metrics.json", "metrics.md"):
                (self.path / name).unlink(missing_ok=True)
            for folder in [TENSORBOARD, "vision_encoder", "tokenizer", *[p.name for p in self.path.glob("eval-*")]]:
                shutil.rmtree(self.path / folder, ignore_errors=True)
        return self

    # config and run.json ------------------------------------------------------

    def read_config(self, overrides=None):
        """The run's resolved config (``--set`` overrides applied)."""
        from kfundus.config import load_config

        if not (self.path / CONFIG).exists():
            raise ConfigError(f"{self.path} has no {CONFIG}: give a run folder `kfundus train` wrote")
        return load_config(self.path / CONFIG, overrides)

    def write_config(self, config) -> None:
        from kfundus.config import save_config

        save_config(config, self.path / CONFIG)

    def read_info(self) -> dict:
        file = self.path / INFO
        if not file.exists():
            raise ConfigError(f"{self.path} is not a kfundus run folder (no {INFO})")
        return json.loads(file.read_text())

    def write_info(self, info: dict) -> None:
        from kfundus import __version__

        (self.path / INFO).write_text(json.dumps({"kfundus_version": __version__, **info}, indent=1))

    def update_info(self, **values) -> None:
        info = self.read_info()
        info.update(values)
        (self.path / INFO).write_text(json.dumps(info, indent=1))

    # splits -----------------------------------------------------------------

    def write_splits(self, table: pd.DataFrame) -> None:
        table.to_csv(self.path / SPLITS, index=False)

    def read_splits(self) -> pd.DataFrame:
        file = self.path / SPLITS
        if not file.exists():
            raise ConfigError(f"{self.path} has no {SPLITS}: give a run folder `kfundus train` wrote")
        return pd.read_csv(file, dtype={"patient_id": str}, keep_default_na=False, na_values=[""])

    def split_manifest(self, split: str, data_root=None):
        """The rows of one split (``all``: every row) as a Manifest, from ``splits.csv`` and
        ``run.json``: what export and explain use instead of re-reading the dataset.
        ``data_root``: the dataset's new folder, when it moved since training (image
        paths under the recorded data folder are re-rooted there)."""
        from kfundus.data.manifest import Manifest

        info = self.read_info()
        table = self.read_splits()
        if split != "all":
            if split not in set(table["split"]):
                raise ConfigError(f"split {split!r}: run {self.path} has splits {sorted(set(table['split']))} (or all)")
            table = table[table["split"] == split]
        table = table.drop(columns=["split"]).reset_index(drop=True)
        columns = ["left_image", "right_image"] if info.get("level") == "patient" else ["image"]
        if data_root is not None and info.get("data_root"):
            new = Path(data_root).resolve()
            new = new if new.is_dir() else new.parent
            old = Path(info["data_root"])
            for column in columns:
                table[column] = [
                    str(new / Path(p).relative_to(old)) if Path(p).is_relative_to(old) else p for p in table[column]
                ]
        for label in info["labels"]:
            table[label] = table[label].astype("int64")
        return Manifest(
            table, list(info["labels"]), info["task"], info.get("source") or "", source=str(info.get("data_path") or "")
        )

    # skipped rows -------------------------------------------------------------

    def write_skipped(self, skipped: pd.DataFrame) -> dict[str, int]:
        """Write the rows left out (any reason) to ``skipped.csv`` with the columns
        :data:`SKIPPED_TABLE` (``source_row``: the row of the user's label file, header =
        row 1; ``reason``: missing, unreadable, too_small, no_label, other_eye_missing;
        ``split``: empty for rows left out before splitting). Nothing is written when no row
        was left out. Returns the counts by reason, for ``run.json``."""
        (self.path / SKIPPED).unlink(missing_ok=True)
        if not len(skipped):
            return {}
        table = skipped.copy()
        for column in SKIPPED_TABLE:
            if column not in table.columns:
                table[column] = ""
        table = table[SKIPPED_TABLE]
        table.to_csv(self.path / SKIPPED, index=False)
        return {str(k): int(v) for k, v in table["reason"].value_counts().items()}

    def read_skipped(self) -> pd.DataFrame:
        """``skipped.csv`` (an empty table when nothing was skipped)."""
        file = self.path / SKIPPED
        if not file.exists():
            return pd.DataFrame(columns=SKIPPED_TABLE)
        return pd.read_csv(file, dtype={"path": str, "split": str}, keep_default_na=False)

    # thresholds ---------------------------------------------------------------

    def write_thresholds(
        self, labels, thresholds, primary: str | None, method: str = "youden (on validation)", heads: dict | None = None
    ) -> None:
        """Write ``thresholds.json``: the primary output's per-label thresholds and, for a
        multi-task model, ``heads`` (``{head: {"task", "labels", "decision", "thresholds"}}``,
        ``kfundus.objectives.head_thresholds``)."""
        data = {
            "method": method,
            "labels": list(labels),
            "primary_output": primary,
            "thresholds": [float(t) for t in thresholds],
        }
        if heads:
            data["heads"] = heads
        (self.path / THRESHOLDS).write_text(json.dumps(data, indent=1))

    def read_thresholds(self) -> dict:
        file = self.path / THRESHOLDS
        if not file.exists():
            raise ConfigError(f"{self.path} has no {THRESHOLDS}: the run did not finish; train it again")
        return json.loads(file.read_text())

    # evaluations --------------------------------------------------------------

    def eval_dir(self, split: str) -> Path:
        return self.path / f"eval-{split}"

    def eval_metrics(self, split: str) -> dict | None:
        file = self.eval_dir(split) / "metrics.json"
        return json.loads(file.read_text()) if file.exists() else None

    # samples --------------------------------------------------------------------

    def read_samples(self) -> dict | None:
        import numpy as np

        file = self.path / SAMPLES
        if not file.exists():
            return None
        with np.load(file) as data:
            return {k: data[k].astype("float32") for k in data.files}


def check_data_labels(manifest, info: dict, where: str) -> None:
    """DataError when a dataset's labels differ from the run's."""
    if list(manifest.labels) != list(info["labels"]):
        raise DataError(
            f"the labels of {where} {manifest.labels} differ from the run's {info['labels']}; select the "
            "run's labels with --set 'data.labels=[...]'"
        )
