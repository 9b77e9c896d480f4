"""EfficientNet-B0 transfer learning for multi-label fundus classification, with Grad-CAM
explanations (Dharsan et al.): ``model.name: efficientnet_b0``."""

from kfundus.systems.base import System
from kfundus.systems.efficientnet.contrast import LocalContrast
from kfundus.systems.efficientnet.model import build_efficientnet_b0, efficientnet_b0_backbone

SYSTEM = System(
    name="efficientnet_b0",
    build=build_efficientnet_b0,
    objective=None,
    configs=("rfmid_efficientnet_b0", "odir_efficientnet_b0", "demo_synthetic"),
    paper="Dharsan et al.: EfficientNet-B0 transfer learning with Grad-CAM on RFMiD",
)
SYSTEMS = (SYSTEM,)

__all__ = ["SYSTEM", "SYSTEMS", "LocalContrast", "build_efficientnet_b0", "efficientnet_b0_backbone"]
