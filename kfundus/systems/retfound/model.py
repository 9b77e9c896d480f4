"""RETFound classifiers: a converted RETFound encoder (or a random ViT of its shape), its
ImageNet normalisation inside the model, global-average pooling + ``fc_norm``, and a
linear head, as RETFound's ``main_finetune.py`` builds them.

``model.name: retfound`` with ``model.weights``:

- a folder ``kfundus convert --from retfound CHECKPOINT --out DIR`` wrote;
- ``retfound:/path/RETFound_cfp_weights.pth`` (converted on first use into the cache);
- ``null``: random initialisation (``model.options.encoder_config`` sizes; default ViT-L/16).

The classifier takes float32 RGB in [0, 255] (the kfundus pipeline's images), normalises
with RETFound's ImageNet mean and standard deviation (layer ``retfound_normalization``),
runs the encoder (nested model ``retfound_backbone``, tokens out), pools (``pooling``) and
applies ``logits`` (Dense, initialised with a truncated normal of std 2e-5 as RETFound's
``trunc_normal_(model.head.weight, std=2e-5)``) and ``probabilities``. Grad-CAM works on the
patch-token grid (``kfundus.explain.cam.TokenGradCAM``).
"""

from __future__ import annotations

import keras

from kfundus.errors import ConfigError
from kfundus.systems.base import eye_inputs, head_logits, probability_output
from kfundus.systems.retfound.convert import IMAGENET_MEAN, IMAGENET_STD, build_parts, load_encoder, load_head
from kfundus.systems.retfound.vit import LAYER_NORM_EPSILON, POOLINGS, VIT_L16

HEADS = ("new", "checkpoint")


def retfound_normalization(name: str = "retfound_normalization") -> keras.layers.Normalization:
    """RETFound's input normalisation for [0, 255] pixels: ``(x / 255 - mean) / std``."""
    return keras.layers.Normalization(
        mean=[255.0 * m for m in IMAGENET_MEAN], variance=[(255.0 * s) ** 2 for s in IMAGENET_STD], name=name
    )


def retfound_encoder(
    weights: str | None,
    image_size: int,
    *,
    pooling: str = "avg",
    drop_path: float = 0.0,
    encoder_config: dict | None = None,
    option: str = "model.weights",
):
    """``(backbone, pooling layer, folder or None)`` for a weights value (see the module doc)."""
    if pooling not in POOLINGS:
        raise ConfigError(f"model.options.pooling={pooling!r}: use one of {list(POOLINGS)}")
    if weights is None:
        arch = {**VIT_L16, **(encoder_config or {})}
        unknown = sorted(set(arch) - set(VIT_L16))
        if unknown:
            raise ConfigError(f"model.options.encoder_config has unknown key(s) {unknown}; valid: {sorted(VIT_L16)}")
        patch = arch["patch_size"]
        if image_size % patch:
            raise ConfigError(
                f"data.image_size={image_size} is not a multiple of the patch size {patch} "
                f"(e.g. --set data.image_size={max(patch, image_size // patch * patch)})"
            )
        backbone, pool = build_parts({**arch, "image_size": image_size}, pooling, drop_path=drop_path)
        return backbone, pool, None
    if encoder_config:
        raise ConfigError(
            f"{option}={weights!r} and model.options.encoder_config are both set: the checkpoint defines the "
            "encoder; give one of them"
        )
    from kfundus.convert import resolve_converted

    folder = resolve_converted(weights, "retfound", option=option)
    config_patch = _patch_size(folder)
    if image_size % config_patch:
        raise ConfigError(f"data.image_size={image_size} is not a multiple of the encoder's patch size {config_patch}")
    backbone, pool, _ = load_encoder(folder, image_size, drop_path=drop_path, pooling=pooling)
    return backbone, pool, folder


def _patch_size(folder) -> int:
    from kfundus.systems.retfound.convert import read_folder

    return int(read_folder(folder)["architecture"]["patch_size"])


def freeze_blocks(backbone, pooling, trainable_blocks: int) -> None:
    """Train the last ``trainable_blocks`` transformer blocks (and the pooling norm); -1
    trains everything, 0 freezes the whole encoder (linear probing)."""
    depth = backbone.num_layers
    backbone.trainable = True
    for layer in backbone.layers:
        if layer.name.startswith("blocks_"):
            index = int(layer.name.split("_")[1])
            layer.trainable = trainable_blocks < 0 or index >= depth - trainable_blocks
        else:
            layer.trainable = trainable_blocks < 0
    pooling.trainable = trainable_blocks != 0


def build_retfound(
    num_outputs: int,
    *,
    image_size: int = 224,
    weights: str | None = None,
    trainable_blocks: int = -1,
    dropout: float = 0.0,
    activation: str = "softmax",
    two_eye: bool = False,
    bn_momentum: float | None = None,
    pooling: str = "avg",
    drop_path: float = 0.2,
    head: str = "new",
    encoder_config: dict | None = None,
    name: str = "retfound",
) -> keras.Model:
    """A RETFound classifier.

    Args:
        num_outputs: labels (sigmoid) or classes (softmax).
        image_size: input side in pixels (a multiple of the patch size, 16).
        weights: a converted folder, ``retfound:/path/checkpoint.pth``, or None (random).
        trainable_blocks: fine-tune the last N transformer blocks (-1: all; 0: linear probe).
        dropout: dropout before the head (RETFound: none).
        activation: ``softmax`` (multi-class) or ``sigmoid`` (multi-label, binary).
        two_eye: one shared encoder over ``left_image`` and ``right_image``, the two
            feature vectors concatenated.
        bn_momentum: unused (the ViT has no BatchNormalization); accepted for the common
            builder interface.
        pooling: ``avg`` (patch-token mean + ``fc_norm``, RETFound's fine-tuning) or ``token``.
        drop_path: stochastic-depth rate of the last block (RETFound fine-tunes ViT-L with 0.2).
        head: ``new`` (initialised as RETFound does) or ``checkpoint`` (the converted
            checkpoint's fine-tuned head; its class count must equal ``num_outputs``).
        encoder_config: sizes of a random encoder (``patch_size``, ``hidden_dim``,
            ``num_layers``, ``num_heads``, ``mlp_dim``), with ``weights: null`` only.
        name: the model's name.

    Returns:
        The classifier, outputs ``probabilities`` (float32).
    """
    del bn_momentum
    if head not in HEADS:
        raise ConfigError(f"model.options.head={head!r}: use one of {list(HEADS)}")
    if not 0 <= drop_path < 1:
        raise ConfigError(
            f"model.options.drop_path={drop_path}: use a rate in [0, 1) (e.g. --set model.options.drop_path=0.2)"
        )
    backbone, pool, folder = retfound_encoder(
        weights, image_size, pooling=pooling, drop_path=drop_path, encoder_config=encoder_config
    )
    freeze_blocks(backbone, pool, trainable_blocks)
    normalise = retfound_normalization()

    def features(x):
        return pool(backbone(normalise(x)))

    inputs, x = eye_inputs(image_size, two_eye, features)
    dense = keras.layers.Dense(  # RETFound's new head: truncated normal, std 2e-5
        num_outputs,
        name="logits",
        dtype="float32",
        kernel_initializer=keras.initializers.TruncatedNormal(stddev=2e-5),
    )
    logits = head_logits(x, num_outputs, dropout, dense)
    if head == "checkpoint":
        loaded = load_head(folder) if folder is not None else None
        if loaded is None:
            raise ConfigError(
                "model.options.head=checkpoint: the converted folder has no fine-tuned head (a pre-training "
                "checkpoint); use --set model.options.head=new"
            )
        kernel, bias = loaded
        if two_eye or kernel.shape[1] != num_outputs:
            raise ConfigError(
                f"model.options.head=checkpoint: the checkpoint's head has {kernel.shape[1]} classes, the task has "
                f"{num_outputs} output(s){' and two eyes' if two_eye else ''}; use --set model.options.head=new"
            )
        dense.set_weights([kernel, bias])
    return keras.Model(inputs, probability_output(logits, activation), name=name)


def build_retfound_features(
    weights: str | None, image_size: int, *, pooling: str = "avg", encoder_config: dict | None = None
) -> keras.Model:
    """Image (float32 RGB in [0, 255]) -> RETFound features, for the transfer study's backbones."""
    backbone, pool, _ = retfound_encoder(
        weights, image_size, pooling=pooling, encoder_config=encoder_config, option="transfer.backbones[].weights"
    )
    inputs = keras.Input((image_size, image_size, 3), name="image")
    features = pool(backbone(retfound_normalization()(inputs)))
    return keras.Model(inputs, features, name="retfound_features")


__all__ = ["LAYER_NORM_EPSILON", "build_retfound", "build_retfound_features", "freeze_blocks", "retfound_normalization"]
