"""EfficientNet-B0 classifiers (Dharsan et al.).

The backbone is Keras' ``EfficientNetB0`` nested inside the classifier as one layer named
``efficientnetb0`` (its last convolutional activation is ``top_activation``, the Grad-CAM
layer), followed by global average pooling, dropout and a dense head whose float32 output
is named ``probabilities``.

Input scaling, and the trap it avoids: Keras builds the network with an extra
``Rescaling(1/sqrt(std))`` layer after its Normalization layer *only* when
``weights="imagenet"``. Loading the very same ImageNet file by path (the offline case)
builds the network without it, so the pretrained filters silently see inputs scaled
differently from what they were trained on. kfundus folds that missing factor into the
Normalization layer's variance whenever ImageNet weights come from a local file, so the
two paths compute exactly the same function (``tests/test_models.py`` proves it). With no
pretrained weights the Normalization layer is set to the usual ImageNet mean and standard
deviation. Inputs are float32 RGB in [0, 255], as the kfundus pipeline produces them.
"""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np

from kfundus.errors import ConfigError
from kfundus.systems.efficientnet.contrast import LocalContrast

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STDDEV = [0.229, 0.224, 0.225]
BACKBONE_NAME = "efficientnetb0"
GRADCAM_LAYER = "top_activation"


def _normalization_layer(backbone: keras.Model) -> keras.layers.Normalization:
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.Normalization):
            return layer
    raise ValueError(f"{backbone.name} has no Normalization layer")


def _set_normalization(layer: keras.layers.Normalization, mean, variance) -> None:
    layer.adapt_mean.assign(np.asarray(mean, dtype="float32"))
    layer.adapt_variance.assign(np.asarray(variance, dtype="float32"))
    layer.finalize_state()


def efficientnet_b0_backbone(image_size: int = 224, weights: str | None = None) -> keras.Model:
    """EfficientNet-B0 without its top, input float32 RGB in [0, 255].

    Args:
        image_size: input side in pixels.
        weights: ``"imagenet"`` (downloaded by Keras where a network exists), the path of
            a local copy of Keras' ImageNet file ``efficientnetb0_notop.h5`` (offline
            hospitals), or None for random initialisation.
    """
    shape = (image_size, image_size, 3)
    if weights == "imagenet":
        try:
            return keras.applications.EfficientNetB0(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as exc:  # no network: say how to work offline
            raise ConfigError(
                f"could not fetch the ImageNet weights of EfficientNet-B0 ({exc.__class__.__name__}: {exc}). "
                "Offline, download efficientnetb0_notop.h5 elsewhere and set model.weights to its path "
                "(e.g. --set model.weights=/models/efficientnetb0_notop.h5), or use model.weights=null."
            ) from exc
    backbone = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=shape)
    norm = _normalization_layer(backbone)
    if weights is None:
        _set_normalization(norm, IMAGENET_MEAN, np.square(IMAGENET_STDDEV))
        return backbone
    path = Path(weights)
    if not path.exists():
        raise ConfigError(
            f"model.weights={weights!r}: no such file. Give 'imagenet', null, or the path of "
            "Keras' efficientnetb0_notop.h5 ImageNet weights."
        )
    before = backbone.get_layer("stem_conv").kernel.numpy()
    try:
        backbone.load_weights(str(path))
        if np.array_equal(before, backbone.get_layer("stem_conv").kernel.numpy()):
            raise ValueError("nothing was loaded (Keras skipped every layer)")
    except Exception as exc:
        raise ConfigError(
            f"model.weights={weights}: cannot load it into EfficientNet-B0 ({exc}). It must be Keras' "
            "ImageNet file efficientnetb0_notop.h5 (include_top=False); a kfundus run is resumed "
            "with its own checkpoint instead."
        ) from exc
    norm.finalize_state()
    # Fold the Rescaling(1/sqrt(std)) that weights="imagenet" would have added:
    # (x - m) / sqrt(v) / sqrt(s) == (x - m) / sqrt(v * s).
    variance = np.asarray(norm.adapt_variance.numpy()) * np.asarray(IMAGENET_STDDEV)
    _set_normalization(norm, norm.adapt_mean.numpy(), variance)
    return backbone


def freeze_blocks(backbone: keras.Model, trainable_blocks: int) -> None:
    """Train only the last ``trainable_blocks`` of the 7 MBConv stages (plus the top conv).

    -1 trains everything; 0 freezes the whole backbone (linear probing). Frozen
    BatchNormalization layers run in inference mode (Keras 3 semantics).
    """
    first_trainable = 8 - trainable_blocks  # stages are numbered 1..7; "top" counts as stage 8
    backbone.trainable = True
    for layer in backbone.layers:
        match = re.match(r"block(\d)", layer.name)
        stage = int(match.group(1)) if match else (8 if layer.name.startswith("top") else 0)
        layer.trainable = trainable_blocks < 0 or (trainable_blocks > 0 and stage >= first_trainable)


def build_efficientnet_b0(
    num_outputs: int,
    *,
    image_size: int = 224,
    weights: str | None = None,
    trainable_blocks: int = -1,
    dropout: float = 0.2,
    activation: str = "sigmoid",
    two_eye: bool = False,
    bn_momentum: float | None = None,
    local_contrast: bool = False,
    name: str = "efficientnet_b0",
) -> keras.Model:
    """An EfficientNet-B0 classifier.

    Args:
        num_outputs: number of labels (sigmoid) or classes (softmax).
        image_size: input side in pixels.
        weights: see ``efficientnet_b0_backbone``.
        trainable_blocks: how many of the deepest stages to fine-tune (-1: all).
        dropout: dropout before the head.
        activation: ``"sigmoid"`` (multi-label, binary) or ``"softmax"`` (multi-class).
        two_eye: one shared backbone over inputs ``left_image`` and ``right_image``, the
            two pooled feature vectors concatenated (patient-level ODIR); otherwise one
            input ``image``.
        bn_momentum: BatchNorm momentum of the backbone (None: Keras' 0.99). A very short
            from-scratch schedule may want 0.9 so the moving statistics keep up.
        local_contrast: put Ben Graham's local colour normalisation in front of the backbone
            (``kfundus.systems.efficientnet.contrast.LocalContrast``, sigma = image_size / 60), so
            SavedModel and TFLite apply it too. Off by default: ImageNet weights expect
            plain photographs.

    Example:

    >>> model = build_efficientnet_b0(3, image_size=64)
    >>> model.output_names
    ['probabilities']
    """
    backbone = efficientnet_b0_backbone(image_size, weights)
    backbone.name = BACKBONE_NAME
    if bn_momentum is not None:
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
    freeze_blocks(backbone, trainable_blocks)
    pool = keras.layers.GlobalAveragePooling2D(name="avg_pool")
    contrast = LocalContrast(image_size / 60, name="local_contrast") if local_contrast else (lambda x: x)
    shape = (image_size, image_size, 3)
    if two_eye:
        inputs = [keras.Input(shape, name="left_image"), keras.Input(shape, name="right_image")]
        features = keras.layers.Concatenate(name="patient_features")([pool(backbone(contrast(x))) for x in inputs])
    else:
        inputs = keras.Input(shape, name="image")
        features = pool(backbone(contrast(inputs)))
    x = keras.layers.Dropout(dropout, name="head_dropout")(features) if dropout else features
    logits = keras.layers.Dense(num_outputs, name="logits", dtype="float32")(x)
    outputs = keras.layers.Activation(activation, name="probabilities", dtype="float32")(logits)
    return keras.Model(inputs, outputs, name=name)
