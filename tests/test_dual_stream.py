"""The dual-stream multi-task network (SPECS.md section 3): model, streaming quadratic kappa,
multi-task objective and targets, and learning both fundus tasks (TF1 normal/abnormal,
TF2 DR grade) from synthetic EyePACS-layout data through ``kfundus.training.train``."""

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from kfundus.config import load_config
from kfundus.data.readers import load_source
from kfundus.data.synthetic import make_dr
from kfundus.errors import ConfigError
from kfundus.evaluation import evaluate_run
from kfundus.labels import DR_GRADES
from kfundus.metrics import quadratic_kappa
from kfundus.systems import build_model
from kfundus.systems.dual_stream.model import build_dual_stream
from kfundus.systems.dual_stream.objective import QuadraticWeightedKappa, dual_stream_objective, head_targets
from kfundus.systems.dual_stream.wlsr import WeightedLabelSmoothingLoss
from kfundus.workflows.supervised import train

REPO = Path(__file__).resolve().parents[1]
FUNDUS = "fundus_dual_stream_wlsr"
OCT = "oct_dual_stream_wlsr"


def test_streaming_qwk_equals_sklearn_over_batches():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, 300)
    pred = np.clip(truth + rng.integers(-2, 3, 300) * (rng.random(300) < 0.5), 0, 4)
    probs = np.eye(5)[pred] * 0.6 + rng.random((300, 5)) * 0.3  # argmax = pred
    metric = QuadraticWeightedKappa(5)
    for i in range(0, 300, 64):  # batches, state carried over
        metric.update_state(np.eye(5)[truth[i : i + 64]], probs[i : i + 64])
    expected = cohen_kappa_score(truth, pred, weights="quadratic", labels=range(5))
    assert float(metric.result()) == pytest.approx(expected, abs=1e-5)
    assert float(metric.result()) == pytest.approx(quadratic_kappa(truth, pred, n_classes=5), abs=1e-5)
    metric.reset_state()
    metric.update_state(np.eye(5)[[0, 0]], np.eye(5)[[0, 0]])  # one grade only: undefined -> 0
    assert float(metric.result()) == 0.0
    clone = QuadraticWeightedKappa.from_config(metric.get_config())
    assert clone.num_classes == 5 and clone.name == "qwk"


def test_model_heads_streams_normalisation_and_serialisation(tmp_path):
    model = build_dual_stream(5, image_size=32, depth=2, width=4, primary_head="dr_grade", normal_class="no_dr")
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    out = model(x)
    assert set(out) == {"dr_grade", "abnormal"} and out["dr_grade"].shape == (3, 5) and out["abnormal"].shape == (3, 1)
    np.testing.assert_allclose(np.asarray(out["dr_grade"]).sum(axis=1), 1, atol=1e-5)
    names = [layer.name for layer in model.layers]
    assert any(n.startswith("sep_block") for n in names) and any(n.startswith("conv_block") for n in names)
    assert isinstance(model.get_layer("sep_block1_conv1"), keras.layers.SeparableConv2D)
    assert isinstance(model.get_layer("conv_block1_conv1"), keras.layers.Conv2D)
    # normalisation inside the model: (x - mean) / std with the fundus constants
    norm = keras.Model(model.inputs, model.get_layer("normalize").output)
    np.testing.assert_allclose(np.asarray(norm(x)), (x - [105, 72, 48]) / np.array([67, 51, 40]), rtol=1e-4, atol=1e-4)
    # one stream only: no separable layers
    single = build_dual_stream(5, image_size=32, depth=2, width=4, streams="conv")
    assert not any(isinstance(layer, keras.layers.SeparableConv2D) for layer in single.layers)
    assert single.output_names == ["classes"]
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for head, value in loaded(x).items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(out[head]), atol=1e-6)


def test_bad_options_are_config_errors():
    config = load_config(FUNDUS, ["model.options.depht=3"])
    with pytest.raises(ConfigError, match="depht"):
        build_model(config.model, num_outputs=5, image_size=32, task="multiclass")
    for options, match in [
        ({"normalization": "ct"}, "normalization"),
        ({"streams": "three"}, "streams"),
        ({"depth": 9}, "depth"),
        ({"fusion": "mul"}, "fusion"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_dual_stream(5, image_size=64, **options)
    with pytest.raises(ConfigError, match="eye-level"):
        build_dual_stream(5, image_size=64, two_eye=True)


def _manifest(tmp_path):
    return load_source("dr", make_dr(tmp_path / "dr", n_patients=6, size=32, seed=0))


def test_objective_targets_losses_and_metrics_per_head(tmp_path):
    manifest = _manifest(tmp_path)
    config = load_config(FUNDUS)
    grades = np.array([0, 0, 0, 0, 0, 0, 1, 2, 2, 3, 4, 4])
    y = np.eye(5, dtype="float32")[grades]
    objective = dual_stream_objective(config, manifest, y)
    assert objective.primary == "dr_grade" and set(objective.loss) == {"dr_grade", "abnormal"}
    targets = {k: np.asarray(v) for k, v in objective.targets(y).items()}
    np.testing.assert_array_equal(targets["dr_grade"], y)
    np.testing.assert_array_equal(targets["abnormal"][:, 0], (grades > 0).astype("float32"))
    # WLSRL class weights from the training frequencies: N / (K n_k)
    grade_loss, abnormal_loss = objective.loss["dr_grade"], objective.loss["abnormal"]
    assert isinstance(grade_loss, WeightedLabelSmoothingLoss)
    np.testing.assert_allclose(
        grade_loss.class_weights, [12 / (5 * 6), 12 / 5, 12 / (5 * 2), 12 / 5, 12 / (5 * 2)], rtol=1e-6
    )
    np.testing.assert_allclose(abnormal_loss.class_weights, [[1.0, 1.0]])  # 6 normal, 6 abnormal
    names = {h: [m.name for m in ms] for h, ms in objective.metrics.items()}
    assert names["dr_grade"] == ["accuracy", "macro_f1", "auroc", "qwk"]
    assert names["abnormal"] == ["accuracy", "macro_f1", "auroc"]
    assert head_targets(y, DR_GRADES, "dr_grade", None).keys() == {"dr_grade"}


def test_objective_option_errors(tmp_path):
    manifest = _manifest(tmp_path)
    y = manifest.targets()
    for overrides, match in [(["train.loss=focal"], "wlsr"), (["model.options.normal_class=NORMAL"], "normal_class")]:
        with pytest.raises(ConfigError, match=match):
            dual_stream_objective(load_config(FUNDUS, overrides), manifest, y)
    plain = dual_stream_objective(load_config(FUNDUS, ["train.loss=bce"]), manifest, y)
    assert isinstance(plain.loss["dr_grade"], keras.losses.CategoricalCrossentropy)
    config = load_config(FUNDUS, ["train.loss_options={epsilon: 0.2, smoothing: 0.1}"])
    with pytest.raises(ConfigError, match="smoothing"):
        dual_stream_objective(config, manifest, y)
    config = load_config(FUNDUS, ["train.loss_options={loss_weights: {grade: 2.0}}"])
    with pytest.raises(ConfigError, match="grade"):
        dual_stream_objective(config, manifest, y)
    config = load_config(FUNDUS, ["train.loss_options={epsilon: 0.2, loss_weights: {abnormal: 0.5}}"])
    objective = dual_stream_objective(config, manifest, y)
    assert objective.loss_weights == {"dr_grade": 1.0, "abnormal": 0.5}
    assert objective.loss["dr_grade"].epsilon == 0.2


def test_learns_both_fundus_tasks_from_synthetic_grades(tmp_path):
    """DR grade (TF2) and normal/abnormal (TF1) from one EyePACS-layout grade table."""
    data = make_dr(tmp_path / "data", n_patients=100, size=64, seed=2, shares=(0.3, 0.15, 0.25, 0.15, 0.15))
    config = load_config(
        FUNDUS,
        [
            f"output_dir={tmp_path / 'runs'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.image_size=64",
            "model.options.depth=3",
            "model.options.width=16",
            "train.epochs=12",
            "train.learning_rate=0.003",
            "data.augment.zoom=0",
            "data.augment.contrast=0",
            "data.augment.brightness=0",
            "data.split.test=0.25",
        ],
    )
    run = train(config, str(data))
    metrics = evaluate_run(run, data, split="test", gallery=False)
    print("fundus test:", metrics["quadratic_kappa"], metrics["macro_auroc"], metrics["heads"]["abnormal"]["auroc"])
    assert metrics["n_samples"] >= 40
    assert metrics["quadratic_kappa"] > 0.7, metrics  # TF2 on held-out patients
    assert metrics["macro_auroc"] > 0.8, metrics
    assert metrics["heads"]["abnormal"]["auroc"] > 0.9, metrics["heads"]  # TF1
    assert metrics["heads"]["dr_grade"]["quadratic_kappa"] == pytest.approx(metrics["quadratic_kappa"])
    history = (run / "history.csv").read_text().splitlines()[0]
    assert "val_dr_grade_qwk" in history and "val_abnormal_auroc" in history
    # a fresh process (as `python evaluate.py --run RUN` is) loads the compiled model: the
    # QWK metric and WLSR loss it names must register when kfundus.models is imported
    code = f"from kfundus.systems import load_model; print(sorted(load_model({str(run / 'model.keras')!r}).output))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "dr_grade" in proc.stdout, proc.stderr[-2000:]


def test_every_head_has_its_validation_threshold_everywhere(tmp_path, capsys):
    """Regression (issue 18): the ``abnormal`` head of a multi-task run was evaluated at 0.5.
    Now its threshold is chosen on validation (Youden's J, checked against scikit-learn's
    ROC curve of the saved model on the validation split) and it is the one used in
    metrics.json, predictions.csv (probabilities and a decision column per head), the HTML
    report (with a per-class table for the softmax head too), the model card and
    ``kfundus predict``."""
    import json

    import pandas as pd
    from sklearn.metrics import roc_curve

    from kfundus.cli import main
    from kfundus.data.images import Preprocess
    from kfundus.data.pipeline import prepare
    from kfundus.evaluation.predict import predict_outputs
    from kfundus.run import RunFolder
    from kfundus.systems import load_model

    data = make_dr(tmp_path / "data", n_patients=36, size=48, seed=3, shares=(0.4, 0.15, 0.2, 0.15, 0.1))
    settings = [
        f"output_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", f"export.dir={tmp_path / 'bundles'}",
        "data.image_size=32", "model.options.depth=2", "model.options.width=8", "train.epochs=2",
        "data.split.val=0.3", "data.split.test=0.25", "export.formats=[keras]",
    ]  # fmt: skip
    args = ["train", "--config", FUNDUS, "--data", str(data)] + [x for kv in settings for x in ("--set", kv)]
    assert main(args) == 0
    run = RunFolder(tmp_path / "runs" / FUNDUS)
    rules = json.loads((run / "thresholds.json").read_text())["heads"]
    assert rules["dr_grade"] == {"task": "multiclass", "labels": DR_GRADES, "decision": "argmax"}
    assert rules["abnormal"]["task"] == "binary" and rules["abnormal"]["labels"] == ["abnormal"]
    (t,) = rules["abnormal"]["thresholds"]
    # independently: Youden's J of the saved model's abnormal head on the validation split
    config = run.read_config()
    val = prepare(run.split_manifest("val"), Preprocess.from_config(config.data), cache_dir=config.data.cache_dir)
    p = predict_outputs(load_model(run.model_file), val, 8)["abnormal"][:, 0]
    truth = (val.manifest.frame["no_dr"].to_numpy() == 0).astype(int)
    fpr, tpr, _ = roc_curve(truth, p)
    decided = p > t
    j = decided[truth == 1].mean() - decided[truth == 0].mean()
    assert j == pytest.approx(np.max(tpr - fpr)) and t != 0.5

    assert main(["evaluate", "--run", str(run), "--split", "test"]) == 0
    metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    head = metrics["heads"]["abnormal"]
    assert head["thresholds"] == [t] and head["threshold_source"].startswith("validation")
    predictions = pd.read_csv(run / "eval-test" / "predictions.csv")
    assert (predictions["pred_abnormal"] == (predictions["prob_abnormal"] > t).astype(int)).all()
    assert (predictions["true_abnormal"] == 1 - predictions["true_no_dr"]).all()
    grades = predictions[[f"prob_{g}" for g in DR_GRADES]].to_numpy()
    assert predictions["prediction"].tolist() == [DR_GRADES[k] for k in grades.argmax(axis=1)]
    positives, decided = predictions["true_abnormal"] == 1, predictions["pred_abnormal"] == 1
    if positives.any():
        assert head["sensitivity"] == pytest.approx((decided & positives).sum() / positives.sum())
    page = (run / "eval-test" / "report.html").read_text()
    assert "Head abnormal" in page and "recall" in page and "proliferative" in page  # the softmax head's table
    assert "What was evaluated" in page and str(data) in page and "model.keras" in page

    assert main(["export", "--run", str(run)]) == 0
    bundle = tmp_path / "bundles" / FUNDUS
    card = json.loads((bundle / "model_card.json").read_text())
    assert card["thresholds"]["heads"]["abnormal"]["thresholds"] == [t]
    assert card["metrics"]["test"]["heads"]["abnormal"]["auroc"] == head["auroc"]
    provenance = {
        k: card["metrics"]["test"][k] for k in ("data", "split", "model_file", "kfundus_version", "evaluated")
    }
    assert provenance == {k: metrics[k] for k in provenance} and provenance["split"] == "test"
    images = tmp_path / "new"
    images.mkdir()
    for path in predictions["image"][:4]:
        (images / Path(path).name).write_bytes(Path(path).read_bytes())
    table = (
        pd.read_csv(tmp_path / "out.csv")
        if main(["predict", "--bundle", str(bundle), "--images", str(images), "--out", str(tmp_path / "out.csv")]) == 0
        else None
    )
    assert table is not None and (table["status"] == "ok").all()
    assert (table["pred_abnormal"] == (table["prob_abnormal"] > t).astype(int)).all()
    assert set(table["prediction"]) <= set(DR_GRADES)
