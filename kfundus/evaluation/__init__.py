"""Evaluation: a finished run + a dataset -> predictions, metrics, plots and an HTML report."""

from kfundus.evaluation.evaluate import evaluate_run, select_rows
from kfundus.evaluation.predict import predict, predict_outputs

__all__ = ["evaluate_run", "predict", "predict_outputs", "select_rows"]
