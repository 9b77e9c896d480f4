"""The engine: the one place kfundus compiles and fits a Keras model (``fit``), with its
optimizer (``optimizers``), callbacks (``callbacks``) and distribution strategy
(``distribute``). Workflows call it with a model builder and an Objective."""

from kfundus.engine.callbacks import CHECKPOINT, HISTORY, best_so_far, make_callbacks, monitor_mode
from kfundus.engine.optimizers import make_optimizer
from kfundus.engine.training import FitResult, fit, quiet

__all__ = [
    "CHECKPOINT",
    "HISTORY",
    "FitResult",
    "best_so_far",
    "fit",
    "make_callbacks",
    "make_optimizer",
    "monitor_mode",
    "quiet",
]
