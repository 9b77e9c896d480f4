"""CLIP (and ViT) vision encoders fine-tuned with LoRA, for multi-label fundus
classification with BCE + Shadow loss (Valizadeh & Moazzami; SPECS.md section 1).

The model::

    left_image ─┐                                           ┌─ logits ─ sigmoid ─▶ probabilities
                ├─ normalise ─ encoder (shared, LoRA) ─ CLS ─┤  (one unit per label)
    right_image ┘     (CLIP mean/std)                concat ─┴──────────────────▶ embedding

Inputs are float32 RGB in [0, 255] (the kfundus pipeline); the CLIP (or ViT) input
normalisation is a layer inside the model, so the exported SavedModel / TFLite take the
same input. The per-eye variant (``two_eye=False``) has one input ``image``. Outputs:
``probabilities`` (sigmoid over the labels) and ``embedding`` (the fused features, what the
Shadow loss reads). ``OBJECTIVES`` trains them with ``BCE + lambda * Shadow``.

Encoder (``model.weights``):

- a keras-hub preset name (``clip_vit_base_patch16``, ``clip_vit_base_patch32``, ...;
  ``vit_base_patch16_224_imagenet`` for the ViT baseline), downloaded where a network
  exists. Of a full CLIP preset only the vision encoder is kept;
- a local keras-hub preset folder (offline hospitals: ``config.json`` +
  ``model.weights.h5``, as ``Backbone.save_to_preset`` writes, or a downloaded CLIP
  preset);
- ``null``: random initialisation from ``encoder_config`` (default: ViT-B/16 sizes).

A preset saved at another image size is adapted: its position embeddings are resized
bicubically on the patch grid (the class-token row kept). keras-hub leaves a freshly built
``CLIPVisionEncoder``'s ``position_ids`` at zero (every patch gets the same position);
kfundus sets them to ``0..n`` (pretrained presets already carry that).

Choices where the paper leaves room: the image feature is the encoder's class token after
its final layer norm (CLIP's pooled output, before CLIP's text-alignment projection); the
two eyes' features are concatenated (laterality kept) and that concatenation is the Shadow
loss embedding; LoRA on query and value by default (rank 8, alpha 16), everything else in
the encoder frozen, biases included; ``lora_rank: 0`` fine-tunes the last
``trainable_blocks`` transformer blocks instead (-1: all; the ViT baseline's full
fine-tuning).
"""

from __future__ import annotations

from pathlib import Path

import keras
import keras_hub  # noqa: F401 - registers the encoders' classes for keras.saving.load_model
import numpy as np

from kfundus import losses  # noqa: F401 - registers ShadowLoss, which compiled saved models name
from kfundus.errors import ConfigError

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
VIT_MEAN = [0.5, 0.5, 0.5]  # keras-hub's ViT presets scale to [-1, 1]
VIT_STD = [0.5, 0.5, 0.5]

# Random-initialisation sizes (ViT-B/16, as CLIP ViT-B/16 and ViT-Base have).
CLIP_B16 = {"patch_size": 16, "hidden_dim": 768, "num_layers": 12, "num_heads": 12,
            "intermediate_dim": 3072, "intermediate_activation": "quick_gelu"}
VIT_B16 = {"patch_size": 16, "hidden_dim": 768, "num_layers": 12, "num_heads": 12, "mlp_dim": 3072}
FAMILIES = {
    "clip": {"cls": "CLIPVisionEncoder", "config": CLIP_B16, "mean": CLIP_MEAN, "std": CLIP_STD,
             "example": "clip_vit_base_patch16"},
    "vit": {"cls": "ViTBackbone", "config": VIT_B16, "mean": VIT_MEAN, "std": VIT_STD,
            "example": "vit_base_patch16_224_imagenet"},
}
ENCODER_NAME = "encoder"


# ---------------------------------------------------------------------------
# encoders


def _encoder_class(family: str):
    import keras_hub

    return getattr(keras_hub.models, FAMILIES[family]["cls"])


def _image_size_of(encoder) -> int:
    return int(encoder.image_shape[0])


def _fix_position_ids(encoder) -> None:
    """keras-hub builds CLIPVisionEmbedding.position_ids as zeros; set them to 0..n-1."""
    for layer in encoder._flatten_layers(include_self=False):
        ids = getattr(layer, "position_ids", None)
        if ids is not None and isinstance(ids, keras.Variable):
            ids.assign(np.arange(int(np.prod(ids.shape))).reshape(ids.shape).astype(ids.dtype))


def build_encoder(family: str, image_size: int, encoder_config: dict | None = None):
    """A randomly initialised keras-hub encoder of ``family`` ("clip" or "vit")."""
    cls = _encoder_class(family)
    config = {**FAMILIES[family]["config"], **(encoder_config or {})}
    config["image_shape"] = (image_size, image_size, 3)
    try:
        encoder = cls(**config)
    except TypeError as exc:
        import inspect

        valid = sorted(set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs", "image_shape"})
        raise ConfigError(f"model.options.encoder_config={encoder_config}: {exc}; {cls.__name__} takes {valid}") from exc
    except ValueError as exc:
        raise ConfigError(f"model.options.encoder_config={encoder_config} at image size {image_size}: {exc}") from exc
    _fix_position_ids(encoder)
    return encoder


def _looks_like_path(weights: str) -> bool:
    return "/" in weights or weights.startswith(".") or Path(weights).exists()


def load_encoder(family: str, weights: str | None, image_size: int, encoder_config: dict | None = None):
    """The vision encoder ``model.weights`` names, at ``image_size`` (see the module doc).

    Raises ConfigError for a preset that cannot be fetched (saying how to point at a local
    folder), a missing folder, a preset of another family, or both weights and
    ``encoder_config`` given.
    """
    import keras_hub

    if family not in FAMILIES:
        raise ConfigError(f"encoder family {family!r}: use one of {sorted(FAMILIES)}")
    if weights is None:
        return build_encoder(family, image_size, encoder_config)
    if encoder_config:
        raise ConfigError(f"model.weights={weights!r} and model.options.encoder_config are both set: the preset "
                          "defines the encoder; give one of them")
    example = FAMILIES[family]["example"]
    if _looks_like_path(weights) and not (Path(weights) / "config.json").exists():
        raise ConfigError(f"model.weights={weights!r}: no keras-hub preset folder there (it needs config.json and "
                          f"model.weights.h5). Save one with keras_hub.models.Backbone.from_preset('{example}')"
                          ".save_to_preset(FOLDER) on a machine with a network, or use a preset name")
    try:
        backbone = keras_hub.models.Backbone.from_preset(weights)
    except Exception as exc:  # network, Kaggle credentials, unknown name
        raise ConfigError(
            f"could not load the keras-hub preset {weights!r} ({exc.__class__.__name__}: {str(exc)[:300]}). "
            f"Offline, download it where a network exists (keras_hub.models.Backbone.from_preset('{example}')"
            ".save_to_preset('/models/" + example + "')), copy the folder here and set "
            f"model.weights to it (--set model.weights=/models/{example}); or model.weights=null for a "
            "randomly initialised encoder.") from exc
    encoder = getattr(backbone, "vision_encoder", backbone)  # a full CLIP preset: its vision tower
    cls = _encoder_class(family)
    if not isinstance(encoder, cls):
        raise ConfigError(f"model.weights={weights!r} is a {type(backbone).__name__} preset; this model needs a "
                          f"{cls.__name__} (e.g. {example})")
    if family == "clip" and not np.any(keras.ops.convert_to_numpy(encoder.embedding.position_ids)):
        _fix_position_ids(encoder)
    if _image_size_of(encoder) != image_size:
        encoder = resize_encoder(encoder, family, image_size)
    return encoder


def resize_encoder(encoder, family: str, image_size: int):
    """The same encoder for another input size: weights copied, position embeddings of the
    patch grid resized bicubically (class-token row kept)."""
    config = encoder.get_config()
    patch = config["patch_size"] if isinstance(config["patch_size"], int) else config["patch_size"][0]
    if image_size % patch:
        raise ConfigError(f"data.image_size={image_size} is not a multiple of the encoder's patch size {patch}")
    config = {k: v for k, v in config.items() if k not in ("name", "trainable", "dtype")}
    config["image_shape"] = (image_size, image_size, 3)
    new = type(encoder)(**config)
    _fix_position_ids(new)
    old_vars = {v.path.split("/", 1)[-1]: v for v in encoder.weights}
    for variable in new.weights:
        key = variable.path.split("/", 1)[-1]
        source = old_vars.get(key)
        if source is None:
            raise ConfigError(f"cannot resize encoder {encoder.name}: no weight {key} in the preset")
        value = keras.ops.convert_to_numpy(source)
        if key.endswith("position_ids"):
            continue
        if tuple(value.shape) != tuple(variable.shape):
            if not key.endswith("position_embedding/embeddings"):
                raise ConfigError(f"cannot resize encoder {encoder.name}: {key} is {value.shape}, needs {variable.shape}")
            value = _resize_positions(value, int(variable.shape[0]))
        variable.assign(value)
    return new


def _resize_positions(table: np.ndarray, positions: int) -> np.ndarray:
    """(1 + g*g, D) -> (1 + G*G, D): the grid part resized bicubically."""
    import tensorflow as tf

    old, new = int(round(np.sqrt(len(table) - 1))), int(round(np.sqrt(positions - 1)))
    grid = table[1:].reshape(1, old, old, -1)
    grid = tf.image.resize(grid, (new, new), method="bicubic").numpy().reshape(new * new, -1)
    return np.concatenate([table[:1], grid]).astype(table.dtype)


# ---------------------------------------------------------------------------
# layers


def input_normalization(family: str):
    """The encoder family's input normalisation as a layer, for float32 RGB in [0, 255]
    (named ``<family>_normalization``)."""
    spec = FAMILIES[family]
    return keras.layers.Normalization(mean=[255.0 * m for m in spec["mean"]],
                                      variance=[(255.0 * s) ** 2 for s in spec["std"]], name=f"{family}_normalization")


def token_pooling(mode: str, tokens: int):
    """One vector per image from a ``(batch, tokens, dim)`` sequence, built from core Keras
    layers only (a saved model then needs no kfundus import to load): ``"cls"`` keeps the
    first token (CLIP's pooled output), ``"mean"`` averages the patch tokens (encoders
    without a class token)."""
    if mode == "cls":
        crop = keras.layers.Cropping1D((0, tokens - 1), name="cls_token")
        flat = keras.layers.Flatten(name="token_pooling")
        return lambda x: flat(crop(x))
    if mode == "mean":
        crop = keras.layers.Cropping1D((1, 0), name="patch_tokens")
        mean = keras.layers.GlobalAveragePooling1D(name="token_pooling")
        return lambda x: mean(crop(x))
    raise ConfigError(f"model.options.pooling={mode!r}: use 'cls' or 'mean'")


def _freeze_blocks(encoder, trainable_blocks: int) -> None:
    """Without LoRA: fine-tune the last ``trainable_blocks`` transformer blocks and the
    final layer norm (-1: the whole encoder, 0: none, a linear probe)."""
    import re

    encoder.trainable = trainable_blocks != 0
    if trainable_blocks <= 0:
        return
    layers = encoder._flatten_layers(include_self=False)
    number = {id(x): re.search(r"(?:encoder_block_|transformer_block_)(\d+)$", x.name) for x in layers}
    blocks = sorted((x for x in layers if number[id(x)]), key=lambda x: int(number[id(x)].group(1)))
    final_norm = [x for x in layers if re.search(r"(^|[^e]_)layer_norm$|^ln$", x.name) and "block" not in (x.path or "")]
    for layer in layers:
        layer.trainable = False
    for layer in blocks[max(0, len(blocks) - trainable_blocks):] + final_norm[-1:]:
        layer.trainable = True


def build_transformer_classifier(
    num_outputs: int,
    *,
    family: str = "clip",
    image_size: int = 224,
    weights: str | None = None,
    trainable_blocks: int = -1,
    dropout: float = 0.1,
    activation: str = "sigmoid",
    two_eye: bool = False,
    bn_momentum: float | None = None,
    encoder_config: dict | None = None,
    lora_rank: int = 8,
    lora_alpha: float | None = 16,
    lora_targets=("query", "value"),
    lora_per_head: bool = False,
    pooling: str = "cls",
    name: str | None = None,
) -> keras.Model:
    """A CLIP / ViT classifier with LoRA (see the module docstring).

    Args:
        num_outputs: number of labels (sigmoid units).
        family: ``"clip"`` (keras-hub CLIPVisionEncoder) or ``"vit"`` (ViTBackbone).
        image_size: input side in pixels (a multiple of the patch size).
        weights: preset name, local preset folder, or None (random, ``encoder_config``).
        trainable_blocks: with ``lora_rank: 0`` only: the last N transformer blocks are
            fine-tuned (-1 all, 0 none: linear probe). With LoRA the encoder is frozen.
        dropout: dropout before the classification layer.
        activation: ``"sigmoid"`` (multi-label); ``"softmax"`` for multi-class data.
        two_eye: inputs ``left_image`` and ``right_image`` through one shared encoder,
            features concatenated; otherwise one input ``image``.
        bn_momentum: unused (transformers have no BatchNorm); must stay None.
        encoder_config: keras-hub encoder arguments for random initialisation (patch_size,
            hidden_dim, num_layers, num_heads, intermediate_dim / mlp_dim).
        lora_rank: LoRA rank r (0: no LoRA, see ``trainable_blocks``).
        lora_alpha: LoRA alpha; the update is ``(alpha / r) A @ B`` (None: alpha = r).
        lora_targets: layer-name patterns (``kfundus.lora.TARGET_ALIASES``: query, key,
            value, attention_output, attention, mlp; or regular expressions).
        lora_per_head: keep Keras' per-head factorisation of the query / key / value
            projections (``heads`` times the parameters; see ``kfundus.lora``) instead of
            the paper's rank-r update of the ``hidden x hidden`` matrix.
        pooling: ``"cls"`` or ``"mean"`` (see ``token_pooling``).

    Example:

    >>> model = build_transformer_classifier(8, image_size=32, two_eye=True,
    ...     encoder_config=dict(patch_size=8, hidden_dim=32, num_layers=2, num_heads=2, intermediate_dim=64))
    ... # doctest: +SKIP
    >>> sorted(model.output)  # doctest: +SKIP
    ['embedding', 'probabilities']
    """
    from kfundus.lora import apply_lora, parameter_summary

    if bn_momentum is not None:
        raise ConfigError("model.bn_momentum is for BatchNorm networks; CLIP/ViT encoders have none: leave it null")
    encoder = load_encoder(family, weights, image_size, encoder_config)
    encoder.name = ENCODER_NAME
    if int(lora_rank) > 0:
        apply_lora(encoder, int(lora_rank), lora_alpha, list(lora_targets), per_head=bool(lora_per_head))
    else:
        _freeze_blocks(encoder, trainable_blocks)
    normalise = input_normalization(family)
    pool = token_pooling(pooling, int(encoder.output.shape[1]))
    shape = (image_size, image_size, 3)

    def features(x):
        return pool(encoder({"images": normalise(x)}))

    if two_eye:
        inputs = [keras.Input(shape, name="left_image"), keras.Input(shape, name="right_image")]
        fused = keras.layers.Concatenate(name="patient_features")([features(x) for x in inputs])
    else:
        inputs = keras.Input(shape, name="image")
        fused = features(inputs)
    x = keras.layers.Dropout(dropout, name="head_dropout")(fused) if dropout else fused
    logits = keras.layers.Dense(num_outputs, name="logits", dtype="float32")(x)
    outputs = {
        "probabilities": keras.layers.Activation(activation, name="probabilities", dtype="float32")(logits),
        "embedding": keras.layers.Activation("linear", name="embedding", dtype="float32")(fused),
    }
    model = keras.Model(inputs, outputs, name=name or f"{family}_lora")
    counts = parameter_summary(model)
    print(f"{model.name}: {counts['trainable']:,} trainable of {counts['total']:,} parameters "
          f"({100 * counts['share']:.2f} %)" + (f"; LoRA rank {lora_rank}, alpha {lora_alpha}, on "
                                               f"{list(lora_targets)}" if int(lora_rank) > 0 else ""))
    return model


def build_clip_lora(num_outputs: int, *, image_size=224, weights=None, trainable_blocks=-1, dropout=0.1,
                    activation="sigmoid", two_eye=False, bn_momentum=None, encoder_config=None, lora_rank=8,
                    lora_alpha=16, lora_targets=("query", "value"), lora_per_head=False, pooling="cls"):
    """CLIP vision encoder + LoRA (``model.name: clip_lora``); see ``build_transformer_classifier``."""
    return build_transformer_classifier(
        num_outputs, family="clip", image_size=image_size, weights=weights, trainable_blocks=trainable_blocks,
        dropout=dropout, activation=activation, two_eye=two_eye, bn_momentum=bn_momentum,
        encoder_config=encoder_config, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
        lora_per_head=lora_per_head, pooling=pooling, name="clip_lora")


def build_vit(num_outputs: int, *, image_size=224, weights=None, trainable_blocks=-1, dropout=0.1,
              activation="sigmoid", two_eye=False, bn_momentum=None, encoder_config=None, lora_rank=8,
              lora_alpha=16, lora_targets=("query", "value"), lora_per_head=False, pooling="cls"):
    """keras-hub ViT baseline (``model.name: vit``), same head, LoRA and loss as ``clip_lora``;
    ``lora_rank: 0`` for plain fine-tuning."""
    return build_transformer_classifier(
        num_outputs, family="vit", image_size=image_size, weights=weights, trainable_blocks=trainable_blocks,
        dropout=dropout, activation=activation, two_eye=two_eye, bn_momentum=bn_momentum,
        encoder_config=encoder_config, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
        lora_per_head=lora_per_head, pooling=pooling, name="vit")


# ---------------------------------------------------------------------------
# objective: BCE + lambda * Shadow


SHADOW_OPTIONS = {"shadow_weight": 1.0, "margin": 0.5}


def shadow_objective(config, manifest, train_targets):
    """``BCE + lambda * Shadow``: ``train.loss`` (bce, weighted_bce or focal) on
    ``probabilities``, ``ShadowLoss(margin)`` on ``embedding`` with weight ``lambda``.
    ``train.loss_options``: ``shadow_weight`` (lambda, default 1; 0 = BCE only) and
    ``margin`` (default 0.5). ``train.monitor`` must name the probabilities' metric
    (``val_probabilities_auroc``) or a loss."""
    from kfundus.losses import ShadowLoss, make_loss
    from kfundus.training import Objective, make_metrics

    t = config.train
    options = dict(t.loss_options or {})
    unknown = sorted(set(options) - set(SHADOW_OPTIONS))
    if unknown:
        raise ConfigError(f"train.loss_options: unknown key(s) {unknown} for {config.model.name}; "
                          f"valid: {sorted(SHADOW_OPTIONS)}")
    options = {**SHADOW_OPTIONS, **options}
    if float(options["shadow_weight"]) < 0 or float(options["margin"]) < 0:
        raise ConfigError(f"train.loss_options {options}: shadow_weight and margin must be >= 0")
    valid_monitors = {"val_probabilities_auroc", "val_probabilities_accuracy", "val_loss",
                      "val_probabilities_loss", "val_embedding_loss"}
    if t.monitor not in valid_monitors:
        raise ConfigError(f"train.monitor={t.monitor!r}: model {config.model.name} has two outputs, so its "
                          f"metrics are prefixed by the output name; use one of {sorted(valid_monitors)} "
                          "(e.g. val_probabilities_auroc)")
    if manifest.task == "multiclass":
        raise ConfigError(f"model {config.model.name} is a multi-label (sigmoid) model; {manifest.name} is multi-class")
    bce = make_loss(t.loss, manifest.task, train_targets, pos_weight_cap=t.pos_weight_cap, focal_gamma=t.focal_gamma)
    return Objective(
        loss={"probabilities": bce, "embedding": ShadowLoss(margin=float(options["margin"]))},
        metrics={"probabilities": make_metrics(manifest.task, len(manifest.labels))},
        loss_weights={"probabilities": 1.0, "embedding": float(options["shadow_weight"])},
        targets=lambda y: {"probabilities": y, "embedding": y},
        primary="probabilities",
        callbacks=[_adapter_checkpoint(t.monitor, manifest.labels)]
        if int((config.model.options or {}).get("lora_rank", 8)) > 0 else [],
    )


def _adapter_checkpoint(monitor: str, labels):
    """``run_dir -> AdapterCheckpoint``: the run's ``adapters.npz`` follows its best checkpoint
    (``model.keras`` has the adapters merged, as Keras saves LoRA layers)."""
    from pathlib import Path

    from kfundus.lora import AdapterCheckpoint

    return lambda run_dir: AdapterCheckpoint(Path(run_dir) / "adapters.npz", monitor=monitor,
                                             metadata={"labels": list(labels)})


def find_encoder(model: keras.Model):
    """The nested keras-hub encoder of a kfundus CLIP/ViT classifier (None if absent)."""
    import keras_hub

    for layer in model.layers:
        if isinstance(layer, keras_hub.models.Backbone):
            return layer
    return None
