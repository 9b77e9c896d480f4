"""Evaluation: a trained run + a dataset -> predictions, metrics and report files.

Writes into ``<run>/eval-<split>/``: ``predictions.csv`` (one row per image or patient:
true labels, probabilities and the decision of every head), ``metrics.json`` (everything,
thresholds and provenance included: the run, the model file, the data evaluated, the
split, the kfundus version and the time), ``per_class.csv``, ``roc.png``, ``pr.png``,
``confusion.png``, a Grad-CAM gallery per class (``gallery_<label>.png``: the most
confident true and false positives, each eye of a two-eye model), ``report.html`` and,
for ODIR labels at patient level, the official submission CSV ``odir_submission.csv``.

Multi-task models (dual-stream): every head is evaluated with the decision rule chosen on
validation at training time (``thresholds.json`` → ``heads``: thresholds for sigmoid
heads, arg-max for softmax heads) and reported in ``metrics.json`` → ``heads``,
``predictions.csv`` and the report.

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

from kfundus.data.images import Preprocess
from kfundus.data.manifest import Manifest
from kfundus.data.pipeline import prepare
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
    from kfundus.evaluation.predict import decision_columns, predict_outputs
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
    head_rules = chosen.get("heads") or {}
    if isinstance(outputs, dict) and (head_rules or config.model.name == "dual_stream"):  # a report per head
        from kfundus.systems.dual_stream.objective import head_reports

        metrics["heads"] = head_reports(outputs, y_true, labels, manifest.task, config, thresholds=head_rules)
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
    predictions = pd.concat(
        [
            predictions,
            decision_columns(y_prob, labels, manifest.task, None if manifest.task == "multiclass" else thresholds),
        ],
        axis=1,
    )
    predictions = pd.concat([predictions, *_head_columns(outputs, metrics, y_true, config, primary)], axis=1)
    predictions.to_csv(out / "predictions.csv", index=False)
    if manifest.task != "multiclass":
        per_class_metrics(y_true, y_prob, labels, np.asarray(thresholds)).to_csv(out / "per_class.csv", index=False)
    else:
        pd.DataFrame(metrics["per_class"]).to_csv(out / "per_class.csv", index=False)
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
    write_html(out, metrics, primary=primary)
    print(f"evaluated {len(manifest)} rows ({scope}); report: {out / 'report.html'}")
    return metrics


def _head_columns(outputs, metrics: dict, y_true, config, primary) -> list[pd.DataFrame]:
    """``predictions.csv`` columns of every head but the primary one: true values,
    probabilities and decisions (thresholds chosen on validation, or arg-max); a head whose
    label names clash with another's gets its name as a prefix."""
    from kfundus.evaluation.predict import decision_columns

    reports = metrics.get("heads") or {}
    if not isinstance(outputs, dict) or not reports:
        return []
    from kfundus.systems.dual_stream.objective import head_targets

    options = config.model.options or {}
    targets = head_targets(
        y_true, metrics["labels"], options.get("primary_head", "classes"), options.get("normal_class")
    )
    taken = {str(x) for x in metrics["labels"]}
    frames = []
    for head, report in reports.items():
        if head == primary or head not in outputs or head not in targets:
            continue
        names = [str(x) for x in report["labels"]]
        prefix = f"{head}_" if taken & set(names) else ""
        taken |= set(names)
        true = pd.DataFrame(
            {f"{prefix}true_{n}": np.asarray(targets[head])[:, k].astype(int) for k, n in enumerate(names)}
        )
        rule = None if report["task"] == "multiclass" else report.get("thresholds")
        decided = decision_columns(
            outputs[head], names, report["task"], rule, prefix=prefix, prediction=f"{head}_prediction"
        )
        frames.append(pd.concat([true, decided], axis=1))
    return frames


def gradcam_gallery(model, manifest: Manifest, y_prob, thresholds, preprocess, out: Path, *, per_row: int = 4):
    """Per class, Grad-CAM overlays of the most confident true positives and false
    positives, written as ``gallery_<label>.png``; the captions carry the probability of
    ``y_prob`` (the evaluation's). Two-eye models are explained per eye (``GradCAM``): each
    patient gives a left and a right panel, so a row holds ``per_row // 2`` patients.
    Returns the files written."""
    from kfundus.evaluation.plots import plot_image_grid
    from kfundus.explain.cam import GradCAM, load_images, overlay

    y_true = manifest.targets()
    if manifest.task == "multiclass":
        predicted = np.eye(len(manifest.labels))[np.argmax(y_prob, axis=1)].astype(bool)
    else:
        predicted = y_prob > np.asarray(thresholds)[None, :]
    columns = manifest.image_columns
    explainer, files = GradCAM(model), []
    count = per_row if len(columns) == 1 else max(1, per_row // 2)
    for k, label in enumerate(manifest.labels):
        rows = {}
        for name, wanted in (("true positives", 1), ("false positives", 0)):
            hits = np.flatnonzero(predicted[:, k] & (y_true[:, k] == wanted))
            hits = hits[np.argsort(-y_prob[hits, k])][:count]
            images = {c: load_images(manifest.frame[c].iloc[hits], preprocess) for c in columns}
            cams = explainer(images if len(columns) > 1 else images[columns[0]], k) if len(hits) else {}
            cams = cams if isinstance(cams, dict) else {columns[0]: cams}
            panels = []
            for j, i in enumerate(hits):
                for c in columns:
                    stem = Path(manifest.frame[c].iloc[i]).stem
                    panels.append((overlay(images[c][j], cams[c][j]), f"{stem} p={y_prob[i, k]:.2f}"))
            rows[name] = panels
        files.append(plot_image_grid(rows, out / f"gallery_{label}.png", title=f"Grad-CAM, {label}"))
    return files
