"""The objective of the CLIP / ViT + LoRA systems: BCE + lambda * Shadow loss."""

from __future__ import annotations

from pathlib import Path

from kfundus.errors import ConfigError
from kfundus.objectives import Objective, make_metrics
from kfundus.systems.clip_lora.shadow_loss import ShadowLoss

SHADOW_OPTIONS = {"shadow_weight": 1.0, "margin": 0.5}


def shadow_objective(config, manifest, train_targets):
    """``BCE + lambda * Shadow``: ``train.loss`` (bce, weighted_bce or focal) on
    ``probabilities``, ``ShadowLoss(margin)`` (the cosine triplet form: it L2-normalises the
    embeddings) on ``embedding`` with weight ``lambda``.
    ``train.loss_options``: ``shadow_weight`` (lambda, default 1; 0 = BCE only) and
    ``margin`` (default 0.5). ``train.monitor`` must name the probabilities' metric
    (``val_probabilities_auroc``) or a loss."""
    from kfundus.losses import make_loss

    t = config.train
    options = dict(t.loss_options or {})
    unknown = sorted(set(options) - set(SHADOW_OPTIONS))
    if unknown:
        raise ConfigError(
            f"train.loss_options: unknown key(s) {unknown} for {config.model.name}; valid: {sorted(SHADOW_OPTIONS)}"
        )
    options = {**SHADOW_OPTIONS, **options}
    if float(options["shadow_weight"]) < 0 or float(options["margin"]) < 0:
        raise ConfigError(f"train.loss_options {options}: shadow_weight and margin must be >= 0")
    valid_monitors = {
        "val_probabilities_auroc",
        "val_probabilities_accuracy",
        "val_loss",
        "val_probabilities_loss",
        "val_embedding_loss",
    }
    if t.monitor not in valid_monitors:
        raise ConfigError(
            f"train.monitor={t.monitor!r}: model {config.model.name} has two outputs, so its "
            f"metrics are prefixed by the output name; use one of {sorted(valid_monitors)} "
            "(e.g. val_probabilities_auroc)"
        )
    if manifest.task == "multiclass":
        raise ConfigError(f"model {config.model.name} is a multi-label (sigmoid) model; {manifest.name} is multi-class")
    bce = make_loss(t.loss, manifest.task, train_targets, pos_weight_cap=t.pos_weight_cap, focal_gamma=t.focal_gamma)
    return Objective(
        loss={"probabilities": bce, "embedding": ShadowLoss(margin=float(options["margin"]))},
        metrics={"probabilities": make_metrics(manifest.task, len(manifest.labels))},
        loss_weights={"probabilities": 1.0, "embedding": float(options["shadow_weight"])},
        targets=lambda y: {"probabilities": y, "embedding": y},
        primary="probabilities",
        on_trained=[_adapter_file(manifest.labels)]
        if int((config.model.options or {}).get("lora_rank", 8)) > 0
        else [],
    )


def _adapter_file(labels):
    """``(model, run_dir) -> None``: write the trained adapters to ``<run>/adapters.npz``, the
    weights the engine kept (best or last epoch). ``model.keras`` has them merged, as Keras
    saves LoRA layers; the adapter file is the small, PEFT-like copy."""
    from kfundus.systems.clip_lora.lora import save_adapters

    return lambda model, run_dir: save_adapters(model, Path(run_dir) / "adapters.npz", {"labels": list(labels)})
