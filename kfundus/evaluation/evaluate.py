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

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from kfundus.config import load_config
from kfundus.data.manifest import Manifest
from kfundus.data.pipeline import prepare
from kfundus.errors import ConfigError, DataError
from kfundus.labels import DR_GRADES, ODIR_LABELS
from kfundus.training import load_manifest, predict, preprocess_config
from kfundus.models import load_model


def select_rows(manifest: Manifest, run_dir: Path, split: str) -> tuple[Manifest, str]:
    """Rows of ``manifest`` in the run's ``split``; the whole dataset if the run never saw it."""
    splits = pd.read_csv(run_dir / "splits.csv", dtype={"patient_id": str})
    key = manifest.image_columns[0]
    known = dict(zip(splits[key].astype(str), splits["split"]))
    assigned = manifest.frame[key].astype(str).map(known)
    if split == "all" or assigned.isna().all():
        scope = "all rows" if split == "all" else "external dataset (all rows: none were in this run's splits)"
        return manifest, scope
    if split not in set(splits["split"]):
        raise ConfigError(f"--split {split}: run {run_dir} has splits {sorted(set(splits['split']))} (or 'all')")
    new = int(assigned.isna().sum())
    if new:
        print(f"note: {new} row(s) of the dataset are not in {run_dir / 'splits.csv'} (added after training?); "
              "they are left out")
    return manifest.subset((assigned == split).to_numpy()), f"split '{split}' of the run"


def _ids(manifest: Manifest) -> pd.Series:
    frame = manifest.frame
    if manifest.level == "eye" and "eye" in frame:
        return frame["patient_id"].astype(str) + np.where(frame["eye"].astype(str) != "", "_" + frame["eye"].astype(str), "")
    return frame["patient_id"].astype(str)


def evaluate_run(run_dir, data_path=None, *, split="test", overrides=None, out_dir=None, gallery=True) -> dict:
    """Evaluate ``run_dir/model.keras`` on a split of a dataset; return the metrics dict.
    ``gallery`` adds Grad-CAM overlays of true and false positives per class."""
    from kfundus.metrics import evaluate_predictions, per_class_metrics, to_jsonable, write_odir_submission
    from kfundus.plots import plot_confusion_matrices, plot_pr_curves, plot_roc_curves

    run_dir = Path(run_dir)
    if not (run_dir / "model.keras").exists():
        raise ConfigError(f"{run_dir} has no model.keras: give the folder a finished `train` run wrote")
    config = load_config(run_dir / "config.yaml", overrides)
    info = json.loads((run_dir / "run.json").read_text())
    manifest = load_manifest(config, data_path)
    if manifest.labels != info["labels"]:
        raise DataError(f"the dataset's labels {manifest.labels} differ from the run's {info['labels']}; "
                        "use --set data.labels=[...] to select the run's labels")
    manifest, scope = select_rows(manifest, run_dir, split)
    if len(manifest) == 0:
        raise DataError(f"no rows to evaluate in {scope}")
    prepared = prepare(manifest, preprocess_config(config), cache_dir=config.data.cache_dir,
                       skip_unreadable=config.data.skip_unreadable)
    manifest = prepared.manifest
    model = load_model(run_dir / "model.keras")
    chosen = json.loads((run_dir / "thresholds.json").read_text())
    y_prob = predict(model, prepared, config.train.batch_size, chosen.get("primary_output"))
    y_true = manifest.targets()
    thresholds = chosen["thresholds"]

    out = Path(out_dir or run_dir / f"eval-{split}")
    out.mkdir(parents=True, exist_ok=True)
    labels = manifest.labels
    ordinal = labels == DR_GRADES
    metrics = evaluate_predictions(y_true, y_prob, labels, manifest.task,
                                   thresholds=None if manifest.task == "multiclass" else np.asarray(thresholds),
                                   ordinal=ordinal)
    if len(model.outputs) > 1:  # a multi-task model: a report per head besides the primary one
        from kfundus.data.pipeline import make_dataset
        from kfundus.multitask import head_reports

        outputs = model.predict(make_dataset(prepared, batch_size=config.train.batch_size, with_targets=False),
                                verbose=0)
        metrics["heads"] = head_reports(outputs, y_true, labels, manifest.task, config)
    metrics = to_jsonable({"run": str(run_dir), "data": str(config.data.path), "scope": scope,
                           "rows": len(manifest), "skipped": len(prepared.skipped), "level": manifest.level,
                           "thresholds": dict(zip(labels, thresholds)), **metrics})
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
    plot_confusion_matrices(y_true, y_prob, labels, out / "confusion.png", manifest.task,
                            thresholds=None if manifest.task == "multiclass" else np.asarray(thresholds))
    if labels == ODIR_LABELS and manifest.level == "patient":
        write_odir_submission(manifest.frame["patient_id"], y_prob, out / "odir_submission.csv")
    if gallery:
        from kfundus.multitask import primary_model

        gradcam_gallery(primary_model(model, chosen.get("primary_output")), manifest, y_prob, thresholds,
                        preprocess_config(config), out)
    _write_html(out, metrics)
    print(f"evaluated {len(manifest)} rows ({scope}); report: {out / 'report.html'}")
    return metrics


def gradcam_gallery(model, manifest: Manifest, y_prob, thresholds, preprocess, out: Path, *, per_row: int = 4):
    """Per class, Grad-CAM overlays of the most confident true positives and false
    positives, written as ``gallery_<label>.png``. Returns the files written (none for
    two-eye models, which Grad-CAM does not support yet)."""
    from kfundus.explain import GradCAM, load_images, overlay
    from kfundus.plots import plot_image_grid

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
            rows[name] = [(overlay(img, cam), f"{Path(manifest.frame['image'].iloc[i]).stem} p={y_prob[i, k]:.2f}")
                          for i, img, cam in zip(hits, images, cams)]
        files.append(plot_image_grid(rows, out / f"gallery_{label}.png", title=f"Grad-CAM, {label}"))
    return files


def _write_html(out: Path, metrics: dict) -> None:
    """A one-page report: headline metrics, the per-class table, the plots."""
    headline = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and v is not None}
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in headline.items())
    table = ""
    per_class = out / "per_class.csv"
    if per_class.exists():
        table = pd.read_csv(per_class).to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="n/a")
    odir = metrics.get("odir")
    odir_html = ""
    if odir:
        odir_html = ("<h2>Official ODIR score (pooled over patients x labels, threshold 0.5)</h2><p>"
                     + ", ".join(f"{k} = {_fmt(v)}" for k, v in odir.items()) + "</p>")
    names = ["roc.png", "pr.png", "confusion.png"] + sorted(p.name for p in out.glob("gallery_*.png"))
    images = "".join(f'<figure><img src="{name}" width="600"><figcaption>{name}</figcaption></figure>'
                     for name in names if (out / name).exists())
    page = (f"<html><head><meta charset='utf-8'><title>kfundus evaluation</title></head><body>"
            f"<h1>kfundus evaluation</h1><table>{rows}</table>{odir_html}<h2>Per class</h2>{table}{images}"
            f"<p>All figures: metrics.json. Macro means exclude classes without both positives and negatives "
            f"in this set.</p></body></html>")
    (out / "report.html").write_text(page)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))
