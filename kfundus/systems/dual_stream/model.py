"""Dual-stream SeparableConv2D / Conv2D multi-task network (Kaloi et al., iCoMET 2023).

Two streams read the same normalised image: one of ``SeparableConv2D`` blocks (depthwise
then pointwise: cheap, many channels), one of plain ``Conv2D`` blocks. Block ``i`` of
either stream has ``width * 2**i`` filters, ``convs_per_block`` convolutions (3x3, no
bias, BatchNorm, ReLU) and a 2x2 max-pool. Each stream ends in global average pooling;
the two feature vectors are **fused by concatenation** (``fusion="concat"``, the default;
``"add"`` sums them instead: both have ``width * 2**(depth-1)`` features). After dropout,
one named head per task:

- the primary head, named ``primary_head`` (e.g. ``dr_grade``, ``oct_class``), over the
  dataset's classes (softmax) or labels (sigmoid): this is ``Objective.primary``;
- with ``normal_class`` set, a sigmoid head ``abnormal`` (normal vs abnormal: TF1, TO2).

Each head is a float32 ``Dense`` named ``<head>_logits`` followed by an ``Activation``
named ``<head>``, so Grad-CAM finds the logits and the exports carry the head names. The
model returns a dict ``{head: probabilities}``.

Normalisation lives inside the model (a fixed ``Normalization`` layer), so SavedModel and
TFLite take the pipeline's float32 RGB in [0, 255]:

- ``"fundus"``: per-channel mean (105, 72, 48) and std (67, 51, 40), measured on
  fundus-cropped EyePACS and ODIR photographs at 96 px (black border included);
- ``"oct"``: greyscale B-scans (the pipeline replicates grey into R = G = B): mean 51,
  std 51 in every channel (0.2 x 255: a scale choice for dark B-scans, not a measured
  statistic);
- ``{"mean": [...], "std": [...]}``: your own, one value or one per channel.

Example:

>>> model = build_dual_stream(5, image_size=64, depth=3, width=8, primary_head="dr_grade",
...                           normal_class="no_dr")
>>> sorted(model.output_names)
['abnormal', 'dr_grade']
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from kfundus.errors import ConfigError

NORMALIZATIONS = {
    "fundus": ([105.0, 72.0, 48.0], [67.0, 51.0, 40.0]),
    "oct": ([51.0] * 3, [51.0] * 3),
}
STREAMS = ("both", "separable", "conv")
FUSIONS = ("concat", "add")
ABNORMAL_HEAD = "abnormal"


def _normalization(normalization) -> keras.layers.Normalization:
    if isinstance(normalization, str):
        if normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"model.options.normalization={normalization!r}: use one of "
                f"{sorted(NORMALIZATIONS)} or {{mean: [...], std: [...]}}"
            )
        mean, std = NORMALIZATIONS[normalization]
    elif isinstance(normalization, dict) and set(normalization) == {"mean", "std"}:
        mean, std = normalization["mean"], normalization["std"]
    else:
        raise ConfigError(
            f"model.options.normalization={normalization!r}: use 'fundus', 'oct' or "
            "{mean: [...], std: [...]} (pixel values in [0, 255])"
        )
    mean = np.broadcast_to(np.asarray(mean, dtype="float32"), (3,))
    std = np.broadcast_to(np.asarray(std, dtype="float32"), (3,))
    if not np.all(std > 0):
        raise ConfigError(f"model.options.normalization: std must be positive, got {std.tolist()}")
    return keras.layers.Normalization(mean=mean.tolist(), variance=np.square(std).tolist(), name="normalize")


def _stream(x, kind: str, depth: int, width: int, convs_per_block: int, bn_momentum: float):
    conv = keras.layers.SeparableConv2D if kind == "separable" else keras.layers.Conv2D
    prefix = "sep" if kind == "separable" else "conv"
    for i in range(depth):
        filters = width * 2**i
        for j in range(convs_per_block):
            name = f"{prefix}_block{i + 1}_conv{j + 1}"
            x = conv(filters, 3, padding="same", use_bias=False, name=name)(x)
            x = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
            x = keras.layers.Activation("relu", name=f"{name}_relu")(x)
        x = keras.layers.MaxPooling2D(2, name=f"{prefix}_block{i + 1}_pool")(x)
    return keras.layers.GlobalAveragePooling2D(name=f"{prefix}_pool")(x)


def _freeze(model: keras.Model, depth: int, trainable_blocks: int) -> None:
    """Train only the last ``trainable_blocks`` blocks of each stream (-1: everything)."""
    if trainable_blocks < 0:
        return
    for layer in model.layers:
        for prefix in ("sep_block", "conv_block"):
            if layer.name.startswith(prefix):
                block = int(layer.name[len(prefix) :].split("_")[0])
                layer.trainable = block > depth - trainable_blocks


def build_dual_stream(
    num_outputs: int,
    *,
    image_size: int = 224,
    weights: str | None = None,
    trainable_blocks: int = -1,
    dropout: float = 0.3,
    activation: str = "softmax",
    two_eye: bool = False,
    bn_momentum: float | None = None,
    depth: int = 4,
    width: int = 32,
    convs_per_block: int = 2,
    streams: str = "both",
    fusion: str = "concat",
    normalization="fundus",
    primary_head: str = "classes",
    normal_class: str | None = None,
    name: str = "dual_stream",
) -> keras.Model:
    """A dual-stream (SeparableConv2D + Conv2D) multi-task classifier, from scratch.

    Args:
        num_outputs: units of the primary head (the dataset's classes or labels).
        image_size: input side in pixels; input ``image``, float32 RGB in [0, 255].
        weights: None (random initialisation), or a ``.weights.h5`` file saved from a
            model built with the same options.
        trainable_blocks: fine-tune only the last N blocks of each stream (-1: all).
        dropout: dropout on the fused features.
        activation: of the primary head: ``"softmax"`` or ``"sigmoid"``.
        two_eye: not supported (one image per row).
        bn_momentum: BatchNorm momentum (None: Keras' 0.99).
        depth: blocks per stream (each halves the resolution).
        width: filters of the first block (doubling every block).
        convs_per_block: convolutions per block.
        streams: ``"both"`` (the method), or one stream alone, ``"separable"`` or
            ``"conv"`` (ablations; pick ``width`` for an equal parameter budget with
            ``count_params``).
        fusion: ``"concat"`` or ``"add"`` of the two pooled feature vectors.
        normalization: ``"fundus"``, ``"oct"`` or ``{"mean": ..., "std": ...}`` (see
            the module docstring).
        primary_head: name of the head over the dataset's classes (the run's
            ``Objective.primary``).
        normal_class: the class meaning "normal" (``no_dr``, ``NORMAL``); when set, the
            model gets a second head ``abnormal`` (sigmoid). The objective checks the
            class exists.
        name: model name.

    Example:

    >>> model = build_dual_stream(4, image_size=64, depth=2, width=8, normalization="oct",
    ...                           primary_head="oct_class", normal_class="NORMAL")
    >>> {k: v.shape for k, v in model(np.zeros((1, 64, 64, 3))).items()}  # doctest: +SKIP
    {'oct_class': (1, 4), 'abnormal': (1, 1)}
    """
    if two_eye:
        raise ConfigError(
            "model dual_stream reads one image per row; use an eye-level dataset "
            "(data.options.level: eye), not patient-level pairs"
        )
    for option, value, valid in (("streams", streams, STREAMS), ("fusion", fusion, FUSIONS)):
        if value not in valid:
            raise ConfigError(f"model.options.{option}={value!r}: use one of {list(valid)}")
    if not (isinstance(depth, int) and depth >= 1 and image_size // 2**depth >= 1):
        raise ConfigError(
            f"model.options.depth={depth!r}: need an int >= 1 with image_size / 2**depth >= 1 (image_size {image_size})"
        )
    if not (isinstance(width, int) and width >= 1 and isinstance(convs_per_block, int) and convs_per_block >= 1):
        raise ConfigError(f"model.options width={width!r}, convs_per_block={convs_per_block!r}: positive ints")
    if primary_head == ABNORMAL_HEAD and normal_class:
        raise ConfigError(
            f"model.options.primary_head cannot be {ABNORMAL_HEAD!r}, the name of the normal-vs-abnormal head"
        )
    momentum = 0.99 if bn_momentum is None else bn_momentum

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = _normalization(normalization)(inputs)
    kinds = ["separable", "conv"] if streams == "both" else [streams]
    features = [_stream(x, kind, depth, width, convs_per_block, momentum) for kind in kinds]
    if len(features) == 1:
        fused = features[0]
    elif fusion == "concat":
        fused = keras.layers.Concatenate(name="fusion")(features)
    else:
        fused = keras.layers.Add(name="fusion")(features)
    if dropout:
        fused = keras.layers.Dropout(dropout, name="head_dropout")(fused)
    heads = {primary_head: (num_outputs, activation)}
    if normal_class:
        heads[ABNORMAL_HEAD] = (1, "sigmoid")
    outputs = {}
    for head, (units, act) in heads.items():
        logits = keras.layers.Dense(units, name=f"{head}_logits", dtype="float32")(fused)
        outputs[head] = keras.layers.Activation(act, name=head, dtype="float32")(logits)
    model = keras.Model(inputs, outputs, name=name)
    _freeze(model, depth, trainable_blocks)
    if weights is not None:
        path = Path(weights)
        if not path.name.endswith(".weights.h5") or not path.exists():
            raise ConfigError(
                f"model.weights={weights!r}: dual_stream trains from scratch (null), or loads "
                "an existing .weights.h5 file saved from a model with the same options"
            )
        try:
            model.load_weights(str(path))
        except Exception as exc:
            raise ConfigError(
                f"model.weights={weights}: cannot load it ({exc}); it must come from a "
                "dual_stream model built with the same options"
            ) from exc
    return model
