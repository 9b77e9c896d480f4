"""End to end, as a user runs it: train.py -> evaluate.py -> export, on synthetic ODIR data."""

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from kfundus.cli import main
from kfundus.config import load_config
from kfundus.data.synthetic import make_odir
from kfundus.deploy.tflite import run_tflite
from kfundus.engine import training as engine_fit
from kfundus.workflows.supervised import make_splits, train
from tests.conftest import train_args

CONFIG = "demo_synthetic"


def test_run_folder_and_patient_level_splits(trained):
    _, _, run, _ = trained
    for name in [
        "config.yaml",
        "run.json",
        "splits.csv",
        "best.weights.h5",
        "model.keras",
        "history.csv",
        "thresholds.json",
        "training_curves.png",
        "tensorboard",
    ]:
        assert (run / name).exists(), name
    splits = pd.read_csv(run / "splits.csv", dtype={"patient_id": str})
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    assert set(splits["split"]) == {"train", "val", "test"}


def test_model_learns_and_evaluation_report(trained):
    out, data, run, _ = trained
    report = run / "eval-test"
    metrics = json.loads((report / "metrics.json").read_text())
    per_class = {row["label"]: row for row in metrics["per_class"]}
    assert per_class["C"]["support"] >= 5
    assert per_class["C"]["auroc"] > 0.9, per_class  # the synthetic cataract haze is learned
    for name in [
        "predictions.csv",
        "per_class.csv",
        "roc.png",
        "pr.png",
        "confusion.png",
        "report.html",
        "gallery_N.png",
        "gallery_C.png",
    ]:
        assert (report / name).stat().st_size > 0, name
    assert "gallery_C.png" in (report / "report.html").read_text()
    # the predictions file lines up with the test split
    predictions = pd.read_csv(report / "predictions.csv")
    splits = pd.read_csv(run / "splits.csv")
    assert sorted(predictions["image"]) == sorted(splits.loc[splits["split"] == "test", "image"])


def test_export_bundle_matches_keras(trained):
    out, _, run, bundle = trained
    assert (bundle / "labels.txt").read_text().split() == ["N", "C"]
    info = json.loads((bundle / "model_card.json").read_text())
    assert info["tflite"]["float32"]["flex_ops"] == [] and info["parity"]["inputs"] == "sample images"
    assert max(info["parity"]["tflite_max_abs_diff"].values()) <= 1e-4
    model = keras.saving.load_model(run / "model.keras")
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    lite = run_tflite(bundle / "model.tflite", {"image": x})["probabilities"]
    np.testing.assert_allclose(lite, np.asarray(model(x)), atol=1e-4)


def test_unreadable_image_is_named_then_skipped_and_training_resumes(tmp_path, monkeypatch, capsys):
    data = make_odir(tmp_path / "data", n_patients=24, size=48, seed=2, write_masks=False)
    victim = data / "images" / "3_left.jpg"
    victim.write_bytes(victim.read_bytes()[:200])  # truncated
    small = [
        "--set",
        "data.image_size=32",
        "--set",
        "train.epochs=3",
        "--set",
        "data.labels=[N]",
        "--set",
        "export.formats=[]",
    ]
    assert main(train_args(data, tmp_path, *small)) == 2
    err = capsys.readouterr().err
    assert "3_left.jpg" in err and "skip_unreadable" in err

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("simulated crash after epoch 2")

    original = engine_fit.make_callbacks
    monkeypatch.setattr(engine_fit, "make_callbacks", lambda *a, **k: original(*a, **k) + [Interrupt()])
    skip = small + ["--set", "data.skip_unreadable=true"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(train_args(data, tmp_path, *skip))
    monkeypatch.setattr(engine_fit, "make_callbacks", original)
    assert main(train_args(data, tmp_path, *skip)) == 0
    run = tmp_path / "runs" / "demo_synthetic"
    # a finished run is not silently mixed with a new one
    assert main(train_args(data, tmp_path, *skip)) == 2
    assert "--overwrite" in capsys.readouterr().err
    # resumed at the third epoch: each epoch logged once, none repeated
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [0, 1, 2]
    skipped = pd.read_csv(run / "skipped.csv")
    assert skipped["path"].str.endswith("3_left.jpg").tolist() == [True]
    assert "3_left.jpg" not in {Path(p).name for p in pd.read_csv(run / "splits.csv")["image"]}
    shutil.rmtree(tmp_path / "cache")


def test_mixed_precision_run_keeps_float32_outputs_and_restores_policy(tmp_path):
    data = make_odir(tmp_path / "data", n_patients=16, size=48, seed=3, write_masks=False)
    config = load_config(
        CONFIG,
        [
            "train.epochs=1",
            "data.image_size=32",
            "data.labels=[N]",
            "train.mixed_precision=true",
            f"output_dir={tmp_path / 'runs'}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    run = train(config, str(data))
    assert keras.mixed_precision.global_policy().name == "float32"  # not leaked to the caller
    model = keras.saving.load_model(run / "model.keras")
    assert model.get_layer("efficientnetb0").get_layer("stem_conv").dtype_policy.name == "mixed_float16"
    assert model.get_layer("probabilities").dtype_policy.name == "float32"
    out = model(np.zeros((1, 32, 32, 3), "float32"))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"


def test_rfmid_official_split_and_weighted_loss(tmp_path, capsys):
    from kfundus.data.synthetic import make_rfmid

    data = make_rfmid(tmp_path / "rfmid", n_images=40, size=48, seed=0, write_masks=False)
    args = [
        "train",
        "--config",
        "rfmid_efficientnet_b0",
        "--data",
        str(data),
        "--set",
        "model.weights=null",
        "--set",
        "train.mixed_precision=false",
        "--set",
        "data.image_size=32",
        "--set",
        "train.epochs=1",
        "--set",
        "export.formats=[]",
        "--set",
        f"output_dir={tmp_path / 'runs'}",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    # the 46-column view of this small set has classes without any training positive
    assert main(args) == 2
    assert "no positive example in the training split" in capsys.readouterr().err
    labels = "data.labels=[Disease_Risk, DR, ODC, MH]"
    assert main(args + ["--set", 'data.options={view: "29"}', "--set", labels, "--set", "train.loss=weighted_bce"]) == 0
    run = tmp_path / "runs" / "rfmid_efficientnet_b0"
    splits = pd.read_csv(run / "splits.csv")
    folder_split = splits["image"].map(lambda p: Path(p).parent.name)
    expected = folder_split.map({"Training": "train", "Validation": "val", "Testing": "test"})
    assert (splits["split"] == expected).all()  # the official split, untouched
    model = keras.saving.load_model(run / "model.keras")
    assert model.loss.pos_weight and len(model.loss.pos_weight) == 4


@pytest.mark.parametrize("checkpoint", ["best", "last"])
def test_checkpoint_option_picks_best_or_last_epoch(tmp_path, monkeypatch, checkpoint):
    """``train.checkpoint``: model.keras holds the best epoch's weights (best.weights.h5) or the
    final epoch's, shown by re-scoring model.keras on validation against history.csv.

    The ``last`` run also averages its weights (``train.ema``; one training run for both
    options keeps the suite short): model.keras must then be the exponential moving average
    of the raw weights after each step, recomputed here in numpy, and validation must have
    scored those averaged weights (the history check above)."""
    from kfundus.data.pipeline import Preprocess, make_dataset, prepare
    from kfundus.data.readers import load_dataset

    make_callbacks = engine_fit.make_callbacks
    momentum, raw = 0.8, []

    class Recorder(keras.callbacks.Callback):  # the raw weights the optimizer just produced
        def on_train_batch_end(self, batch, logs=None):
            raw.append([v.numpy().copy() for v in self.model.trainable_variables])

    def first_epoch_is_best(*args, **kwargs):  # fix the best epoch: the checkpoint only ever saves epoch 1
        callbacks = make_callbacks(*args, **kwargs)
        saver = next(c for c in callbacks if isinstance(c, keras.callbacks.ModelCheckpoint))
        saver.monitor_op = lambda current, best: False  # epoch 1 is saved (nothing to compare with), no other
        return callbacks + [Recorder()]

    monkeypatch.setattr(engine_fit, "make_callbacks", first_epoch_is_best)
    data = make_odir(tmp_path / "data", n_patients=24, size=48, seed=3, write_masks=False)
    ema = [f"train.ema={momentum}"] if checkpoint == "last" else []
    config = load_config(
        CONFIG,
        [
            "train.epochs=3",
            "data.image_size=32",
            "data.labels=[N, C]",
            f"train.checkpoint={checkpoint}",
            f"output_dir={tmp_path / 'runs'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            *ema,
        ],
    )
    run = train(config, str(data))
    history = pd.read_csv(run / "history.csv")
    splits = make_splits(load_dataset(config.data, str(data)), config)
    val = make_dataset(
        prepare(splits["val"], Preprocess.from_config(config.data), cache_dir=config.data.cache_dir, progress=False),
        batch_size=config.train.batch_size,
    )
    model = keras.saving.load_model(run / "model.keras")
    loss = model.evaluate(val, verbose=0, return_dict=True)["loss"]
    epoch = 0 if checkpoint == "best" else len(history) - 1
    assert loss == pytest.approx(history["val_loss"].iloc[epoch], rel=1e-4)
    assert not np.isclose(history["val_loss"].iloc[0], history["val_loss"].iloc[-1], rtol=1e-3)  # epochs differ
    best = keras.saving.load_model(run / "model.keras")
    best.load_weights(run / "best.weights.h5")
    same = all(np.array_equal(a, b) for a, b in zip(model.get_weights(), best.get_weights()))
    assert same == (checkpoint == "best")
    if checkpoint == "last":
        average = [w.astype(np.float64) for w in raw[0]]  # Keras starts the average at the first step's weights
        for weights in raw[1:]:
            average = [momentum * a + (1 - momentum) * w for a, w in zip(average, weights)]
        assert len(raw) >= 6 and len(model.trainable_variables) == len(average)
        for got, want in zip(model.trainable_variables, average):
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)
        assert max(np.abs(v.numpy() - w).max() for v, w in zip(model.trainable_variables, raw[-1])) > 1e-3
