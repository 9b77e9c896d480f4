"""The optimizer and learning-rate schedule a ``train`` config section describes."""

from __future__ import annotations

import keras

from kfundus.errors import ConfigError


def make_optimizer(train, steps_per_epoch: int):
    """Adam, AdamW or SGD (Nesterov momentum 0.9) at ``train.learning_rate``, with a cosine
    schedule over ``train.epochs * steps_per_epoch`` steps (linear warm-up over
    ``train.warmup_epochs``) or a constant rate; ``train.ema`` adds Keras' weight
    averaging (``use_ema``)."""
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
    if name == "adam":
        return keras.optimizers.Adam(lr, beta_2=train.beta_2, **ema)
    if name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=train.weight_decay or 0.004, beta_2=train.beta_2, **ema)
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, **ema)
    raise ConfigError(f"train.optimizer={train.optimizer!r}: use adam, adamw or sgd")
