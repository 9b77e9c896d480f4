"""FLAIR (Silva-Rodríguez et al., Medical Image Analysis 2025), the released retinal
vision-language model: its converted ResNet-50 vision encoder as a classifier backbone
(``model.name: flair``), its text encoder for zero-shot classification with expert-knowledge
prompts, and the backbone of the FLAIR transfer study (``kfundus transfer``, family ``flair``).
Weights: ``kfundus convert --from flair`` (:mod:`kfundus.systems.flair.convert`)."""

from kfundus.systems.base import System
from kfundus.systems.flair.model import FlairTextPooling, build_flair_classifier, flair_extractor

SYSTEM = System(
    name="flair",
    build=build_flair_classifier,
    configs=("hr_transfer_flair", "flair_zero_shot"),
    paper="Silva-Rodríguez et al., Medical Image Analysis 2025: FLAIR",
)
SYSTEMS = (SYSTEM,)

__all__ = ["SYSTEM", "SYSTEMS", "FlairTextPooling", "build_flair_classifier", "flair_extractor"]
