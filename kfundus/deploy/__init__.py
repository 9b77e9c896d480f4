"""Deployment: a finished run -> a bundle (``.keras``, SavedModel with a bytes signature,
TFLite float32 / float16 / dynamic int8 / int8, ``model_card.json``), and ``predict`` on
images from a bundle. Reads the run folder only."""

from kfundus.deploy.bundle import export_run, read_card
from kfundus.deploy.predict import predict_images
from kfundus.deploy.saved_model import export_bundle, export_saved_model, run_saved_model
from kfundus.deploy.tflite import convert_tflite, run_tflite, tflite_ops

__all__ = [
    "convert_tflite",
    "export_bundle",
    "export_run",
    "export_saved_model",
    "predict_images",
    "read_card",
    "run_saved_model",
    "run_tflite",
    "tflite_ops",
]
