"""How RETFound is fine-tuned: label-smoothed cross-entropy and layer-wise learning-rate
decay parameter groups (RETFound's ``main_finetune.py`` and ``util/lr_decay.py``).

- **Loss**: cross-entropy with label smoothing ``train.loss_options.label_smoothing``
  (RETFound: 0.1, timm's ``LabelSmoothingCrossEntropy``, which equals Keras'
  ``CategoricalCrossentropy(label_smoothing=0.1)``: targets ``(1 - s) y + s / K``). For
  multi-label and binary tasks (sigmoids) the same smoothing is applied per label by
  ``BinaryCrossentropy(label_smoothing=s)`` (targets ``(1 - s) y + s / 2``); RETFound itself
  only fine-tunes softmax classifiers.
- **Parameter groups** (:func:`retfound_param_groups`, the Objective's ``param_groups``):
  as ``param_groups_lrd`` with ``num_layers = depth + 1``, a variable's layer id is 0 for
  the patch embedding, class token and position table, ``i + 1`` for block ``i``, and
  ``num_layers`` for everything after the blocks (``fc_norm``, the head); its learning rate
  is scaled by ``layer_decay ** (num_layers - layer_id)`` (``train.layer_decay``, applied by
  the engine). Weight decay applies to the kernels only: not to biases and LayerNorms
  (PyTorch's 1-D parameters) nor to the class token and position table (timm's
  ``no_weight_decay()``), as RETFound does.
"""

from __future__ import annotations

import keras

from kfundus.errors import ConfigError
from kfundus.objectives import Objective, default_objective
from kfundus.systems.retfound.vit import RETFoundBackbone

LABEL_SMOOTHING = 0.1
NO_WEIGHT_DECAY = ("cls_token", "pos_embed")


def find_backbone(model: keras.Model) -> RETFoundBackbone:
    """The nested RETFound encoder of a classifier."""
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, RETFoundBackbone):
            return layer
    raise ConfigError(f"model {model.name} has no RETFound encoder (layer retfound_backbone)")


def retfound_param_groups(model: keras.Model) -> dict:
    """``{variable path: (layers below the top, weight decay applies)}`` of a RETFound
    classifier: the learning-rate multiplier of a variable is ``layer_decay ** depth``.

    Args:
        model: a classifier built by ``build_retfound``.

    Returns:
        The mapping for every variable of the model (variables after the encoder: depth 0).
    """
    backbone = find_backbone(model)
    top = backbone.num_layers + 1
    groups = {}
    for layer in backbone.layers:
        layer_id = int(layer.name.split("_")[1]) + 1 if layer.name.startswith("blocks_") else 0
        for variable in layer.weights:
            groups[variable.path] = (top - layer_id, is_weight_matrix(variable))
    for variable in model.weights:
        groups.setdefault(variable.path, (0, is_weight_matrix(variable)))
    return groups


def is_weight_matrix(variable) -> bool:
    """Whether AdamW's weight decay applies: the kernels of dense, attention and convolution
    layers, what PyTorch holds as the ``ndim > 1`` weights (Keras stores the attention biases
    as ``(heads, head_dim)``, PyTorch as 1-D, so the rank alone would not do); never the class
    token or the position table (timm's ``no_weight_decay()``)."""
    name = variable.path.rsplit("/", 1)[-1]
    return name == "kernel" and name not in NO_WEIGHT_DECAY


def retfound_objective(config, manifest, train_targets) -> Objective:
    """The default objective (AUROC, accuracy, class weights) with RETFound's label-smoothed
    loss and its layer-decay parameter groups."""
    options = dict(config.train.loss_options or {})
    smoothing = float(options.pop("label_smoothing", LABEL_SMOOTHING))
    if options:
        raise ConfigError(
            f"train.loss_options: unknown key(s) {sorted(options)} for retfound; valid: ['label_smoothing']"
        )
    if not 0 <= smoothing < 1:
        raise ConfigError(
            f"train.loss_options.label_smoothing={smoothing}: use a value in [0, 1) "
            "(e.g. --set train.loss_options.label_smoothing=0.1)"
        )
    objective = default_objective(config, manifest, train_targets)
    if manifest.task == "multiclass":
        objective.loss = keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)
    elif config.train.loss == "bce":
        objective.loss = keras.losses.BinaryCrossentropy(label_smoothing=smoothing)
    elif smoothing:
        raise ConfigError(
            f"train.loss={config.train.loss} has no label smoothing; use train.loss=bce, or "
            "--set train.loss_options.label_smoothing=0"
        )
    objective.param_groups = retfound_param_groups
    return objective
