"""The optimizer and learning-rate schedule a ``train`` config section describes, and
:class:`LayerDecayAdamW` for layer-wise learning-rate decay (``train.layer_decay``)."""

from __future__ import annotations

import keras
from keras import ops

from kfundus.errors import ConfigError


@keras.saving.register_keras_serializable(package="kfundus")
class LayerDecayAdamW(keras.optimizers.Adam):
    """AdamW with a learning-rate multiplier and a weight-decay switch per variable: the
    parameter groups of layer-wise learning-rate decay (BEiT, MAE, RETFound's
    ``util/lr_decay.py``), which Keras optimizers have no notion of.

    Each step, for a variable ``v`` with multiplier ``m`` (``lr_multipliers[v.path]``,
    default 1), at the schedule's learning rate ``lr``: ``v <- v - m lr wd v`` when weight
    decay applies to it (not in ``no_weight_decay``), then the Adam update at rate ``m lr``,
    as ``torch.optim.AdamW`` does with a parameter group's ``lr = lr_scale * lr``. Keras'
    own ``AdamW`` applies its weight decay at the unscaled rate to every variable, so the
    decay is applied here instead (the base class gets ``weight_decay=None``).

    Args:
        learning_rate: a float or a schedule (the rate of multiplier 1).
        weight_decay: decoupled weight decay (scaled by each variable's rate).
        lr_multipliers: ``{variable path: multiplier}``.
        no_weight_decay: variable paths without weight decay (biases, norms, embeddings).
        **kwargs: the rest of ``keras.optimizers.Adam``'s arguments.
    """

    def __init__(self, learning_rate=0.001, weight_decay=0.05, lr_multipliers=None, no_weight_decay=(), **kwargs):
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, weight_decay=None, **kwargs)
        self.layer_weight_decay = float(weight_decay or 0.0)
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}
        self.no_weight_decay = sorted(str(p) for p in no_weight_decay)
        self._multipliers, self._decays = [], []

    def build(self, var_list):
        super().build(var_list)
        skip = set(self.no_weight_decay)
        self._multipliers = [self.lr_multipliers.get(v.path, 1.0) for v in var_list]
        self._decays = [0.0 if v.path in skip else self.layer_weight_decay for v in var_list]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        lr = ops.multiply(ops.cast(learning_rate, variable.dtype), self._multipliers[index])
        if self._decays[index]:
            self.assign_sub(variable, ops.multiply(variable, ops.multiply(lr, self._decays[index])))
        super().update_step(gradient, variable, lr)

    def get_config(self):
        config = super().get_config()
        config.update(
            weight_decay=self.layer_weight_decay,
            lr_multipliers=self.lr_multipliers,
            no_weight_decay=self.no_weight_decay,
        )
        return config


def layer_decay_groups(train, param_groups: dict | None, model_name: str = "the model"):
    """``(lr_multipliers, no_weight_decay)`` from a system's parameter groups and
    ``train.layer_decay`` (``layer_decay ** depth`` per variable)."""
    if param_groups is None:
        raise ConfigError(
            f"train.layer_decay={train.layer_decay}: {model_name} has no layer depths for layer-wise decay "
            "(model.name=retfound has); use --set train.layer_decay=null"
        )
    multipliers = {path: float(train.layer_decay) ** depth for path, (depth, _) in param_groups.items()}
    return multipliers, sorted(path for path, (_, decay) in param_groups.items() if not decay)


def make_optimizer(train, steps_per_epoch: int, param_groups: dict | None = None):
    """Adam, AdamW or SGD (Nesterov momentum 0.9) at ``train.learning_rate``, with a cosine
    schedule over ``train.epochs * steps_per_epoch`` steps (linear warm-up over
    ``train.warmup_epochs``) or a constant rate; ``train.ema`` adds Keras' weight
    averaging (``use_ema``). With ``train.layer_decay`` (AdamW only): a
    :class:`LayerDecayAdamW` over ``param_groups`` (``{variable path: (depth, weight
    decay applies)}``, from the system's Objective)."""
    total = max(1, train.epochs * steps_per_epoch)
    warmup = int(round(train.warmup_epochs * steps_per_epoch))
    if train.schedule == "cosine":
        if warmup:
            lr = keras.optimizers.schedules.CosineDecay(
                0.0, max(1, total - warmup), warmup_target=train.learning_rate, warmup_steps=warmup
            )
        else:
            lr = keras.optimizers.schedules.CosineDecay(train.learning_rate, total)
    elif train.schedule == "constant":
        lr = train.learning_rate
    else:
        raise ConfigError(f"train.schedule={train.schedule!r}: use 'cosine' or 'constant'")
    name = train.optimizer.lower()
    ema = {"use_ema": True, "ema_momentum": train.ema} if train.ema is not None else {}
    layer_decay = getattr(train, "layer_decay", None)
    if layer_decay is not None:
        if name != "adamw":
            raise ConfigError(
                f"train.layer_decay is applied by AdamW; train.optimizer={train.optimizer!r} "
                "(use --set train.optimizer=adamw, or --set train.layer_decay=null)"
            )
        multipliers, no_decay = layer_decay_groups(train, param_groups)
        return LayerDecayAdamW(
            lr,
            weight_decay=train.weight_decay,
            lr_multipliers=multipliers,
            no_weight_decay=no_decay,
            beta_2=train.beta_2,
            **ema,
        )
    if name == "adam":
        return keras.optimizers.Adam(lr, beta_2=train.beta_2, **ema)
    if name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=train.weight_decay or 0.004, beta_2=train.beta_2, **ema)
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, **ema)
    raise ConfigError(f"train.optimizer={train.optimizer!r}: use adam, adamw or sgd")
