"""RET-CLIP: CLIP-style pre-training of a retinal foundation model on fundus images and
their reports, with the tripartite (left eye, right eye, patient) contrastive loss (Du et
al., MICCAI 2024): ``model.name: retclip``, trained by ``kfundus pretrain``; the released
checkpoint converted (``kfundus convert --from retclip``) and its image tower as a two-eye
classifier, ``model.name: retclip_classifier``."""

from kfundus.systems.base import System
from kfundus.systems.retclip.loss import SymmetricInfoNCE
from kfundus.systems.retclip.model import (
    EndTokenPooling,
    FirstTokenPooling,
    TripartiteLogits,
    build_retclip,
    build_retclip_classifier,
    embedding_models,
)
from kfundus.systems.retclip.objective import retclip_objective

SYSTEM = System(
    name="retclip",
    build=build_retclip,
    objective=retclip_objective,
    workflow="pretrain",
    configs=("retclip_pretrain",),
    paper="Du et al., MICCAI 2024: RET-CLIP",
)
CLASSIFIER = System(
    name="retclip_classifier",
    build=build_retclip_classifier,
    configs=("retclip_odir",),
    paper="Du et al., MICCAI 2024: RET-CLIP (released encoder, patient-level two-eye classification)",
)
SYSTEMS = (SYSTEM, CLASSIFIER)

__all__ = [
    "CLASSIFIER",
    "SYSTEM",
    "SYSTEMS",
    "EndTokenPooling",
    "FirstTokenPooling",
    "SymmetricInfoNCE",
    "TripartiteLogits",
    "build_retclip",
    "build_retclip_classifier",
    "embedding_models",
    "retclip_objective",
]
