"""A trained run -> a deployable model bundle in ``saved_models/<run>/``.

``kfundus export --run runs/NAME`` (and ``train`` after training) writes the bundle of
``kfundus.deploy.saved_model`` plus what a deployment needs to use it without the run folder:
``model_card.json`` gains the labels, the decision rules chosen on validation (thresholds
per label; per head for multi-task models: ``thresholds.heads``), the preprocessing, the
input size, the metrics on validation and test (from the run's ``eval-val`` /
``eval-test`` reports when they exist, each with the data, split, model file, kfundus
version and time it was evaluated with, and every head's summary), a data summary, and,
per format,
the macro AUROC on the validation split next to the Keras model's — the measured cost
of each TFLite quantization. ``kfundus predict`` reads everything from that card.

The full-integer int8 TFLite file is calibrated on up to ``CALIBRATION_SAMPLES``
preprocessed images of the run's training split, so exporting it needs the training
data where ``config.yaml`` says it is (or ``--data``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from kfundus.deploy.saved_model import CALIBRATION_SAMPLES, export_bundle
from kfundus.deploy.tflite import run_tflite
from kfundus.errors import ConfigError, DataError
from kfundus.run import RunFolder
from kfundus.systems import load_model

CARD = "model_card.json"
HEADLINE = (
    "macro_auroc",
    "macro_ap",
    "macro_f1",
    "macro_sensitivity",
    "macro_specificity",
    "micro_auroc",
    "accuracy",
    "quadratic_kappa",
    "auroc",
    "kappa",
    "f1",
    "sensitivity",
    "specificity",
)


# Where an evaluation's numbers come from: the model card repeats them beside the numbers.
PROVENANCE = ("data", "split", "scope", "rows", "model_file", "kfundus_version", "evaluated")


def headline(metrics: dict) -> dict:
    """The scalar summary of an evaluation's metrics.json: the headline metrics, the ODIR
    score, the classes left out of the macro means, the summary of every head of a
    multi-task model, and what was evaluated (data, split, rows, model file, kfundus
    version, time)."""
    out = {k: metrics[k] for k in HEADLINE if k in metrics}
    if "odir" in metrics:
        out["odir"] = metrics["odir"]
    if metrics.get("excluded_classes"):
        out["excluded_classes"] = metrics["excluded_classes"]
    if metrics.get("heads"):
        out["heads"] = {head: headline(report) for head, report in metrics["heads"].items()}
    for key in PROVENANCE:
        if key in metrics:
            out[key] = metrics[key]
    return out


def _split(config, run: RunFolder, data_path, split: str):
    """The run's ``split``, from its ``splits.csv``, prepared (cached), or None with the
    reason. ``data_path``: the dataset's new place, when it moved since training."""
    from kfundus.data.images import Preprocess
    from kfundus.data.pipeline import prepare

    try:
        manifest = run.split_manifest(split, data_root=data_path)
        if len(manifest) == 0:
            return None, f"the run's {split} split is empty"
        return prepare(
            manifest,
            Preprocess.from_config(config.data),
            cache_dir=config.data.cache_dir,
            skip_unreadable=True,
            progress=False,
        ), None
    except (DataError, ConfigError, FileNotFoundError) as err:
        return None, f"{type(err).__name__}: {err}"


def _arrays(prepared, limit: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Preprocessed float32 images of ``prepared`` by model input name (a random subset of
    ``limit``)."""
    from kfundus.data.pipeline import make_dataset

    batches = list(make_dataset(prepared, batch_size=64, with_targets=False).as_numpy_iterator())
    if not isinstance(batches[0], dict):
        batches = [{"image": b} for b in batches]
    arrays = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    n = len(next(iter(arrays.values())))
    if limit and n > limit:
        keep = np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
        arrays = {k: v[keep] for k, v in arrays.items()}
    return arrays


def rank_agreement(y_prob, reference) -> float | None:
    """Mean over output columns of the Spearman correlation between ``y_prob`` and
    ``reference``: whether a quantized file orders the images as the Keras model does
    (what AUROC depends on), which the max difference alone does not say. Columns that are
    constant in either are left out; None if all are."""
    from scipy.stats import spearmanr

    y_prob = np.asarray(y_prob).reshape(len(y_prob), -1)
    reference = np.asarray(reference).reshape(len(reference), -1)
    values = [
        spearmanr(y_prob[:, j], reference[:, j]).statistic
        for j in range(y_prob.shape[1])
        if np.ptp(y_prob[:, j]) > 0 and np.ptp(reference[:, j]) > 0
    ]
    return float(np.mean(values)) if values else None


def format_accuracy(paths: dict, model, prepared, info: dict, primary: str | None) -> dict:
    """Per format (Keras and each TFLite file), the validation metrics of the primary output."""
    from kfundus.labels import DR_GRADES
    from kfundus.metrics import evaluate_predictions
    from kfundus.objectives import primary_output

    inputs = _arrays(prepared)
    y_true = prepared.manifest.targets()
    labels = info["labels"]
    task = info["task"]
    predictions = {
        "keras": primary_output(
            model.predict(inputs if len(inputs) > 1 else inputs["image"], batch_size=32, verbose=0), primary
        )
    }
    for key, path in paths.items():
        if key.startswith("tflite"):
            outputs = {}
            for start in range(0, len(y_true), 32):
                batch = run_tflite(path, {k: v[start : start + 32] for k, v in inputs.items()})
                for name, value in batch.items():
                    outputs.setdefault(name, []).append(value)
            predictions[Path(path).name] = primary_output({k: np.concatenate(v) for k, v in outputs.items()}, primary)
    table = {}
    for name, y_prob in predictions.items():
        metrics = evaluate_predictions(y_true, y_prob, labels, task, ordinal=labels == DR_GRADES)
        table[name] = {k: metrics[k] for k in ("macro_auroc", "auroc", "accuracy", "quadratic_kappa") if k in metrics}
        table[name]["max_abs_diff_vs_keras"] = float(np.max(np.abs(y_prob - predictions["keras"])))
        table[name]["rank_correlation_vs_keras"] = rank_agreement(y_prob, predictions["keras"])
    return {"rows": len(y_true), "split": "val", **table}


def export_run(run_dir, out_dir=None, *, data_path=None) -> Path:
    """Export a finished run's model into ``<export.dir>/<run name>/`` (or ``out_dir``) with
    its card. Everything comes from the run folder; ``data_path`` is the dataset's folder
    when it moved since training (int8 calibration and accuracy per format read images)."""
    from kfundus import __version__
    from kfundus.data.images import Preprocess

    run = RunFolder(run_dir).require_finished("export")
    config = run.read_config()
    info = run.read_info()
    thresholds = run.read_thresholds()
    out_dir = Path(out_dir or Path(config.export.dir) / run.name)
    model = load_model(run.model_file)
    preprocess = Preprocess.from_config(config.data)
    variants = list(config.export.tflite) if "tflite" in config.export.formats else []

    calibration, val, notes = None, None, {}
    if "int8" in variants:
        train, reason = _split(config, run, data_path, "train")
        if train is None:
            raise ConfigError(
                f"the int8 TFLite file is calibrated on the run's training images, which could not be "
                f"read ({reason}). Pass --data DIR (where the dataset is now), or leave int8 out: "
                f"--set 'export.tflite=[float32, float16, dynamic_int8]' when training"
            )
        calibration = _arrays(train, CALIBRATION_SAMPLES, seed=config.train.seed)
    if variants:
        val, reason = _split(config, run, data_path, "val")
        if val is None:
            notes["accuracy_by_format"] = f"not measured: validation images unavailable ({reason})"
    samples = run.read_samples()
    evaluated = {}
    for split, key in (("val", "validation"), ("test", "test")):
        metrics = run.eval_metrics(split)
        evaluated[key] = headline(metrics) if metrics else None
    if evaluated["test"] is None:
        notes["metrics.test"] = f"not evaluated yet: run `kfundus evaluate --run {run}`, then export again"
    card = {
        "name": run.name,
        "task": info["task"],
        "level": info["level"],
        "primary_output": thresholds.get("primary_output"),
        "thresholds": {
            "method": thresholds["method"],
            "labels": thresholds["labels"],
            "values": thresholds["thresholds"],
            **({"heads": thresholds["heads"]} if thresholds.get("heads") else {}),
        },
        "preprocessing": {
            **dataclasses.asdict(preprocess),
            "input": (
                "float32 RGB in [0, 255]: decoded (JPEG reduced in the DCT domain), "
                + ("cropped to the fundus field of view, " if preprocess.crop_fundus else "")
                + "padded to a square with black, resized bilinearly, rounded to 8 bits; the model "
                "normalises inside. The SavedModel's serving_default signature does all of it from "
                "encoded bytes; TFLite and serving_preprocessed take the result"
            ),
        },
        "image_size": info["image_size"],
        "metrics": evaluated,
        "data": {
            "source": info.get("source"),
            "path": info.get("data_path"),
            "counts": info.get("counts"),
            "skipped": info.get("skipped"),
        },
        "training": {
            "config": config.name,
            "run": str(run),
            "model": config.model.name,
            "epochs": config.train.epochs,
            "image_size": config.data.image_size,
        },
        "notes": notes,
        "kfundus_version": __version__,
    }
    paths = export_bundle(
        model,
        out_dir,
        labels=bundle_labels(model, info["labels"], card["primary_output"]),
        formats=tuple(config.export.formats),
        metadata=card,
        sample_inputs=samples,
        preprocess=preprocess,
        tflite_variants=variants,
        calibration=calibration,
    )
    if val is not None and variants:
        card_path = paths["model_card"]
        full = json.loads(card_path.read_text())
        full["accuracy_by_format"] = format_accuracy(paths, model, val, info, card["primary_output"])
        card_path.write_text(json.dumps(full, indent=2, default=str) + "\n")
    print(f"exported to {out_dir}: " + ", ".join(sorted(Path(p).name for p in paths.values())))
    return out_dir


def bundle_labels(model, labels: list, primary: str | None):
    """The labels of each output: ``labels`` for a single-output model, else
    ``{primary: labels}`` plus each one-unit head named after itself (the ``abnormal`` head
    of a multi-task model); other outputs (embeddings) carry no labels."""
    if not isinstance(model.output, dict) or primary is None:
        return labels
    out = {primary: list(labels)}
    for name, tensor in model.output.items():
        if name != primary and tensor.shape[-1] == 1:
            out[name] = [name]
    return out


def read_card(bundle) -> dict:
    """The model card of a bundle folder, with a clear error when it is not one."""
    path = Path(bundle) / CARD
    if not path.exists():
        raise ConfigError(f"{bundle} has no {CARD}: give a folder written by `kfundus export` (saved_models/<run>)")
    return json.loads(path.read_text())
