"""RETFound (Zhou et al., Nature 2023): the MAE-pre-trained ViT-L/16 retinal foundation
model, its released checkpoints converted to Keras, fine-tuned as its authors do
(layer-wise learning-rate decay, label smoothing, drop path): ``model.name: retfound``."""

from kfundus.systems.base import System
from kfundus.systems.retfound.convert import convert_retfound, load_encoder
from kfundus.systems.retfound.model import build_retfound, build_retfound_features, retfound_normalization
from kfundus.systems.retfound.objective import retfound_objective, retfound_param_groups
from kfundus.systems.retfound.vit import ClassTokenPosition, DropPath, RETFoundBackbone, ViTBlock, ViTPooling

SYSTEM = System(
    name="retfound",
    build=build_retfound,
    objective=retfound_objective,
    configs=("retfound_finetune",),
    paper="Zhou et al., Nature 2023: RETFound, a foundation model for disease detection from retinal images",
)
SYSTEMS = (SYSTEM,)

__all__ = [
    "SYSTEM",
    "SYSTEMS",
    "ClassTokenPosition",
    "DropPath",
    "RETFoundBackbone",
    "ViTBlock",
    "ViTPooling",
    "build_retfound",
    "build_retfound_features",
    "convert_retfound",
    "load_encoder",
    "retfound_normalization",
    "retfound_objective",
    "retfound_param_groups",
]
