"""CLIP (and ViT) vision encoders fine-tuned with LoRA, for multi-label fundus
classification with BCE + Shadow loss (Valizadeh & Moazzami).

The model::

    left_image ─┐                                           ┌─ logits ─ sigmoid ─▶ probabilities
                ├─ normalise ─ encoder (shared, LoRA) ─ CLS ─┤  (one unit per label)
    right_image ┘     (CLIP mean/std)                concat ─┴──────────────────▶ embedding

Inputs are float32 RGB in [0, 255] (the kfundus pipeline); the CLIP (or ViT) input
normalisation is a layer inside the model, so the exported SavedModel / TFLite take the
same input. The per-eye variant (``two_eye=False``) has one input ``image``. Outputs:
``probabilities`` (sigmoid over the labels) and ``embedding`` (the fused features, what the
Shadow loss reads, L2-normalising them first; the output itself is not normalised);
``kfundus.systems.clip_lora.objective`` trains them with ``BCE + lambda * Shadow``. The
encoder (``model.weights``) is loaded by ``kfundus.systems.clip_lora.encoders.load_encoder``.

Choices where the paper leaves room: the image feature is the encoder's class token after
its final layer norm (CLIP's pooled output, before CLIP's text-alignment projection); the
two eyes' features are concatenated (laterality kept) and that concatenation is the Shadow
loss embedding; LoRA on query and value by default (rank 8, alpha 16), everything else in
the encoder frozen, biases included; ``lora_rank: 0`` fine-tunes the last
``trainable_blocks`` transformer blocks instead (-1: all; the ViT baseline's full
fine-tuning).
"""

from __future__ import annotations

import keras

from kfundus.errors import ConfigError
from kfundus.systems.clip_lora.encoders import ENCODER_NAME, input_normalization, load_encoder, token_pooling
from kfundus.systems.clip_lora.lora import apply_lora, parameter_summary


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
    final_norm = [
        x for x in layers if re.search(r"(^|[^e]_)layer_norm$|^ln$", x.name) and "block" not in (x.path or "")
    ]
    for layer in layers:
        layer.trainable = False
    for layer in blocks[max(0, len(blocks) - trainable_blocks) :] + final_norm[-1:]:
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
        lora_targets: layer-name patterns (``kfundus.systems.clip_lora.lora.TARGET_ALIASES``: query, key,
            value, attention_output, attention, mlp; or regular expressions).
        lora_per_head: keep Keras' per-head factorisation of the query / key / value
            projections (``heads`` times the parameters; see ``kfundus.systems.clip_lora.lora``) instead of
            the paper's rank-r update of the ``hidden x hidden`` matrix.
        pooling: ``"cls"`` or ``"mean"`` (see ``token_pooling``).

    Example:

    >>> model = build_transformer_classifier(8, image_size=32, two_eye=True,
    ...     encoder_config=dict(patch_size=8, hidden_dim=32, num_layers=2, num_heads=2, intermediate_dim=64))
    ... # doctest: +SKIP
    >>> sorted(model.output)  # doctest: +SKIP
    ['embedding', 'probabilities']
    """
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
    print(
        f"{model.name}: {counts['trainable']:,} trainable of {counts['total']:,} parameters "
        f"({100 * counts['share']:.2f} %)"
        + (f"; LoRA rank {lora_rank}, alpha {lora_alpha}, on {list(lora_targets)}" if int(lora_rank) > 0 else "")
    )
    return model


def build_clip_lora(
    num_outputs: int,
    *,
    image_size=224,
    weights=None,
    trainable_blocks=-1,
    dropout=0.1,
    activation="sigmoid",
    two_eye=False,
    bn_momentum=None,
    encoder_config=None,
    lora_rank=8,
    lora_alpha=16,
    lora_targets=("query", "value"),
    lora_per_head=False,
    pooling="cls",
):
    """CLIP vision encoder + LoRA (``model.name: clip_lora``); see ``build_transformer_classifier``."""
    return build_transformer_classifier(
        num_outputs,
        family="clip",
        image_size=image_size,
        weights=weights,
        trainable_blocks=trainable_blocks,
        dropout=dropout,
        activation=activation,
        two_eye=two_eye,
        bn_momentum=bn_momentum,
        encoder_config=encoder_config,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
        lora_per_head=lora_per_head,
        pooling=pooling,
        name="clip_lora",
    )


def build_vit(
    num_outputs: int,
    *,
    image_size=224,
    weights=None,
    trainable_blocks=-1,
    dropout=0.1,
    activation="sigmoid",
    two_eye=False,
    bn_momentum=None,
    encoder_config=None,
    lora_rank=8,
    lora_alpha=16,
    lora_targets=("query", "value"),
    lora_per_head=False,
    pooling="cls",
):
    """keras-hub ViT baseline (``model.name: vit``), same head, LoRA and loss as ``clip_lora``;
    ``lora_rank: 0`` for plain fine-tuning."""
    return build_transformer_classifier(
        num_outputs,
        family="vit",
        image_size=image_size,
        weights=weights,
        trainable_blocks=trainable_blocks,
        dropout=dropout,
        activation=activation,
        two_eye=two_eye,
        bn_momentum=bn_momentum,
        encoder_config=encoder_config,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
        lora_per_head=lora_per_head,
        pooling=pooling,
        name="vit",
    )
