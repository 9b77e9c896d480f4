"""Explanations: Grad-CAM for CNNs and token Grad-CAM for ViT/CLIP encoders (``gradcam``),
and how well the maps fall on lesions (``saliency``)."""

from kfundus.explain.cam import GradCAM, TokenGradCAM, gradcam, load_images, overlay, save_overlays
from kfundus.explain.saliency import localisation, localisation_report, randomisation_check

__all__ = [
    "GradCAM",
    "TokenGradCAM",
    "gradcam",
    "load_images",
    "localisation",
    "localisation_report",
    "overlay",
    "randomisation_check",
    "save_overlays",
]
