"""Evaluation: a trained run + a dataset -> predictions, metrics and report files.

Writes into ``<run>/eval-<split>/``: ``predictions.csv`` (one row per image or patient,
true labels and probabilities), ``metrics.json`` (everything, thresholds included),
``per_class.csv``, ``roc.png``, ``pr.png``, ``confusion.png``, a Grad-CAM gallery per class
(``gallery_<label>.png``: the most confident true and false positives), ``report.html``
and, for ODIR labels at patient level, the official submission CSV ``odir_submission.csv``.

Which rows are evaluated: when the dataset is the one the run was trained on, the
run's own ``splits.csv`` decides (a patient never moves between splits, even if the
folder gained new patients since — those are left out and counted). A dataset the run
never saw is evaluated whole (an external test set).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from kfundus.data.manifest import Manifest
from kfundus.data.pipeline import Preprocess, prepare
from kfundus.errors import ConfigError, DataError
from kfundus.labels import DR_GRADES, ODIR_LABELS
from kfundus.run import RunFolder, check_data_labels, now


def select_rows(manifest: Manifest, run: RunFolder, split: str) -> tuple[Manifest, str]:
    """Rows of ``manifest`` in the run's ``split``; the whole dataset if the run never saw it."""
    splits = run.read_splits()
    key = manifest.image_columns[0]
    known = dict(zip(splits[key].astype(str), splits["split"]))
    assigned = manifest.frame[key].astype(str).map(known)
    if split == "all" or assigned.isna().all():
        scope = "all rows" if split == "all" else "external dataset (all rows: none were in this run's splits)"
        return manifest, scope
    if split not in set(splits["split"]):
        raise ConfigError(f"--split {split}: run {run} has splits {sorted(set(splits['split']))} (or all)")
    new = int(assigned.isna().sum())
    if new:
        print(
            f"note: {new} row(s) of the dataset are not in {run / 'splits.csv'} (added after training?); "
            "they are left out"
        )
    return manifest.subset((assigned == split).to_numpy()), f"split '{split}' of the run"


def _ids(manifest: Manifest) -> pd.Series:
    frame = manifest.frame
    if manifest.level == "eye" and "eye" in frame:
        eye = frame["eye"].astype(str)
        return frame["patient_id"].astype(str) + np.where(eye != "", "_" + eye, "")
    return frame["patient_id"].astype(str)


def evaluate_run(run_dir, data_path=None, *, split="test", overrides=None, out_dir=None, gallery=True) -> dict:
    """Evaluate ``run_dir/model.keras`` on a split of a dataset (default: the one it was
    trained on); write the report folder and return the metrics dict. ``gallery`` adds
    Grad-CAM overlays of true and false positives per class."""
    from kfundus import __version__
    from kfundus.data.readers import load_dataset
    from kfundus.evaluation.plots import plot_confusion_matrices, plot_pr_curves, plot_roc_curves
    from kfundus.evaluation.predict import predict_outputs
    from kfundus.evaluation.report import write_html
    from kfundus.metrics import evaluate_predictions, per_class_metrics, to_jsonable, write_odir_submission
    from kfundus.objectives import primary_output
    from kfundus.systems import load_model

    run = RunFolder(run_dir).require_finished("evaluate")
    config = run.read_config(overrides)
    info = run.read_info()
    data = str(data_path or config.data.path)
    manifest = load_dataset(config.data, data)
    check_data_labels(manifest, info, data)
    manifest, scope = select_rows(manifest, run, split)
    if len(manifest) == 0:
        raise DataError(f"no rows to evaluate in {scope} of {data}")
    preprocess = Preprocess.from_config(config.data)
    prepared = prepare(
        manifest, preprocess, cache_dir=config.data.cache_dir, skip_unreadable=config.data.skip_unreadable
    )
    manifest = prepared.manifest
    model = load_model(run.model_file)
    chosen = run.read_thresholds()
    primary = chosen.get("primary_output")
    outputs = predict_outputs(model, prepared, config.train.batch_size)
    y_prob = primary_output(outputs, primary)
    y_true = manifest.targets()
    thresholds = chosen["thresholds"]

    out = Path(out_dir or run.eval_dir(split))
    out.mkdir(parents=True, exist_ok=True)
    labels = manifest.labels
    metrics = evaluate_predictions(
        y_true,
        y_prob,
        labels,
        manifest.task,
        thresholds=None if manifest.task == "multiclass" else np.asarray(thresholds),
        ordinal=labels == DR_GRADES,
    )
    if isinstance(outputs, dict) and len(outputs) > 1:  # a multi-task model: a report per head
        from kfundus.systems.dual_stream.objective import head_reports

        metrics["heads"] = head_reports(outputs, y_true, labels, manifest.task, config)
    metrics = to_jsonable(
        {
            "run": str(run),
            "model_file": str(run.model_file),
            "data": data,
            "split": split,
            "scope": scope,
            "rows": len(manifest),
            "skipped": len(prepared.skipped),
            "level": manifest.level,
            "kfundus_version": __version__,
            "evaluated": now(),
            "thresholds": dict(zip(labels, thresholds)),
            **metrics,
        }
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))

    ids = _ids(manifest)
    predictions = pd.DataFrame({"id": ids.to_numpy()})
    for column in manifest.image_columns:
        predictions[column] = manifest.frame[column].to_numpy()
    for i, label in enumerate(labels):
        predictions[f"true_{label}"] = y_true[:, i].astype(int)
        predictions[f"prob_{label}"] = y_prob[:, i]
    predictions.to_csv(out / "predictions.csv", index=False)
    if manifest.task != "multiclass":
        per_class_metrics(y_true, y_prob, labels, np.asarray(thresholds)).to_csv(out / "per_class.csv", index=False)
    plot_roc_curves(y_true, y_prob, labels, out / "roc.png", title=f"ROC, {scope}")
    plot_pr_curves(y_true, y_prob, labels, out / "pr.png", title=f"Precision-recall, {scope}")
    plot_confusion_matrices(
        y_true,
        y_prob,
        labels,
        out / "confusion.png",
        manifest.task,
        thresholds=None if manifest.task == "multiclass" else np.asarray(thresholds),
    )
    if labels == ODIR_LABELS and manifest.level == "patient":
        write_odir_submission(manifest.frame["patient_id"], y_prob, out / "odir_submission.csv")
    if gallery:
        from kfundus.systems.dual_stream.objective import primary_model

        gradcam_gallery(primary_model(model, primary), manifest, y_prob, thresholds, preprocess, out)
    write_html(out, metrics)
    print(f"evaluated {len(manifest)} rows ({scope}); report: {out / 'report.html'}")
    return metrics


def gradcam_gallery(model, manifest: Manifest, y_prob, thresholds, preprocess, out: Path, *, per_row: int = 4):
    """Per class, Grad-CAM overlays of the most confident true positives and false
    positives, written as ``gallery_<label>.png``. Returns the files written (none for
    two-eye models, which Grad-CAM does not support yet)."""
    from kfundus.evaluation.plots import plot_image_grid
    from kfundus.explain.cam import GradCAM, load_images, overlay

    if manifest.level != "eye":
        return []
    y_true = manifest.targets()
    if manifest.task == "multiclass":
        predicted = np.eye(len(manifest.labels))[np.argmax(y_prob, axis=1)].astype(bool)
    else:
        predicted = y_prob > np.asarray(thresholds)[None, :]
    explainer, files = GradCAM(model), []
    for k, label in enumerate(manifest.labels):
        rows = {}
        for name, wanted in (("true positives", 1), ("false positives", 0)):
            hits = np.flatnonzero(predicted[:, k] & (y_true[:, k] == wanted))
            hits = hits[np.argsort(-y_prob[hits, k])][:per_row]
            images = load_images(manifest.frame["image"].iloc[hits], preprocess)
            cams = explainer(images, k) if len(hits) else []
            rows[name] = [
                (overlay(img, cam), f"{Path(manifest.frame['image'].iloc[i]).stem} p={y_prob[i, k]:.2f}")
                for i, img, cam in zip(hits, images, cams)
            ]
        files.append(plot_image_grid(rows, out / f"gallery_{label}.png", title=f"Grad-CAM, {label}"))
    return files
