"""RET-CLIP: CLIP-style pre-training of a retinal foundation model on fundus images and
their reports, with the tripartite (left eye, right eye, patient) contrastive loss (Du et
al., MICCAI 2024): ``model.name: retclip``, trained by ``kfundus pretrain``."""

from kfundus.systems.base import System
from kfundus.systems.retclip.loss import SymmetricInfoNCE
from kfundus.systems.retclip.model import EndTokenPooling, TripartiteLogits, build_retclip, embedding_models
from kfundus.systems.retclip.objective import retclip_objective

SYSTEM = System(
    name="retclip",
    build=build_retclip,
    objective=retclip_objective,
    workflow="pretrain",
    configs=("retclip_pretrain",),
    paper="Du et al., MICCAI 2024: RET-CLIP",
)
SYSTEMS = (SYSTEM,)

__all__ = [
    "SYSTEM",
    "SYSTEMS",
    "EndTokenPooling",
    "SymmetricInfoNCE",
    "TripartiteLogits",
    "build_retclip",
    "embedding_models",
    "retclip_objective",
]
