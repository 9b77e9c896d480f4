"""The published systems kfundus implements, one folder each (keras-hub style): its model
builder, its objective (losses, metrics, targets) and its shipped configs.

- ``efficientnet``: EfficientNet-B0 transfer learning with Grad-CAM (``efficientnet_b0``);
- ``clip_lora``: CLIP vision encoder + LoRA, BCE + Shadow loss (``clip_lora``; ``vit``);
- ``dual_stream``: dual-stream network with weighted label smoothing (``dual_stream``);
- ``retclip``: RET-CLIP image-report pre-training (``retclip``);
- ``retfound``: RETFound, the released MAE ViT-L/16 converted and fine-tuned (``retfound``);
- ``flair``: FLAIR, the released ResNet-50 + Bio_ClinicalBERT converted: classifier, zero-shot (``flair``).

The fifth, the transfer study (LP / FT / LP-FT from a foundation model vs ImageNet), is a
workflow over these backbones: ``kfundus.workflows.transfer``.

Models never import the engine, data or CLI: a system hands its Objective to the engine.
Importing this package registers every custom layer, loss and metric, so
:func:`load_model` reads any saved kfundus model.
"""

from __future__ import annotations

from kfundus.errors import ConfigError
from kfundus.objectives import default_objective
from kfundus.systems import clip_lora, dual_stream, efficientnet, flair, retclip, retfound
from kfundus.systems.base import System, check_options

SYSTEMS: dict[str, System] = {
    s.name: s for package in (efficientnet, clip_lora, dual_stream, retclip, retfound, flair) for s in package.SYSTEMS
}

__all__ = ["SYSTEMS", "System", "build_model", "check_options", "get_system", "load_model", "make_objective"]


def get_system(name: str, workflow: str = "train") -> System:
    """The system ``model.name`` selects, for a workflow (ConfigError naming the choices)."""
    choices = sorted(n for n, s in SYSTEMS.items() if s.workflow == workflow)
    if name not in SYSTEMS or SYSTEMS[name].workflow != workflow:
        hint = f" ({name} is trained by `kfundus {SYSTEMS[name].workflow}`)" if name in SYSTEMS else ""
        raise ConfigError(
            f"model.name={name!r} is not a model `kfundus {workflow}` trains{hint}; "
            f"available: {choices} (e.g. --set model.name={choices[0]})"
        )
    return SYSTEMS[name]


def build_model(config, *, num_outputs: int, image_size: int, task: str, two_eye: bool = False):
    """Build the classifier a ``model`` config section (:class:`kfundus.config.ModelConfig`)
    names. ``task`` "multiclass" gets a softmax head, "multilabel" and "binary" sigmoids."""
    system = get_system(config.name)
    options = dict(getattr(config, "options", None) or {})
    check_options(system.build, options, f"model.options of {config.name}")
    return system.build(
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


def make_objective(config, manifest, train_targets):
    """The Objective of the system ``config.model.name`` names (the default one for a
    system that defines none)."""
    system = get_system(config.model.name, config.workflow)
    return (system.objective or default_objective)(config, manifest, train_targets)


def load_model(path, **kwargs):
    """``keras.saving.load_model`` with every kfundus system's classes registered (importing
    this package registers them: custom layers, losses, metrics, keras-hub encoders). Use it
    wherever a saved kfundus model is read. Models are read for inference: not compiled
    unless ``compile=True`` (a model trained with the engine's ``LayerDecayAdamW`` then
    needs ``kfundus.engine`` imported for its optimizer)."""
    import keras

    kwargs.setdefault("compile", False)
    return keras.saving.load_model(path, **kwargs)
