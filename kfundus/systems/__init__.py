"""Model builders, one file per family. ``build_model`` picks one from a ModelConfig."""

from __future__ import annotations

from kfundus.errors import ConfigError
from kfundus.models.dual_stream import build_dual_stream
from kfundus.models.efficientnet import build_efficientnet_b0
from kfundus.models.clip_lora import build_clip_lora, build_vit, shadow_objective
from kfundus.models import retclip  # noqa: F401 - registers RET-CLIP's layers and loss for load_model
from kfundus import multitask  # noqa: F401 - registers the dual-stream QWK metric and WLSR loss for load_model

BUILDERS = {"efficientnet_b0": build_efficientnet_b0}
BUILDERS["clip_lora"] = build_clip_lora  # CLIP vision encoder + LoRA (SPECS.md section 1)
BUILDERS["vit"] = build_vit  # keras-hub ViT baseline, same head and loss
BUILDERS["dual_stream"] = build_dual_stream

# model.name -> fn(config, manifest, train_targets) -> kfundus.training.Objective, for models
# whose loss, metrics or targets differ from one output over the labels (multi-task heads,
# an embedding output for a metric-learning loss). Absent: kfundus.training.default_objective.
OBJECTIVES = {}
OBJECTIVES["clip_lora"] = shadow_objective  # BCE + lambda * Shadow loss
OBJECTIVES["vit"] = shadow_objective


def _dual_stream_objective(config, manifest, train_targets):
    from kfundus.multitask import dual_stream_objective

    return dual_stream_objective(config, manifest, train_targets)


OBJECTIVES["dual_stream"] = _dual_stream_objective


def build_model(config, *, num_outputs: int, image_size: int, task: str, two_eye: bool = False):
    """Build the classifier a ``kfundus.config.ModelConfig`` names.

    ``task`` "multiclass" gets a softmax head, "multilabel" and "binary" sigmoids.
    """
    if config.name not in BUILDERS:
        raise ConfigError(f"model.name={config.name!r} is unknown; available: {sorted(BUILDERS)}")
    builder = BUILDERS[config.name]
    options = dict(getattr(config, "options", None) or {})
    check_options(builder, options, f"model.options of {config.name}")
    return builder(
        num_outputs,
        image_size=image_size,
        weights=config.weights,
        trainable_blocks=config.trainable_blocks,
        dropout=config.dropout,
        activation="softmax" if task == "multiclass" else "sigmoid",
        two_eye=two_eye,
        bn_momentum=config.bn_momentum,
        **options,
    )


_COMMON = {"image_size", "weights", "trainable_blocks", "dropout", "activation", "two_eye", "bn_momentum"}


def check_options(fn, options: dict, where: str) -> None:
    """Raise a ConfigError naming ``where`` if ``options`` has keys ``fn`` does not take
    (or that the common ModelConfig fields already set)."""
    import inspect

    params = inspect.signature(fn).parameters
    valid = sorted(n for n, p in params.items()
                   if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in _COMMON)
    valid = [n for n in valid if n != next(iter(params))]  # not the first positional (outputs)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; valid: {valid}")


def load_model(path, **kwargs):
    """``keras.saving.load_model`` with every kfundus model family's classes registered
    (importing this package registers them: custom layers, losses, keras-hub encoders).
    Use it wherever a saved kfundus model is read."""
    import keras

    return keras.saving.load_model(path, **kwargs)
