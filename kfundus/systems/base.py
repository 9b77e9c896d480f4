"""What a system is: one published method, as kfundus plugs it in.

A :class:`System` names a model builder, the objective that trains it (None: the default
single-output objective, ``kfundus.objectives.default_objective``), the shipped configs
that reproduce the published setup, and the paper. Each ``kfundus.systems.<family>``
package defines its systems; ``kfundus.systems.SYSTEMS`` collects them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

from kfundus.errors import ConfigError

# Builder arguments every classifier builder takes, set from ModelConfig fields (not options).
COMMON_ARGUMENTS = {"image_size", "weights", "trainable_blocks", "dropout", "activation", "two_eye", "bn_momentum"}


@dataclasses.dataclass(frozen=True)
class System:
    """One published system.

    Attributes:
        name: the ``model.name`` that selects it.
        build: the model builder. Classifiers: ``build(num_outputs, *, image_size,
            weights, trainable_blocks, dropout, activation, two_eye, bn_momentum,
            **options)``; pre-training models take their own arguments.
        objective: ``(config, manifest, train_targets) -> Objective`` (None: the default).
        workflow: the command that trains it (``train`` or ``pretrain``).
        configs: shipped config names that reproduce the published setup.
        paper: the publication it implements.
    """

    name: str
    build: Callable
    objective: Callable | None = None
    workflow: str = "train"
    configs: tuple = ()
    paper: str = ""


def check_options(fn, options: dict, where: str, skip=COMMON_ARGUMENTS) -> None:
    """Raise a ConfigError naming ``where`` if ``options`` has keys ``fn`` does not take (or
    keys the ModelConfig fields already set), listing the valid ones."""
    params = inspect.signature(fn).parameters
    valid = sorted(
        n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in skip
    )
    first = next(iter(params))
    valid = [n for n in valid if n != first or params[first].kind == inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; valid: {valid}")


def eye_inputs(image_size: int, two_eye: bool, feature: Callable):
    """A classifier's image input(s) and their feature: one ``image`` input, or
    ``left_image`` and ``right_image`` through the same ``feature`` (shared weights), their
    features concatenated as ``patient_features``. Returns ``(inputs, features)``."""
    import keras

    shape = (image_size, image_size, 3)
    if two_eye:
        inputs = [keras.Input(shape, name="left_image"), keras.Input(shape, name="right_image")]
        return inputs, keras.layers.Concatenate(name="patient_features")([feature(i) for i in inputs])
    inputs = keras.Input(shape, name="image")
    return inputs, feature(inputs)


def head_logits(features, num_outputs: int, dropout: float, dense=None):
    """Dropout (when > 0), then the ``logits`` Dense layer (float32: mixed-precision models
    keep their outputs float32); ``dense`` replaces the default layer (e.g. another
    initializer)."""
    import keras

    if dropout:
        features = keras.layers.Dropout(dropout, name="head_dropout")(features)
    dense = dense or keras.layers.Dense(num_outputs, name="logits", dtype="float32")
    return dense(features)


def probability_output(logits, activation: str):
    """The ``probabilities`` output (float32) of a classifier's logits."""
    import keras

    return keras.layers.Activation(activation, name="probabilities", dtype="float32")(logits)
