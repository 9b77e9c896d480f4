"""A CLIP vision encoder fine-tuned with LoRA adapters, trained with BCE + Shadow loss, for
multi-label ODIR (Valizadeh & Moazzami): ``model.name: clip_lora``, and the study's ViT
baseline, ``model.name: vit``."""

from kfundus.systems.base import System
from kfundus.systems.clip_lora.model import build_clip_lora, build_transformer_classifier, build_vit
from kfundus.systems.clip_lora.objective import shadow_objective
from kfundus.systems.clip_lora.shadow_loss import ShadowLoss

PAPER = "Valizadeh & Moazzami: CLIP + LoRA + Shadow loss on OIA-ODIR"
SYSTEM = System(
    name="clip_lora", build=build_clip_lora, objective=shadow_objective, configs=("odir_clip_lora_shadow",), paper=PAPER
)
VIT = System(
    name="vit",
    build=build_vit,
    objective=shadow_objective,
    configs=("odir_vit_baseline",),
    paper=PAPER + " (ViT baseline)",
)
SYSTEMS = (SYSTEM, VIT)

__all__ = [
    "SYSTEM",
    "SYSTEMS",
    "VIT",
    "ShadowLoss",
    "build_clip_lora",
    "build_transformer_classifier",
    "build_vit",
    "shadow_objective",
]
