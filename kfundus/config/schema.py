"""The one configuration schema: dataclasses every workflow reads.

A config has shared sections, ``data``, ``model``, ``train`` and ``export``, that
supervised training (``kfundus train``), RET-CLIP pre-training (``kfundus pretrain``) and
the transfer study (``kfundus transfer``) all read, plus the sections only one workflow
reads: ``text`` and ``zero_shot`` (pre-training; ``zero_shot`` also ``kfundus zero-shot``),
``transfer`` (the transfer study). The top-level ``workflow`` key says which command a config
is for.

This module is plain Python (no TensorFlow): reading and checking a config is instant.
"""

from __future__ import annotations

import dataclasses

WORKFLOWS = ("train", "pretrain", "transfer", "zero_shot")
DISTRIBUTIONS = ("none", "mirrored", "multi_worker")


@dataclasses.dataclass(frozen=True)
class Augment:
    """Random augmentations, applied per image after the cache (training only).

    Horizontal flip is off by default: it turns a left eye into a right eye, which
    matters for laterality-aware models (RET-CLIP, two-eye models). Rotation fills with
    black, which matches the fundus background.

    Args:
        rotation: maximum rotation in degrees (0 disables).
        hflip, vflip: random horizontal / vertical flips.
        zoom: maximum relative scale change (0.1 = 90 % to 110 %).
        brightness: shift by up to this fraction of the value range.
        contrast: multiply contrast by a factor in [1 - c, 1 + c].
        saturation: multiply saturation by a factor in [1 - s, 1 + s].
        hue: rotate hue by up to this fraction of half the colour circle.

    A value of 0 (or false) disables that augmentation.
    """

    rotation: float = 0.0
    hflip: bool = False
    vflip: bool = False
    zoom: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    def enabled(self) -> bool:
        return any(dataclasses.asdict(self).values())


@dataclasses.dataclass
class SplitConfig:
    """Patient-level split: fractions of patients for validation and test, and the seed.
    A source's official split (RFMiD, Kermany) is used when ``official`` is true. The
    transfer study splits each cross-validation fold's training patients with ``val``."""

    val: float = 0.15
    test: float = 0.15
    seed: int = 0
    official: bool = True


@dataclasses.dataclass
class DataConfig:
    """Where the data is and how it becomes model input.

    ``source`` names a reader (``kfundus configs`` and the docs list them: odir,
    odir_kaggle, rfmid, dr, folders, csv, hrdc; for ``pretrain`` the image-report readers
    odir, csv, retclip); ``options`` are passed to it. ``labels`` keeps a subset of the
    label columns (e.g. ODIR per-eye N, G, C; the transfer study takes exactly one);
    ``drop_empty`` drops rows with none of them. ``flip`` (pre-training only) mirrors both
    eyes of a pair and swaps them, with the report's sides. ``skip_unreadable`` skips (and
    lists in the run's ``skipped.csv``) images that do not decode instead of stopping;
    ``small_images`` decides about images far smaller than ``image_size`` (enlarged more than
    2x): ``warn`` (keep them, with a warning), ``skip`` (leave them out, listed in
    ``skipped.csv``) or ``error``.
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
    small_images: str = "warn"
    flip: bool = False
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    augment: Augment = dataclasses.field(default_factory=Augment)


@dataclasses.dataclass
class ModelConfig:
    """Which system's model builder, and its options (``kfundus.systems.build_model``).

    ``options`` holds the family's own keyword arguments (a dual-stream network's depth
    and width, a CLIP encoder's LoRA rank, RET-CLIP's text encoder); the builder rejects
    unknown ones. ``weights`` names pretrained weights (a preset, a local file or folder)."""

    name: str = "efficientnet_b0"
    weights: str | None = None
    trainable_blocks: int = -1
    dropout: float = 0.2
    bn_momentum: float | None = None
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainConfig:
    """Optimisation, read by the one engine (``kfundus.engine.fit``).

    ``schedule``: cosine (with ``warmup_epochs``) or constant. ``monitor`` is the
    validation metric that picks the best checkpoint and drives early stopping
    (``early_stopping`` = patience in epochs, 0 = off). ``checkpoint``: which weights
    become ``model.keras``: ``best`` (the epoch with the best ``monitor``) or ``last``.
    ``loss``: bce, weighted_bce (positive weights n_neg/n_pos from the training split,
    capped at ``pos_weight_cap``) or focal (``focal_gamma``); a system may define its own
    (dual_stream: wlsr, label_smoothing). ``loss_options``: parameters of a system's own
    loss. ``class_weight``: ``balanced`` weighs each class by n / (2 n_class) (binary
    tasks; the transfer study's fine-tuning), null: none. ``beta_2``: Adam/AdamW
    second-moment decay. ``ema``: momentum of an exponential moving average of the
    weights (Polyak averaging), e.g. 0.99; validation, checkpoints and the final model
    then use the averaged weights. ``seed`` seeds initialisation, shuffling and
    augmentation; ``deterministic`` switches on TensorFlow's op determinism while training, so
    the same config and seed give the same weights on the same machine (off: a little faster,
    not repeatable). ``steps_per_epoch``: null = one pass over the data. ``layer_decay``:
    layer-wise learning-rate decay (AdamW only; systems that define layer depths, e.g.
    retfound): a variable ``d`` layers below the head learns at ``layer_decay ** d`` times
    the rate (RETFound: 0.65); null: off."""

    epochs: int = 20
    loss: str = "bce"
    loss_options: dict = dataclasses.field(default_factory=dict)
    pos_weight_cap: float = 50.0
    focal_gamma: float = 2.0
    class_weight: str | None = None
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
    deterministic: bool = True
    steps_per_epoch: int | None = None
    layer_decay: float | None = None


@dataclasses.dataclass
class ExportConfig:
    """Formats written to ``<dir>/<run>/`` after training, and the TFLite variants
    (float32, float16, dynamic_int8, int8). int8 is calibrated on training images."""

    formats: list = dataclasses.field(default_factory=lambda: ["keras", "saved_model", "tflite"])
    tflite: list = dataclasses.field(default_factory=lambda: ["float32", "float16", "dynamic_int8", "int8"])
    dir: str = "saved_models"


@dataclasses.dataclass
class TextConfig:
    """Report text (pre-training). ``tokenizer``: null / "wordpiece" (a vocabulary built
    offline from the training reports), a keras-hub preset name, or a local tokenizer
    preset folder."""

    tokenizer: str | None = None
    vocabulary_size: int = 2000
    sequence_length: int = 77
    lowercase: bool = True


@dataclasses.dataclass
class ZeroShotConfig:
    """Zero-shot classes. Pre-training evaluation (per eye): ``prompts`` maps a class to
    prompt templates (``{eye}`` becomes left / right; several templates are averaged);
    ``labels`` maps the class to the per-eye label column of the pairs table (``N`` reads
    ``left_N`` / ``right_N``). ``kfundus zero-shot`` (a converted FLAIR or RET-CLIP model on a
    classification dataset): ``labels`` maps each class to a label column of the dataset,
    ``prompts`` optionally gives a class its descriptions, ``caption`` is the template each
    description is put into (``[CLS]`` marks the place; FLAIR: "A fundus photograph of [CLS]";
    null: the prompts as they are), and ``expert_knowledge`` uses FLAIR's expert descriptions
    of a class (plus its name) where ``prompts`` gives none."""

    prompts: dict = dataclasses.field(default_factory=dict)
    labels: dict = dataclasses.field(default_factory=dict)
    caption: str | None = None
    expert_knowledge: bool = True


@dataclasses.dataclass
class BackboneSpec:
    """One backbone of the transfer study.

    ``name`` labels it in the table; ``family`` (efficientnet_b0, clip, vit, flair) is implied
    by the names efficientnet_b0, clip, retclip, vit and flair. ``weights``: ``imagenet`` or a
    local ``efficientnetb0_notop.h5`` (EfficientNet-B0); a keras-hub preset name or local preset
    folder (clip, vit; a converted RET-CLIP folder is one); a folder ``kfundus convert --from
    flair`` wrote (flair: the FLAIR ResNet-50, or a torchvision ImageNet ResNet-50 converted the
    same way); a folder ``kfundus convert --from retfound`` wrote, or ``retfound:/path/file.pth``
    (retfound: the RETFound ViT, global-pool + fc_norm feature); null: random initialisation
    (seeded, the same start in every fold and protocol). ``encoder_config``: keras-hub encoder
    sizes for a random clip/vit, ResNet sizes for flair, ViT sizes for a random retfound."""

    name: str = "random"
    family: str | None = None
    weights: str | None = None
    encoder_config: dict = dataclasses.field(default_factory=dict)


BACKBONE_FAMILIES = ("efficientnet_b0", "clip", "vit", "flair", "retfound")
NAME_FAMILY = {
    "efficientnet_b0": "efficientnet_b0",
    "clip": "clip",
    "retclip": "clip",
    "vit": "vit",
    "flair": "flair",
    "retfound": "retfound",
}


def backbone_family(spec: BackboneSpec) -> str | None:
    """The family a backbone spec names or implies (None when it does neither)."""
    family = spec.family or NAME_FAMILY.get(spec.name)
    return family if family in BACKBONE_FAMILIES else None


@dataclasses.dataclass
class LinearProbeConfig:
    """Linear probing on frozen features. ``solver: sklearn``: logistic regression (lbfgs)
    on standardised features, ``class_weight="balanced"``, inverse regularisation ``C``;
    ``solver: keras``: a Dense unit trained by the engine on the same standardised
    features with the same objective (L2 = 1 / (2 C n), balanced weights), full batch,
    Adam at ``learning_rate`` for ``epochs`` steps. Either way the scaler is folded into
    the weights."""

    solver: str = "sklearn"
    C: float = 0.316
    max_iter: int = 5000
    epochs: int = 300
    learning_rate: float = 0.01


@dataclasses.dataclass
class TransferConfig:
    """The transfer study (``kfundus transfer``): ``backbones`` x ``protocols`` (lp, ft,
    lp_ft) x ``folds`` (patient-level, stratified). Fine-tuning (FT and LP-FT's second
    stage) is trained as the ``train`` section says; LP as ``linear_probe`` says.
    Decisions at probability ``threshold``."""

    folds: int = 5
    backbones: list = dataclasses.field(default_factory=lambda: [{"name": "random", "family": "efficientnet_b0"}])
    protocols: list = dataclasses.field(default_factory=lambda: ["lp", "ft", "lp_ft"])
    linear_probe: LinearProbeConfig = dataclasses.field(default_factory=LinearProbeConfig)
    threshold: float = 0.5
    feature_batch_size: int = 64


@dataclasses.dataclass
class Config:
    """The root of every config file.

    ``workflow``: the command the config is for (train, pretrain, transfer, zero_shot).
    ``description``: one line, shown by ``kfundus configs``. ``distribution``: none |
    mirrored | multi_worker, the data-parallel strategy (``train.batch_size`` is the global
    batch)."""

    workflow: str = "train"
    name: str = "run"
    description: str = ""
    output_dir: str = "runs"
    distribution: str = "none"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    zero_shot: ZeroShotConfig = dataclasses.field(default_factory=ZeroShotConfig)
    transfer: TransferConfig = dataclasses.field(default_factory=TransferConfig)


# Defaults that differ by workflow, merged under what a config file says.
RETCLIP_TRAIN = {
    "optimizer": "adamw",
    "learning_rate": 3e-5,
    "weight_decay": 1e-3,
    "beta_2": 0.98,
    "epochs": 10,
    "batch_size": 256,
    "warmup_epochs": 1.0,
    "monitor": "val_loss",
}
TRANSFER_TRAIN = {
    "optimizer": "adamw",
    "learning_rate": 1e-4,
    "weight_decay": 0.01,
    "epochs": 30,
    "early_stopping": 5,
    "batch_size": 16,
    "schedule": "constant",
    "monitor": "val_auroc",
    "class_weight": "balanced",
}
WORKFLOW_DEFAULTS = {
    "train": {},
    "pretrain": {"model": {"name": "retclip"}, "train": RETCLIP_TRAIN, "data": {"split": {"val": 0.1, "test": 0.1}}},
    "transfer": {"train": TRANSFER_TRAIN, "data": {"source": "hrdc"}},
    "zero_shot": {"model": {"name": "flair"}, "data": {"split": {"val": 0.0, "test": 0.0}}},
}

# Keys of the three configuration roots kfundus had before version 0.2, and where they went.
MOVED_KEYS = {
    "cv.k": "transfer.folds",
    "cv.seed": "data.split.seed",
    "cv.val": "data.split.val",
    "cv": "transfer.folds",
    "data.label": "data.labels (a list of one)",
    "backbones": "transfer.backbones",
    "protocols": "transfer.protocols",
    "lp": "transfer.linear_probe",
    "threshold": "transfer.threshold",
    "feature_batch_size": "transfer.feature_batch_size",
    "ft": "train (optimizer adamw, early_stopping, ...)",
    "ft.learning_rate": "train.learning_rate",
    "ft.weight_decay": "train.weight_decay",
    "ft.epochs": "train.epochs",
    "ft.patience": "train.early_stopping",
    "ft.batch_size": "train.batch_size",
    "ft.balanced": "train.class_weight=balanced",
    "data.val": "data.split.val",
    "data.test": "data.split.test",
    "data.seed": "data.split.seed",
    "model.vision_weights": "model.weights",
    "model.vision_config": "model.options.vision_config",
    "model.text_weights": "model.options.text_weights",
    "model.text_config": "model.options.text_config",
    "model.embed_dim": "model.options.embed_dim",
    "model.text_head_dim": "model.options.text_head_dim",
}
