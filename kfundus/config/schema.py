"""Experiment configuration: dataclasses read from YAML, overridable from the command line.

Every published setup is a YAML file in ``configs/``; ``--set train.epochs=3`` changes one
value. Unknown keys are errors that name the file and list the valid keys, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from kfundus.data.pipeline import Augment
from kfundus.errors import ConfigError


@dataclasses.dataclass
class SplitConfig:
    """Patient-level split: fractions of patients for validation and test, and the seed.
    A source's official split (RFMiD, Kermany) is used when ``official`` is true."""

    val: float = 0.15
    test: float = 0.15
    seed: int = 0
    official: bool = True


@dataclasses.dataclass
class DataConfig:
    """Where the data is and how it becomes model input.

    ``source`` names a reader of ``kfundus.data.sources`` (odir, odir_kaggle, rfmid, dr,
    folders, csv); ``options`` are passed to it. ``labels`` keeps a subset of the label
    columns (e.g. ODIR per-eye N, G, C); ``drop_empty`` drops rows with none of them.
    """

    source: str = "odir"
    path: str | None = None
    options: dict = dataclasses.field(default_factory=dict)
    labels: list | None = None
    drop_empty: bool = False
    image_size: int = 224
    crop_fundus: bool = True
    cache_dir: str | None = None
    skip_unreadable: bool = False
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    augment: Augment = dataclasses.field(default_factory=Augment)


@dataclasses.dataclass
class ModelConfig:
    """Which model builder and its options (see ``kfundus.models.build_model``).

    ``options`` holds the family's own keyword arguments (e.g. a dual-stream network's
    depth and width, a CLIP encoder's LoRA rank); the builder rejects unknown ones."""

    name: str = "efficientnet_b0"
    weights: str | None = None
    trainable_blocks: int = -1
    dropout: float = 0.2
    bn_momentum: float | None = None
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainConfig:
    """Optimisation. ``schedule``: cosine (with ``warmup_epochs``) or constant.
    ``monitor`` is the validation metric that picks the best checkpoint and drives early
    stopping (``early_stopping`` = patience in epochs, 0 = off). ``checkpoint``: which
    weights become ``model.keras``: ``best`` (the epoch with the best ``monitor``) or
    ``last`` (the final epoch; for validation sets too small to pick an epoch on). ``loss``: bce,
    weighted_bce (positive weights n_neg/n_pos from the training split, capped at
    ``pos_weight_cap``) or focal (``focal_gamma``); see ``kfundus.losses``.
    ``beta_2``: Adam/AdamW second-moment decay (CLIP-style pre-training uses 0.98).
    ``ema``: momentum of an exponential moving average of the weights (Polyak averaging,
    the Keras optimizer's ``use_ema``), e.g. 0.99; validation, checkpoints and the final
    model then use the averaged weights. ``null``: off.
    ``loss_options``: parameters of a model family's own loss (read by its objective in
    ``kfundus.models.OBJECTIVES``, which rejects unknown ones)."""

    epochs: int = 20
    loss: str = "bce"
    loss_options: dict = dataclasses.field(default_factory=dict)
    pos_weight_cap: float = 50.0
    focal_gamma: float = 2.0
    batch_size: int = 16
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    beta_2: float = 0.999
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    mixed_precision: bool = False
    early_stopping: int = 0
    monitor: str = "val_auroc"
    checkpoint: str = "best"
    ema: float | None = None
    seed: int = 0
    steps_per_epoch: int | None = None


@dataclasses.dataclass
class ExportConfig:
    """Formats written to ``saved_models/<run>/`` after training, and the TFLite variants
    (float32, float16, dynamic_int8, int8; see ``kfundus.export``). int8 is calibrated on
    training images, so it needs the training data at export time."""

    formats: list = dataclasses.field(default_factory=lambda: ["keras", "saved_model", "tflite"])
    tflite: list = dataclasses.field(default_factory=lambda: ["float32", "float16", "dynamic_int8", "int8"])
    dir: str = "saved_models"


@dataclasses.dataclass
class Config:
    """``distribution``: none | mirrored | multi_worker, the data-parallel strategy the run
    builds its model in (``kfundus.distribute``; ``train.batch_size`` is the global batch)."""

    name: str = "run"
    output_dir: str = "runs"
    distribution: str = "none"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)


def _build(cls, values: Any, where: str):
    """Build dataclass ``cls`` from a mapping, recursively, rejecting unknown keys."""
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, hint, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value, hint, where):
    """Check a scalar against its annotation (int accepted for float; None where Optional)."""
    args = typing.get_args(hint)
    allowed = args if args else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{where}: a value is required (null given)")
    for t in allowed:
        t = typing.get_origin(t) or t
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is int and isinstance(value, bool):
            continue
        if isinstance(t, type) and isinstance(value, t):
            return value
    names = [getattr(t, "__name__", str(t)) for t in allowed]
    raise ConfigError(f"{where}: expected {' or '.join(names)}, got {value!r}")


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path | None, overrides: list[str] | None = None,
              hint: str = "the published setups are in configs/") -> tuple[dict, str]:
    """(the YAML mapping with ``--set`` overrides applied, where it came from) for any
    command's config (``hint`` completes the not-found message)."""
    data: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} not found; {hint}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
        where = str(path)
    return apply_overrides(data, overrides), where


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults) and apply ``--set`` overrides."""
    from kfundus.distribute import check_distribution

    data, where = read_yaml(path, overrides)
    config = _build(Config, data, where)
    check_distribution(config.distribution, f"{where}: distribution")
    return config


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
