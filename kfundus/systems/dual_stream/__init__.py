"""A dual-stream SeparableConv2D / Conv2D multi-task network trained with weighted label
smoothing, for fundus (normal/abnormal + DR grade) and OCT (4 classes + normal/abnormal)
(Kaloi et al., iCoMET 2023): ``model.name: dual_stream``."""

from kfundus.systems.base import System
from kfundus.systems.dual_stream.kappa import QuadraticWeightedKappa
from kfundus.systems.dual_stream.model import build_dual_stream
from kfundus.systems.dual_stream.objective import dual_stream_objective
from kfundus.systems.dual_stream.wlsr import WeightedLabelSmoothingLoss

SYSTEM = System(
    name="dual_stream",
    build=build_dual_stream,
    objective=dual_stream_objective,
    configs=("fundus_dual_stream_wlsr", "oct_dual_stream_wlsr"),
    paper="Kaloi et al., iCoMET 2023: dual-stream network with weighted label smoothing",
)
SYSTEMS = (SYSTEM,)

__all__ = [
    "SYSTEM",
    "SYSTEMS",
    "QuadraticWeightedKappa",
    "WeightedLabelSmoothingLoss",
    "build_dual_stream",
    "dual_stream_objective",
]
