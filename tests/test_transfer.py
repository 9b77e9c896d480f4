"""Foundation-model transfer (kfundus transfer): the CGI-HRDC reader, the linear probe with
its scaler folded into a Dense head, LP vs FT vs LP-FT by k-fold CV on synthetic
hypertensive retinopathy, and the command with a RET-CLIP-style preset backbone."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kfundus.config import BackboneSpec, LinearProbeConfig, load_config
from kfundus.data.readers import load_source
from kfundus.data.readers.hrdc import read_hrdc
from kfundus.data.synthetic.hr import HRDC_IMAGES, HRDC_LABELS, make_hrdc
from kfundus.errors import ConfigError, DataError
from kfundus.workflows.transfer import build_classifier, build_extractor, fit_linear_probe, probe_predict, run_transfer

TINY_CLIP = dict(patch_size=8, hidden_dim=32, num_layers=2, num_heads=2, intermediate_dim=64)
SIZE = 32


def test_hrdc_reader_layout_columns_and_errors(tmp_path):
    data = make_hrdc(tmp_path / "hrdc", n_images=12, size=SIZE, seed=1)
    table = pd.read_csv(data / HRDC_LABELS)
    manifest = load_source("hrdc", data)  # the folder: the table found under 2-Groundtruths
    assert manifest.task == "binary" and manifest.labels == ["Hypertensive"] and len(manifest) == 12
    assert manifest.frame["Hypertensive"].tolist() == table["Hypertensive"].tolist()
    assert all(Path(p).parent == (data / HRDC_IMAGES).resolve() for p in manifest.frame["image"])
    assert manifest.frame["patient_id"].nunique() == 12  # no patient ids: each image its own patient
    # task 2's column name, names without extension, an xlsx-free CSV elsewhere with image_dir
    other = tmp_path / "task2.csv"
    table.assign(Image=table["Image"].str.replace(".png", "", regex=False)).rename(
        columns={"Hypertensive": "Hypertensive Retinopathy"}
    ).to_csv(other, index=False)
    task2 = read_hrdc(other, image_dir=data / HRDC_IMAGES)
    assert task2.labels == ["Hypertensive Retinopathy"]
    assert task2.frame["image"].tolist() == manifest.frame["image"].tolist()
    # errors name the file, row and column, or the option to set
    bad = table.copy()
    bad.loc[3, "Hypertensive"] = 2
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"row 5 of .*bad.csv, column 'Hypertensive'"):
        read_hrdc(tmp_path / "bad.csv", image_dir=data / HRDC_IMAGES)
    table.assign(grade=0, other=1).rename(columns={"Hypertensive": "y"}).to_csv(tmp_path / "two.csv", index=False)
    with pytest.raises(DataError, match="label_column="):
        read_hrdc(tmp_path / "two.csv", image_dir=data / HRDC_IMAGES)
    with pytest.raises(DataError, match="do not exist"):
        read_hrdc(data / HRDC_LABELS, image_dir=tmp_path)


def test_linear_probe_folds_the_scaler_into_a_dense_head():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, [0.5, 4.0, 20.0, 1.0], size=(120, 4)).astype(np.float32)
    y = (x[:, 0] + 0.1 * x[:, 2] + rng.normal(0, 1, 120) > 4.5).astype(int)
    w, b = fit_linear_probe(x, y, LinearProbeConfig(C=0.316))
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.316, class_weight="balanced", max_iter=5000))
    expected = reference.fit(x, y).predict_proba(x)[:, 1]
    np.testing.assert_allclose(probe_predict(x, w, b), expected, atol=1e-5)
    # the Keras solver optimises the same objective: the same probe, up to optimisation error
    wk, bk = fit_linear_probe(x, y, LinearProbeConfig(C=0.316, solver="keras", epochs=400, learning_rate=0.05))
    assert np.max(np.abs(probe_predict(x, wk, bk) - expected)) < 0.03
    # a classifier built with that head computes the probe on the extractor's features
    extractor = build_extractor(BackboneSpec("random", "clip", None, TINY_CLIP), SIZE, seed=1)
    images = rng.uniform(0, 255, (16, SIZE, SIZE, 3)).astype(np.float32)
    feats = extractor.predict(images, verbose=0)
    labels = (feats[:, 0] > np.median(feats[:, 0])).astype(int)
    head = fit_linear_probe(feats, labels, LinearProbeConfig())
    model = build_classifier(extractor, head)
    np.testing.assert_allclose(model.predict(images, verbose=0).ravel(), probe_predict(feats, *head), atol=1e-4)


def test_lp_ft_and_ft_beat_lp_on_frozen_random_features(tmp_path):
    """Synthetic HR whose signal is where lesions are: a frozen random ViT's features are
    poor, fine-tuning learns it; LP-FT starts exactly at the LP solution."""
    data = make_hrdc(tmp_path / "hrdc", n_images=240, size=64, seed=0)
    config = load_config(
        "hr_transfer",
        [
            "data.image_size=32",
            f"data.cache_dir={tmp_path / 'cache'}",
            "transfer.folds=3",
            "data.split.val=0.2",
            f"transfer.backbones=[{{name: random, family: clip, encoder_config: {TINY_CLIP}}}]",
            "train.learning_rate=0.001",
            "train.epochs=20",
            "train.early_stopping=10",
        ],
    )
    summary = run_transfer(config, data, tmp_path / "out")
    out = tmp_path / "out"
    folds = pd.read_csv(out / "folds.csv")
    auroc = summary.set_index("protocol")["auroc_mean"]
    assert auroc["lp"] < 0.85, "frozen random features should be poor on this task"
    assert auroc["ft"] > auroc["lp"] + 0.05 and auroc["lp_ft"] > auroc["lp"] + 0.05, summary
    assert auroc["lp_ft"] > 0.85
    lp_ft = folds[folds["protocol"] == "lp_ft"]
    # LP-FT starts from the LP head: its epoch-0 validation AUROC is the probe's, and it ends no lower
    np.testing.assert_allclose(lp_ft["initial_val_auroc"], lp_ft["lp_val_auroc"], atol=1e-6)
    assert (lp_ft["val_auroc"] >= lp_ft["lp_val_auroc"] - 1e-6).all()
    history = pd.read_csv(out / "histories" / "random_lp_ft_fold0.csv")
    assert history["epoch"].iloc[0] == 0
    assert abs(history["val_auroc"].iloc[0] - lp_ft["lp_val_auroc"].iloc[0]) < 0.03  # Keras' binned AUC
    # folds: test folds partition the images, validation and test never overlap training
    splits = pd.read_csv(out / "splits.csv")
    assert sorted(splits["image"]) == sorted(load_source("hrdc", data).frame["image"])
    assert set(folds["n_train"] + folds["n_val"] + folds["n_test"]) == {240}
    # the table: per-fold rows, mean ± std, markdown and plot
    assert len(folds) == 9 and set(folds["fold"]) == {0, 1, 2}
    for protocol, part in folds.groupby("protocol"):
        row = summary.set_index("protocol").loc[protocol]
        assert row["kappa_mean"] == pytest.approx(part["kappa"].mean())
        assert row["kappa_std"] == pytest.approx(part["kappa"].std(ddof=1))
    text = (out / "summary.md").read_text()
    assert "LP-FT" in text and "±" in text
    assert (out / "comparison.png").stat().st_size > 5000


def test_transfer_command_with_a_retclip_preset(tmp_path):
    import keras
    import keras_hub

    from kfundus.cli import main

    keras.utils.set_random_seed(2)
    encoder = keras_hub.models.CLIPVisionEncoder(**TINY_CLIP, image_shape=(SIZE, SIZE, 3))
    preset = tmp_path / "retclip_preset"
    encoder.save_to_preset(str(preset))
    data = make_hrdc(tmp_path / "hrdc", n_images=40, size=SIZE, seed=3)
    args = [
        "transfer",
        "--config",
        "hr_transfer",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--set",
        "data.image_size=32",
        "--set",
        "transfer.folds=2",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--set",
        f"transfer.backbones=[{{name: retclip, weights: {preset}}}]",
        "--set",
        "transfer.protocols=[lp, lp_ft]",
        "--set",
        "train.epochs=1",
    ]
    assert main(args) == 0
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert summary["backbone"].tolist() == ["retclip", "retclip"]
    assert summary["auroc_mean"].between(0, 1).all()
    cached = list((tmp_path / "cache" / "features").glob("retclip-*.npz"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    assert main(args + ["--overwrite", "--set", "transfer.protocols=[lp]"]) == 0  # features come from the cache
    assert cached[0].stat().st_mtime_ns == stamp
    with np.load(cached[0]) as z:
        assert z["features"].shape == (40, TINY_CLIP["hidden_dim"])
    # configuration errors name the key
    assert main(args + ["--set", "transfer.k=3"]) == 2
    with pytest.raises(ConfigError, match="retclip needs weights"):
        load_config("hr_transfer", ["transfer.backbones=[{name: retclip}]"])
    with pytest.raises(ConfigError, match="protocols"):
        load_config("hr_transfer", ["transfer.protocols=[lp, probe]"])


def test_ft_never_keeps_the_untrained_start_lp_ft_may(tmp_path, monkeypatch):
    """Regression (issue 18): FT must not report its starting network as the best epoch;
    LP-FT's start (the probe) is a candidate, as documented. Forced: both protocols start
    from the same linear-probe head (``build_classifier`` patched for FT), and a learning
    rate of 3 wrecks every trained epoch, so the start scores higher on validation than
    each of them. FT must still keep a trained epoch (>= 1); LP-FT keeps epoch 0, and its
    kept model is the probe (same validation AUROC)."""
    from kfundus.workflows import transfer

    data = make_hrdc(tmp_path / "hrdc", n_images=80, size=SIZE, seed=4)
    config = load_config(
        "hr_transfer",
        [
            f"data.image_size={SIZE}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "transfer.folds=2",
            "data.split.val=0.3",
            f"transfer.backbones=[{{name: random, family: clip, encoder_config: {TINY_CLIP}}}]",
            "train.learning_rate=3.0",
            "train.warmup_epochs=0",
            "train.epochs=2",
            "train.early_stopping=0",
        ],
    )
    manifest, images, pre = transfer.load_images(transfer.load_task(config, data), config)
    y = manifest.frame[manifest.labels[0]].to_numpy().astype(int)
    fold = transfer.make_folds(manifest, config)[0]
    spec = config.transfer.backbones[0]
    features = transfer.extract_features(spec, manifest, images, pre, cache_dir=tmp_path / "cache")
    probe = fit_linear_probe(features[fold["val"]], y[fold["val"]], config.transfer.linear_probe)
    original = transfer.build_classifier
    monkeypatch.setattr(transfer, "fit_linear_probe", lambda *args, **kwargs: probe)
    monkeypatch.setattr(transfer, "build_classifier", lambda extractor, head=None: original(extractor, head or probe))
    (tmp_path / "h").mkdir()
    rows = {
        p: transfer.run_cell(spec, p, fold, 0, y, images, features, config, tmp_path / "h") for p in ("ft", "lp_ft")
    }
    for protocol in ("ft", "lp_ft"):
        history = pd.read_csv(tmp_path / "h" / f"random_{protocol}_fold0.csv")
        assert history["epoch"].tolist() == [0, 1, 2]
        # the situation is forced: the start beats every trained epoch on validation
        assert history["val_auroc"].iloc[0] > history["val_auroc"].iloc[1:].max(), history
    assert rows["ft"]["best_epoch"] in (1, 2), rows["ft"]
    assert rows["lp_ft"]["best_epoch"] == 0, rows["lp_ft"]
    # LP-FT kept its start: the model it reports scores as the start did (exact AUROC)
    assert rows["lp_ft"]["val_auroc"] == pytest.approx(rows["lp_ft"]["initial_val_auroc"], abs=1e-6)
    assert rows["ft"]["val_auroc"] < rows["ft"]["initial_val_auroc"]  # FT kept a (worse) trained epoch
