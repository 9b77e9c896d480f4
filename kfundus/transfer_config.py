"""Configuration of ``kfundus transfer`` (see ``kfundus.transfer``): its own dataclasses,
read from YAML with ``--set`` overrides and strict keys like ``kfundus.config``.

Defaults follow FLAIR (SPECS.md section 5) where it says something: the linear probe is a
logistic regression with balanced class weights and C = 0.316; fine-tuning is AdamW at
lr 1e-4 with early stopping on validation. Where it is silent, the choices are ours and
say so below.
"""

from __future__ import annotations

import dataclasses

from kfundus.config import _build, read_yaml
from kfundus.data.pipeline import Augment
from kfundus.errors import ConfigError

PROTOCOLS = ("lp", "ft", "lp_ft")
FAMILIES = ("efficientnet_b0", "clip", "vit")
# backbone names that imply a family (any other name needs ``family``)
NAME_FAMILY = {"efficientnet_b0": "efficientnet_b0", "clip": "clip", "retclip": "clip", "vit": "vit"}


@dataclasses.dataclass
class TransferData:
    """The labelled dataset: a ``kfundus.data.sources`` reader (``hrdc``, ``odir``, ``csv``, ...)
    with its ``options``; ``label``: the one label column that is the binary task (e.g. ODIR's
    per-eye ``G``); default the reader's only label."""

    source: str = "hrdc"
    path: str | None = None
    options: dict = dataclasses.field(default_factory=dict)
    label: str | None = None
    image_size: int = 224
    crop_fundus: bool = True
    cache_dir: str | None = None
    skip_unreadable: bool = False
    augment: Augment = dataclasses.field(default_factory=Augment)


@dataclasses.dataclass
class CVConfig:
    """Patient-level stratified ``k``-fold cross-validation. Inside each fold a share ``val``
    of the training patients (stratified, patient-level) is held out for early stopping;
    the test fold is never used to choose anything."""

    k: int = 5
    seed: int = 0
    val: float = 0.15


@dataclasses.dataclass
class BackboneSpec:
    """One backbone of the comparison.

    ``name`` labels it in the table; ``family`` (efficientnet_b0, clip, vit) is implied by
    the names efficientnet_b0, clip, retclip (a CLIP preset saved by ``kfundus pretrain``)
    and vit. ``weights``: ``imagenet`` or a local ``efficientnetb0_notop.h5``
    (EfficientNet-B0); a keras-hub preset name or local preset folder (clip, vit); null:
    random initialisation (seeded by ``cv.seed``, the same start in every fold and protocol).
    ``encoder_config``: keras-hub encoder sizes for a random clip/vit."""

    name: str = "random"
    family: str | None = None
    weights: str | None = None
    encoder_config: dict = dataclasses.field(default_factory=dict)

    def resolved_family(self) -> str:
        family = self.family or NAME_FAMILY.get(self.name)
        if family not in FAMILIES:
            raise ConfigError(f"backbone {self.name!r}: family={self.family!r}; set family to one of {list(FAMILIES)}")
        return family


@dataclasses.dataclass
class LPConfig:
    """Linear probing on frozen features. ``solver: sklearn``: logistic regression (lbfgs)
    on standardised features, ``class_weight="balanced"``, inverse regularisation ``C``;
    ``solver: keras``: a Dense unit trained on the same standardised features with the
    same objective (L2 = 1 / (2 C n), balanced sample weights), full batch, Adam at
    ``learning_rate`` for ``epochs``. Either way the scaler is folded into the weights."""

    solver: str = "sklearn"
    C: float = 0.316
    max_iter: int = 5000
    epochs: int = 300
    learning_rate: float = 0.01


@dataclasses.dataclass
class FTConfig:
    """Full fine-tuning (FT and the second stage of LP-FT): AdamW, constant ``learning_rate``,
    ``weight_decay`` (FLAIR gives none; 0.01 is PyTorch's AdamW default), at most
    ``epochs``, early stopping after ``patience`` epochs without a better validation
    AUROC, the best weights kept (LP-FT counts its starting point, the LP solution, as
    epoch 0). ``balanced``: class-weighted BCE (weights n / (2 n_class)), as the LP's."""

    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    epochs: int = 30
    patience: int = 5
    batch_size: int = 16
    balanced: bool = True


@dataclasses.dataclass
class TransferConfig:
    name: str = "transfer"
    output_dir: str = "runs"
    data: TransferData = dataclasses.field(default_factory=TransferData)
    cv: CVConfig = dataclasses.field(default_factory=CVConfig)
    backbones: list = dataclasses.field(default_factory=lambda: [{"name": "random", "family": "efficientnet_b0"}])
    protocols: list = dataclasses.field(default_factory=lambda: list(PROTOCOLS))
    lp: LPConfig = dataclasses.field(default_factory=LPConfig)
    ft: FTConfig = dataclasses.field(default_factory=FTConfig)
    threshold: float = 0.5
    feature_batch_size: int = 64
    distribution: str = "none"  # none | mirrored | multi_worker (kfundus.distribute); ft.batch_size is global


def check_config(config: TransferConfig, where: str = "config") -> TransferConfig:
    """Build the backbone specs and check the choices (raises ConfigError naming the key)."""
    if not isinstance(config.backbones, list) or not config.backbones:
        raise ConfigError(f"{where}.backbones: give a list of backbones, e.g. [{{name: random, family: clip}}]")
    specs = [b if isinstance(b, BackboneSpec) else _build(BackboneSpec, b, f"{where}.backbones[{i}]")
             for i, b in enumerate(config.backbones)]
    for spec in specs:
        spec.resolved_family()
        if spec.name == "retclip" and not spec.weights:
            raise ConfigError(f"{where}.backbones: retclip needs weights: the preset folder `kfundus pretrain` wrote")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.backbones: names {names} repeat; give each backbone its own name")
    config.backbones = specs
    bad = [p for p in config.protocols if p not in PROTOCOLS]
    if bad or not config.protocols:
        raise ConfigError(f"{where}.protocols={config.protocols}: use some of {list(PROTOCOLS)}")
    if config.lp.solver not in ("sklearn", "keras"):
        raise ConfigError(f"{where}.lp.solver={config.lp.solver!r}: use sklearn or keras")
    if config.lp.C <= 0:
        raise ConfigError(f"{where}.lp.C={config.lp.C}: must be > 0")
    from kfundus.distribute import check_distribution

    check_distribution(config.distribution, f"{where}.distribution")
    if not 0 < config.cv.val < 1:
        raise ConfigError(f"{where}.cv.val={config.cv.val}: a fraction in (0, 1) of the training patients")
    return config


def load_transfer_config(path=None, overrides=None) -> TransferConfig:
    """Read a transfer YAML (or start from defaults) and apply ``--set`` overrides."""
    data, where = read_yaml(path, overrides, "see configs/hr_transfer.yaml")
    return check_config(_build(TransferConfig, data, where), where)


def config_dict(config: TransferConfig) -> dict:
    return dataclasses.asdict(config)
