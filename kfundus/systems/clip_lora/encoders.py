"""The vision encoders of the CLIP / ViT systems: keras-hub ``CLIPVisionEncoder`` and
``ViTBackbone``, loaded from a preset name, a local preset folder or random sizes, resized
to another input size, and the layers in front of and behind them (input normalisation,
class-token or mean pooling). RET-CLIP and the transfer study use them too.

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
"""

from __future__ import annotations

from pathlib import Path

import keras
import keras_hub  # registers the encoders' classes for keras.saving.load_model
import numpy as np

from kfundus.errors import ConfigError

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
VIT_MEAN = [0.5, 0.5, 0.5]  # keras-hub's ViT presets scale to [-1, 1]
VIT_STD = [0.5, 0.5, 0.5]

# Random-initialisation sizes (ViT-B/16, as CLIP ViT-B/16 and ViT-Base have).
CLIP_B16 = {
    "patch_size": 16,
    "hidden_dim": 768,
    "num_layers": 12,
    "num_heads": 12,
    "intermediate_dim": 3072,
    "intermediate_activation": "quick_gelu",
}
VIT_B16 = {"patch_size": 16, "hidden_dim": 768, "num_layers": 12, "num_heads": 12, "mlp_dim": 3072}
FAMILIES = {
    "clip": {
        "cls": "CLIPVisionEncoder",
        "config": CLIP_B16,
        "mean": CLIP_MEAN,
        "std": CLIP_STD,
        "example": "clip_vit_base_patch16",
    },
    "vit": {
        "cls": "ViTBackbone",
        "config": VIT_B16,
        "mean": VIT_MEAN,
        "std": VIT_STD,
        "example": "vit_base_patch16_224_imagenet",
    },
}
ENCODER_NAME = "encoder"


# ---------------------------------------------------------------------------
# encoders


def _encoder_class(family: str):

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
        raise ConfigError(
            f"model.options.encoder_config={encoder_config}: {exc}; {cls.__name__} takes {valid}"
        ) from exc
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

    if family not in FAMILIES:
        raise ConfigError(f"encoder family {family!r}: use one of {sorted(FAMILIES)}")
    if weights is None:
        return build_encoder(family, image_size, encoder_config)
    if encoder_config:
        raise ConfigError(
            f"model.weights={weights!r} and model.options.encoder_config are both set: the preset "
            "defines the encoder; give one of them"
        )
    example = FAMILIES[family]["example"]
    if _looks_like_path(weights) and not (Path(weights) / "config.json").exists():
        raise ConfigError(
            f"model.weights={weights!r}: no keras-hub preset folder there (it needs config.json and "
            f"model.weights.h5). Save one with keras_hub.models.Backbone.from_preset('{example}')"
            ".save_to_preset(FOLDER) on a machine with a network, or use a preset name"
        )
    try:
        backbone = keras_hub.models.Backbone.from_preset(weights)
    except Exception as exc:  # network, Kaggle credentials, unknown name
        raise ConfigError(
            f"could not load the keras-hub preset {weights!r} ({exc.__class__.__name__}: {str(exc)[:300]}). "
            f"Offline, download it where a network exists (keras_hub.models.Backbone.from_preset('{example}')"
            ".save_to_preset('/models/" + example + "')), copy the folder here and set "
            f"model.weights to it (--set model.weights=/models/{example}); or model.weights=null for a "
            "randomly initialised encoder."
        ) from exc
    encoder = getattr(backbone, "vision_encoder", backbone)  # a full CLIP preset: its vision tower
    cls = _encoder_class(family)
    if not isinstance(encoder, cls):
        raise ConfigError(
            f"model.weights={weights!r} is a {type(backbone).__name__} preset; this model needs a "
            f"{cls.__name__} (e.g. {example})"
        )
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
                raise ConfigError(
                    f"cannot resize encoder {encoder.name}: {key} is {value.shape}, needs {variable.shape}"
                )
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
    return keras.layers.Normalization(
        mean=[255.0 * m for m in spec["mean"]],
        variance=[(255.0 * s) ** 2 for s in spec["std"]],
        name=f"{family}_normalization",
    )


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


def find_encoder(model: keras.Model):
    """The nested keras-hub encoder of a kfundus CLIP/ViT classifier (None if absent)."""

    for layer in model.layers:
        if isinstance(layer, keras_hub.models.Backbone):
            return layer
    return None
