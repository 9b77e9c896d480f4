"""FLAIR in Keras: the vision and text towers of the released model, and a classifier on its
vision encoder (Silva-Rodríguez et al., Medical Image Analysis 2025; code and weights
Apache-2.0, github.com/jusiro/FLAIR).

The released model (``flair/modeling/model.py``)::

    image ─ /255 ─ ResNet-50 (torchvision, fc removed) ─ global average pool ─ f (2048)
          ─ f/|f| ─ Linear 2048->512, no bias ─ /|.| ─ image embedding
    tokens ─ Bio_ClinicalBERT ─ hidden_states[1], [2], [-1]: each averaged over the tokens,
           padding included; the three averaged ─ t (768)
          ─ t/|t| ─ Linear 768->512, no bias ─ /|.| ─ text embedding
    logits = exp(clamp(logit_scale, 0, ln 100)) * image_embedding @ text_embeddings^T

The ResNet-50 is keras-hub's ``ResNetBackbone`` (v1.5 bottleneck: the stride sits on the 3x3
convolution, as in torchvision; keras-hub pads explicitly so that strided convolutions and the
max pool see the same pixels as PyTorch's). The text encoder is a keras-hub ``BertBackbone``
with BERT's exact GELU (:class:`kfundus.convert.bert.ExactGeluBertBackbone`). FLAIR feeds the
ResNet images scaled to [0, 1] with **no ImageNet mean/std normalisation** (its
``preprocess_image`` and its data loaders divide by 255 and nothing else); kfundus models take
float32 RGB in [0, 255], so the vision tower starts with ``Rescaling(1/255)``.

Text features replicate FLAIR exactly, including its mean over *all* token positions: the
padding positions count, so a prompt's embedding depends on how far it was padded. FLAIR pads
each batch to its longest prompt (``padding=True``, at most 77 tokens) and kfundus' zero-shot
does the same (:mod:`kfundus.systems.flair.zero_shot`).

``build_flair_classifier`` (``model.name: flair``) puts a dense head on the vision encoder:
the 2048-d pooled ResNet feature (``features: encoder``, what FLAIR's linear probe reads,
``--project_features False``) or the 512-d unit image embedding (``features: projection``).
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import keras_hub
from keras import ops

from kfundus.errors import ConfigError, DataError
from kfundus.systems.base import eye_inputs, head_logits, probability_output

IMAGE_SIZE = 512
CAPTION = "A fundus photograph of [CLS]"
MAX_TOKENS = 77
PROJ_DIM = 512
# torchvision resnet50, as keras-hub ResNetBackbone arguments
RESNET50 = {
    "stackwise_num_filters": [64, 128, 256, 512],
    "stackwise_num_blocks": [3, 4, 6, 3],
    "stackwise_num_strides": [1, 2, 2, 2],
    "block_type": "bottleneck_block",
    "use_pre_activation": False,
    "input_conv_filters": [64],
    "input_conv_kernel_sizes": [7],
}
VISION_FILE = "vision.keras"
TEXT_FILE = "text.keras"
CONFIG_FILE = "flair.json"
TOKENIZER_DIR = "tokenizer"
BACKBONE_NAME = "resnet"


@keras.saving.register_keras_serializable(package="kfundus")
class FlairTextPooling(keras.layers.Layer):
    """FLAIR's text feature: each hidden state averaged over every token position (padding
    included, as FLAIR does), then the states averaged. Called on a list of ``(B, L, D)``."""

    def call(self, hidden_states):
        return ops.mean(ops.stack([ops.mean(h, axis=1) for h in hidden_states], axis=0), axis=0)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], input_shape[0][-1])


def flair_resnet(resnet_config: dict | None = None, name: str = BACKBONE_NAME):
    """A randomly initialised keras-hub ``ResNetBackbone`` (torchvision ResNet-50 unless
    ``resnet_config`` says otherwise), for any input size."""
    config = {**RESNET50, **(resnet_config or {})}
    try:
        return keras_hub.models.ResNetBackbone(**config, image_shape=(None, None, 3), name=name)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"ResNet sizes {resnet_config}: {exc}") from exc


def build_flair_vision(backbone=None, *, image_size: int = IMAGE_SIZE, proj_dim: int | None = PROJ_DIM) -> keras.Model:
    """The FLAIR vision tower: ``image`` (float32 RGB in [0, 255]) -> ``{"features": the pooled
    ResNet feature, "embedding": the unit 512-d image embedding}`` (no ``embedding`` when
    ``proj_dim`` is None: an encoder without FLAIR's projection, e.g. ImageNet weights)."""
    backbone = backbone if backbone is not None else flair_resnet()
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="flair_scaling")(inputs)
    features = keras.layers.GlobalAveragePooling2D(name="vision_features")(backbone(x))
    outputs = {"features": features}
    if proj_dim:
        unit = keras.layers.UnitNormalization(name="vision_features_unit")(features)
        z = keras.layers.Dense(int(proj_dim), use_bias=False, name="vision_projection")(unit)
        outputs["embedding"] = keras.layers.UnitNormalization(name="image_embedding")(z)
    return keras.Model(inputs, outputs, name="flair_vision")


def build_flair_text(bert_backbone, *, proj_dim: int = PROJ_DIM) -> keras.Model:
    """The FLAIR text tower: ``{token_ids, padding_mask}`` (any length) -> ``{"features": FLAIR's
    768-d text feature, "embedding": the unit 512-d text embedding}``."""
    from kfundus.convert.bert import ZeroSegments, hidden_states_model

    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    states = hidden_states_model(bert_backbone)(
        {
            "token_ids": token_ids,
            "segment_ids": ZeroSegments(name="segment_ids")(token_ids),
            "padding_mask": padding_mask,
        }
    )
    features = FlairTextPooling(name="text_features")([states[1], states[2], states[-1]])
    unit = keras.layers.UnitNormalization(name="text_features_unit")(features)
    z = keras.layers.Dense(int(proj_dim), use_bias=False, name="text_projection")(unit)
    embedding = keras.layers.UnitNormalization(name="text_embedding")(z)
    return keras.Model([token_ids, padding_mask], {"features": features, "embedding": embedding}, name="flair_text")


# ---------------------------------------------------------------------------
# a converted folder


def flair_folder(weights) -> Path:
    """The converted FLAIR folder ``model.weights`` names: a folder ``kfundus convert --from flair``
    wrote, or ``flair:/path/flair_resnet.pth`` (converted on first use into the cache)."""
    from kfundus.convert import resolve_converted

    return resolve_converted(weights, "flair")


def read_flair_config(folder) -> dict:
    """``flair.json`` of a converted FLAIR folder (ConfigError naming the fix when absent)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"model.weights={str(folder)!r} is not a converted FLAIR folder (no {CONFIG_FILE}): convert the "
            "released checkpoint first (kfundus convert --from flair flair_resnet.pth --out DIR) and set "
            "model.weights to DIR"
        )
    return json.loads(path.read_text())


def load_flair_vision(folder) -> keras.Model:
    """The converted vision tower (``vision.keras``) of a FLAIR folder."""
    read_flair_config(folder)
    try:
        return keras.saving.load_model(Path(folder) / VISION_FILE)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {Path(folder) / VISION_FILE} ({exc}); convert the checkpoint again") from exc


def load_flair_text(folder):
    """``(text tower, tokenizer)`` of a converted FLAIR folder.

    Raises:
        ConfigError: the folder was converted without the text encoder or its vocabulary.
    """
    from kfundus.text import make_tokenizer

    config = read_flair_config(folder)
    if not config.get("text"):
        raise ConfigError(
            f"{folder} holds no FLAIR text encoder (the checkpoint had none: {config.get('source_kind')}); "
            "zero-shot needs the released FLAIR checkpoint"
        )
    if not config.get("tokenizer"):
        raise ConfigError(
            f"{folder} has no tokenizer: convert again with the text encoder's vocabulary, "
            "kfundus convert --from flair CHECKPOINT --out DIR --set vocab=/models/Bio_ClinicalBERT/vocab.txt"
        )
    text = keras.saving.load_model(Path(folder) / TEXT_FILE)
    return text, make_tokenizer(str(Path(folder) / TOKENIZER_DIR))


# ---------------------------------------------------------------------------
# classifier


def _stage_of(layer_name: str) -> int | None:
    import re

    match = re.match(r"stack(\d+)_", layer_name)
    return int(match.group(1)) if match else None


def _freeze(backbone, trainable_blocks: int) -> None:
    """-1: train the whole ResNet; 0: freeze it (linear probe); N: the last N of its 4 stages."""
    backbone.trainable = trainable_blocks != 0
    if trainable_blocks <= 0:
        return
    stages = len(backbone.stackwise_num_filters)
    for layer in backbone.layers:
        stage = _stage_of(layer.name)
        layer.trainable = stage is not None and stage >= stages - trainable_blocks


def flair_parts(weights: str | None, *, features: str = "encoder", resnet_config: dict | None = None):
    """``(ResNet backbone, FLAIR projection layer or None)`` from a converted folder (or
    ``flair:PATH``), or a random FLAIR-architecture ResNet (``weights`` None)."""
    if features not in ("encoder", "projection"):
        raise ConfigError(f"model.options.features={features!r}: use 'encoder' or 'projection'")
    if weights is None:
        if features == "projection":
            raise ConfigError("model.options.features=projection needs converted FLAIR weights (model.weights: DIR)")
        return flair_resnet(resnet_config), None
    if resnet_config:
        raise ConfigError("model.weights and model.options.resnet_config are both set: give one of them")
    loaded = load_flair_vision(flair_folder(weights))
    projection = loaded.get_layer("vision_projection") if "embedding" in loaded.output else None
    if features == "projection" and projection is None:
        raise ConfigError(
            f"model.options.features=projection: {weights} has no FLAIR projection head (an ImageNet "
            "ResNet-50?); use features=encoder"
        )
    return loaded.get_layer(BACKBONE_NAME), projection if features == "projection" else None


def flair_feature_fn(backbone, projection=None):
    """A function ``x -> FLAIR feature`` (images float32 RGB [0, 255]): ``/255``, the ResNet,
    global average pooling and, with ``projection``, FLAIR's L2 / Linear / L2 head. Its layers
    are created once, so calling it on both eyes shares them."""
    scaled = keras.layers.Rescaling(1.0 / 255.0, name="flair_scaling")
    pool = keras.layers.GlobalAveragePooling2D(name="vision_features")
    unit_in = keras.layers.UnitNormalization(name="vision_features_unit")
    unit_out = keras.layers.UnitNormalization(name="image_embedding")

    def apply(x):
        f = pool(backbone(scaled(x)))
        return f if projection is None else unit_out(projection(unit_in(f)))

    return apply


def flair_extractor(
    weights: str | None,
    image_size: int,
    *,
    features: str = "encoder",
    resnet_config: dict | None = None,
    name: str = "flair_features",
) -> keras.Model:
    """``image`` (float32 RGB [0, 255]) -> one feature vector per image, from a converted FLAIR
    (or torchvision ResNet) folder, or a random FLAIR-architecture ResNet (``weights`` None).

    Args:
        weights: a folder ``kfundus convert --from flair`` wrote, ``flair:/path/flair_resnet.pth``
            (converted on first use), or None (random).
        image_size: input side (FLAIR: 512).
        features: ``"encoder"`` (the pooled ResNet feature) or ``"projection"`` (the unit
            512-d image embedding; needs the FLAIR projection).
        resnet_config: ResNet sizes for a random encoder (default ResNet-50).
        name: the model's name.
    """
    backbone, projection = flair_parts(weights, features=features, resnet_config=resnet_config)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    return keras.Model(inputs, flair_feature_fn(backbone, projection)(inputs), name=name)


def build_flair_classifier(
    num_outputs: int,
    *,
    image_size: int = IMAGE_SIZE,
    weights: str | None = None,
    trainable_blocks: int = -1,
    dropout: float = 0.0,
    activation: str = "sigmoid",
    two_eye: bool = False,
    bn_momentum: float | None = None,
    features: str = "encoder",
    resnet_config: dict | None = None,
) -> keras.Model:
    """A classifier on the FLAIR vision encoder (``model.name: flair``).

    Args:
        num_outputs: number of labels.
        image_size: input side in pixels (FLAIR: 512).
        weights: a converted FLAIR folder (``kfundus convert --from flair``; a torchvision
            ImageNet ResNet-50 converted the same way gives the architecture-matched ImageNet
            start), or None for a random FLAIR-architecture ResNet-50.
        trainable_blocks: -1 all of the ResNet, 0 none (linear probe), N the last N stages.
        dropout: dropout before the dense head (FLAIR uses none).
        activation: ``sigmoid`` (multi-label, binary) or ``softmax`` (multi-class).
        two_eye: inputs ``left_image`` and ``right_image`` through one shared encoder,
            features concatenated; otherwise one input ``image``.
        bn_momentum: BatchNorm momentum while fine-tuning (Keras convention; PyTorch's
            default 0.1 is Keras' 0.9); None keeps the backbone's.
        features: ``encoder`` (pooled ResNet feature) or ``projection`` (512-d embedding).
        resnet_config: ResNet sizes for a random encoder (tests).

    Returns:
        A Keras model with one float32 output, ``probabilities``.
    """
    backbone, projection = flair_parts(weights, features=features, resnet_config=resnet_config)
    _freeze(backbone, int(trainable_blocks))
    if bn_momentum is not None:
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = float(bn_momentum)
    feature = flair_feature_fn(backbone, projection)  # the ResNet directly in the model: Grad-CAM reads it
    inputs, x = eye_inputs(image_size, two_eye, feature)
    outputs = probability_output(head_logits(x, num_outputs, dropout), activation)
    return keras.Model(inputs, outputs, name="flair")
