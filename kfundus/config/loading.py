"""Reading, overriding, checking and writing configs.

``load_config(path_or_name, overrides, workflow=...)`` reads a YAML file (or a shipped
config by name, ``kfundus configs`` lists them), merges the workflow's defaults under it,
applies ``--set key=value`` overrides and builds :class:`kfundus.config.schema.Config`.
Unknown keys are errors that name the file and list the valid keys; numbers outside their
range are errors that name the key and the fix, before anything is written.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kfundus.config.schema import (
    BACKBONE_FAMILIES,
    DISTRIBUTIONS,
    MOVED_KEYS,
    WORKFLOW_DEFAULTS,
    WORKFLOWS,
    BackboneSpec,
    Config,
    backbone_family,
)
from kfundus.errors import ConfigError

MIN_IMAGE_SIZE = 32


# ---------------------------------------------------------------------------
# shipped configs


def shipped_configs() -> dict[str, Path]:
    """``{name: path}`` of the configs installed with kfundus (package data)."""
    folder = resources.files("kfundus") / "configs"
    return {
        Path(str(p)).stem: Path(str(p))
        for p in sorted(folder.iterdir(), key=lambda p: p.name)
        if p.name.endswith(".yaml")
    }


def config_summary(path: Path) -> dict:
    """``{name, workflow, description}`` of a config file, for ``kfundus configs``."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return {
        "name": Path(path).stem,
        "workflow": data.get("workflow", "train"),
        "description": " ".join(str(data.get("description", "")).split()),
    }


def resolve_config(spec) -> Path:
    """The file a ``--config`` value names: a YAML file, or the name of a shipped config."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if len(path.parts) == 1 and name in shipped:
        return shipped[name]
    hint = f" (a shipped config has that name: --config {name})" if name in shipped else ""
    raise ConfigError(
        f"config {spec} not found{hint}: give a YAML file, or the name of a shipped config "
        f"({', '.join(shipped)}; `kfundus configs` describes them)"
    )


# ---------------------------------------------------------------------------
# YAML and overrides


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML ({exc.problem}); quote it, "
                "e.g. --set 'data.labels=[N, G]'"
            ) from exc
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def read_yaml(spec) -> tuple[dict, str]:
    """(the YAML mapping, where it came from) of a config path or shipped name."""
    path = resolve_config(spec)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    return data, str(path)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------
# building the dataclasses


def _build(cls, values: Any, where: str, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, recursively, rejecting unknown keys
    (``where``: the file; ``prefix``: the section, e.g. ``data.split.``)."""
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(
            f"{where}: {prefix.rstrip('.') or 'the top level'}: expected a mapping of "
            f"{cls.__name__} fields, got {values!r}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        moved = [f"{prefix}{k} is now {MOVED_KEYS[prefix + k]}" for k in unknown if prefix + k in MOVED_KEYS]
        raise ConfigError(
            f"{where}: unknown key(s) {[prefix + k for k in unknown]}; valid keys"
            f"{' of ' + prefix.rstrip('.') if prefix else ''}: {sorted(fields)}"
            + (f" ({'; '.join(moved)})" if moved else "")
        )
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, where, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{where}: {prefix}{key}")
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


# ---------------------------------------------------------------------------
# checking values


class _Checker:
    def __init__(self, where: str, set_keys=()):
        self.where, self.set_keys = where, set(set_keys)

    def origin(self, key):
        """Where a value came from: the --set that gave it, else the config file."""
        return f"--set {key}" if key in self.set_keys else self.where

    def fail(self, key, value, rule, example):
        raise ConfigError(f"{self.origin(key)}: {key}={value!r} {rule} (e.g. --set {key}={example})")

    def at_least(self, key, value, low, example=None):
        if value is not None and value < low:
            self.fail(key, value, f"must be >= {low}", example if example is not None else low)

    def fraction(self, key, value, example=0.15):
        if not 0 <= value < 1:
            self.fail(key, value, "must be a fraction in [0, 1)", example)

    def positive(self, key, value, example):
        if not value > 0:
            self.fail(key, value, "must be > 0", example)

    def choice(self, key, value, choices):
        if value not in choices:
            raise ConfigError(
                f"{self.origin(key)}: {key}={value!r}: use one of {list(choices)} (e.g. --set {key}={list(choices)[0]})"
            )


def check_config(config: Config, where: str = "config", set_keys=()) -> Config:
    """Check every value that has a range; raise ConfigError naming the key, where it came
    from (``set_keys``: the keys given with ``--set``, else the file ``where``) and the fix."""
    c = _Checker(where, set_keys)
    c.choice("workflow", config.workflow, WORKFLOWS)
    c.choice("distribution", config.distribution, DISTRIBUTIONS)
    d, t, m = config.data, config.train, config.model
    c.at_least("data.image_size", d.image_size, MIN_IMAGE_SIZE, 224)
    c.choice("data.small_images", d.small_images, ("warn", "skip", "error"))
    if "unknown_keywords" in d.options:
        c.choice("data.options.unknown_keywords", d.options["unknown_keywords"], ("error", "other", "ignore"))
    c.fraction("data.split.val", d.split.val)
    c.fraction("data.split.test", d.split.test)
    if d.split.val + d.split.test >= 1:
        raise ConfigError(
            f"{where}: data.split.val + data.split.test = {d.split.val + d.split.test} leaves no "
            "training patients; make them sum below 1 (e.g. --set data.split.test=0.15)"
        )
    a = d.augment
    c.at_least("data.augment.rotation", a.rotation, 0, 10)
    for key in ("zoom", "brightness", "contrast", "saturation", "hue"):
        c.fraction(f"data.augment.{key}", getattr(a, key), 0.1)
    if d.labels is not None and not isinstance(d.labels, list):
        raise ConfigError(f"{where}: data.labels={d.labels!r}: give a list, e.g. --set 'data.labels=[N, G, C]'")
    c.fraction("model.dropout", m.dropout, 0.2)
    c.at_least("model.trainable_blocks", m.trainable_blocks, -1, -1)
    if m.bn_momentum is not None and not 0 < m.bn_momentum < 1:
        c.fail("model.bn_momentum", m.bn_momentum, "must be in (0, 1) or null", 0.99)
    c.at_least("train.epochs", t.epochs, 1, 10)
    c.at_least("train.batch_size", t.batch_size, 1, 16)
    c.positive("train.learning_rate", t.learning_rate, 0.001)
    c.at_least("train.weight_decay", t.weight_decay, 0, 0.01)
    c.at_least("train.warmup_epochs", t.warmup_epochs, 0, 1)
    c.at_least("train.early_stopping", t.early_stopping, 0, 5)
    c.at_least("train.steps_per_epoch", t.steps_per_epoch, 1, 100)
    c.positive("train.pos_weight_cap", t.pos_weight_cap, 50)
    c.at_least("train.focal_gamma", t.focal_gamma, 0, 2)
    if not 0 < t.beta_2 < 1:
        c.fail("train.beta_2", t.beta_2, "must be in (0, 1)", 0.999)
    if t.layer_decay is not None and not 0 < t.layer_decay <= 1:
        c.fail("train.layer_decay", t.layer_decay, "must be in (0, 1] or null", 0.65)
    c.choice("train.checkpoint", t.checkpoint, ("best", "last"))
    c.choice("train.schedule", t.schedule, ("cosine", "constant"))
    c.choice("train.optimizer", t.optimizer.lower(), ("adam", "adamw", "sgd"))
    c.choice("train.class_weight", t.class_weight, (None, "balanced"))
    ema = t.ema
    if ema is not None and (isinstance(ema, bool) or not 0 < ema < 1):
        raise ConfigError(
            f"{where}: train.ema={ema!r}: give the weight average's momentum, a number between 0 "
            "and 1 (e.g. --set train.ema=0.99), or null for no averaging"
        )
    formats = ("keras", "saved_model", "tflite")
    bad = [f for f in config.export.formats if f not in formats]
    if bad:
        raise ConfigError(f"{where}: export.formats has {bad}; use some of {list(formats)}")
    variants = ("float32", "float16", "dynamic_int8", "int8")
    bad = [v for v in config.export.tflite if v not in variants]
    if bad:
        raise ConfigError(f"{where}: export.tflite has {bad}; use some of {list(variants)}")
    c.at_least("text.sequence_length", config.text.sequence_length, 2, 77)
    c.at_least("text.vocabulary_size", config.text.vocabulary_size, 8, 2000)
    caption = config.zero_shot.caption
    if caption is not None and "[CLS]" not in caption:
        raise ConfigError(
            f"{where}: zero_shot.caption={caption!r} has no [CLS] (where each class description goes); "
            "e.g. --set 'zero_shot.caption=A fundus photograph of [CLS]', or null to use the prompts as they are"
        )
    x = config.transfer
    c.at_least("transfer.folds", x.folds, 2, 5)
    bad = [p for p in x.protocols if p not in ("lp", "ft", "lp_ft")]
    if bad or not x.protocols:
        raise ConfigError(f"{where}: transfer.protocols={x.protocols}: use some of ['lp', 'ft', 'lp_ft']")
    c.choice("transfer.linear_probe.solver", x.linear_probe.solver, ("sklearn", "keras"))
    c.positive("transfer.linear_probe.C", x.linear_probe.C, 0.316)
    c.at_least("transfer.linear_probe.epochs", x.linear_probe.epochs, 1, 300)
    c.positive("transfer.linear_probe.learning_rate", x.linear_probe.learning_rate, 0.01)
    if not 0 < x.threshold < 1:
        c.fail("transfer.threshold", x.threshold, "must be in (0, 1)", 0.5)
    c.at_least("transfer.feature_batch_size", x.feature_batch_size, 1, 64)
    _check_backbones(config, where)
    return config


def _check_backbones(config: Config, where: str) -> None:
    """Build ``transfer.backbones`` into BackboneSpecs and check them."""
    x = config.transfer
    if not isinstance(x.backbones, list) or not x.backbones:
        raise ConfigError(
            f"{where}: transfer.backbones: give a list of backbones, e.g. "
            "[{name: imagenet, family: efficientnet_b0, weights: imagenet}]"
        )
    specs = [
        b if isinstance(b, BackboneSpec) else _build(BackboneSpec, b, where, f"transfer.backbones[{i}].")
        for i, b in enumerate(x.backbones)
    ]
    for i, spec in enumerate(specs):
        if backbone_family(spec) is None:
            raise ConfigError(
                f"{where}: transfer.backbones[{i}] ({spec.name}): family={spec.family!r}; set family "
                f"to one of {list(BACKBONE_FAMILIES)}"
            )
        if spec.name == "retclip" and not spec.weights:
            raise ConfigError(
                f"{where}: transfer.backbones[{i}]: retclip needs weights: the vision_encoder folder "
                "`kfundus pretrain` wrote"
            )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: transfer.backbones: names {names} repeat; give each backbone its own name")
    x.backbones = specs


# ---------------------------------------------------------------------------
# the public functions


def load_config(spec=None, overrides: list[str] | None = None, *, workflow: str | None = None) -> Config:
    """Read a config (a YAML path or a shipped name; None: the defaults), merge the
    workflow's defaults under it, apply ``--set`` overrides, build and check it.

    ``workflow`` is the command asking (train, pretrain, transfer): a config written for
    another command is an error that says which one to run. None: the config's own.
    """
    data, where = read_yaml(spec) if spec is not None else ({}, "config")
    data = apply_overrides(data, overrides)
    declared = data.get("workflow", workflow or "train")
    if declared not in WORKFLOWS:
        raise ConfigError(f"{where}: workflow={declared!r}: use one of {list(WORKFLOWS)}")
    if workflow is not None and declared != workflow:
        raise ConfigError(
            f"{where} is a config for `kfundus {declared.replace('_', '-')}`, not `kfundus "
            f"{workflow.replace('_', '-')}`: run kfundus {declared.replace('_', '-')} --config {spec}"
        )
    data = _merge(WORKFLOW_DEFAULTS[declared], {**data, "workflow": declared})
    set_keys = [item.split("=", 1)[0].strip() for item in overrides or []]
    return check_config(_build(Config, data, where), where, set_keys)


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def replace(config: Config, **sections) -> Config:
    """A copy of ``config`` with some values changed: ``replace(c, data={"path": p})``."""
    out = copy.deepcopy(config)
    for section, values in sections.items():
        if isinstance(values, dict):
            part = getattr(out, section)
            setattr(out, section, dataclasses.replace(part, **values))
        else:
            setattr(out, section, values)
    return out
