"""Tests of kfundus.explain: Grad-CAM against independent computations (finite differences,
the closed form of a GAP + linear head), mixed precision, localisation measured on
synthetic lesion masks for a model that learned them, the randomisation sanity check,
overlays and the command line."""

import re
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from kfundus.data.images import Preprocess, preprocess_image
from kfundus.data.synthetic import make_odir
from kfundus.errors import ConfigError, DataError
from kfundus.explain import cam as explain
from kfundus.explain import saliency
from kfundus.labels import odir_keywords_to_labels

LABELS = ["D", "G", "A"]
SIZE = 64  # model input; the images are rendered at 96 px, so masks go through a resize


def small_cnn(size=SIZE, outputs=len(LABELS), name="small_cnn"):
    """Three Conv+BN+ReLU blocks (the last activation named ``last_conv``, a 16x16 map at
    64 px), global average pooling, ``logits`` and ``probabilities`` as kfundus models have.
    Inputs in [0, 255] are scaled by 1/255 so the black fundus border equals the zero padding."""
    inputs = keras.Input((size, size, 3), name="image")
    h = keras.layers.Rescaling(1 / 255.0)(inputs)
    for i, filters in enumerate((16, 32, 64)):
        h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = keras.layers.BatchNormalization(momentum=0.9)(h)
        h = keras.layers.Activation("relu", name="last_conv" if i == 2 else None)(h)
        if i < 2:
            h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    logits = keras.layers.Dense(outputs, name="logits", dtype="float32")(h)
    probabilities = keras.layers.Activation("sigmoid", name="probabilities", dtype="float32")(logits)
    return keras.Model(inputs, probabilities, name=name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic ODIR data favouring D, G, A, and a small CNN trained on 70 % of it."""
    from sklearn.metrics import roc_auc_score

    root = make_odir(
        tmp_path_factory.mktemp("odir"),
        n_patients=160,
        size=96,
        seed=0,
        prevalence={"N": 0.2, "D": 0.5, "G": 0.4, "A": 0.5, "C": 0, "H": 0, "M": 0, "O": 0},
    )
    table = pd.read_csv(root / "annotation.csv")
    paths, y = [], []
    for row in table.itertuples(index=False):
        for side, cell in (("left", row[5]), ("right", row[6])):
            paths.append(root / "images" / f"{row.ID}_{side}.jpg")
            found = odir_keywords_to_labels(cell)
            y.append([found[k] for k in LABELS])
    y = np.asarray(y, dtype=np.float32)
    pre = Preprocess(image_size=SIZE)
    # read independently of kfundus.explain.load_images
    x = np.stack([preprocess_image(tf.io.read_file(str(p)), pre).numpy() for p in paths])
    n_train = 224  # 112 patients; a patient's two eyes stay on one side
    keras.utils.set_random_seed(0)
    model = small_cnn()
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.BinaryCrossentropy())
    model.fit(x[:n_train], y[:n_train], epochs=30, batch_size=16, verbose=0)
    scores = model.predict(x[n_train:], verbose=0)
    auroc = {k: roc_auc_score(y[n_train:, i], scores[:, i]) for i, k in enumerate(LABELS)}
    print("held-out AUROC", {k: round(v, 3) for k, v in auroc.items()})
    return dict(root=root, paths=paths, x=x, y=y, n_train=n_train, model=model, pre=pre, auroc=auroc)


# ---------------------------------------------------------------------------
# Grad-CAM against independent computations


def test_gradcam_equals_finite_difference_reference():
    """A flat model with a non-linear head (1x1 conv + tanh, GAP, dense, softmax), Grad-CAM at
    an inner layer: the reference takes d logit / d activation by central differences of the
    head rewritten in float64 NumPy from the layer weights (no GradientTape, no Keras graph).
    (tanh, not ReLU: at a dead pixel a ReLU sits exactly on its kink, where central
    differences give half the slope and TF's gradient 0.)"""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((16, 16, 3), name="image")
    feat = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="feat")(inputs)
    mix = keras.layers.Conv2D(6, 1, activation="tanh", name="mix")(feat)
    logits = keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(mix))
    model = keras.Model(inputs, keras.layers.Activation("softmax", name="probabilities")(logits))
    x = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)).astype("float32")
    classes = [2, 0]
    assert explain.find_target_layer(model)[1].name == "mix"  # the last 4-D layer by default
    got = explain.gradcam(model, x, classes, layer="feat")

    activations = keras.Model(inputs, feat)(x).numpy().astype(np.float64)  # (2, 8, 8, 4)
    w_mix, b_mix = (v.astype(np.float64) for v in model.get_layer("mix").get_weights())
    w_out, b_out = (v.astype(np.float64) for v in model.get_layer("logits").get_weights())

    def head(a, c):  # a: (batch, 8, 8, 4) -> logit c
        hidden = np.tanh(a @ w_mix[0, 0] + b_mix)
        return hidden.mean(axis=(1, 2)) @ w_out[:, c] + b_out[c]

    eps = 1e-6
    for i, c in enumerate(classes):
        a = activations[i]
        steps = np.eye(a.size).reshape(a.size, *a.shape) * eps
        grads = ((head(a + steps, c) - head(a - steps, c)) / (2 * eps)).reshape(a.shape)
        cam = np.maximum((a * grads.mean(axis=(0, 1))).sum(-1), 0)
        cam = tf.image.resize(cam[..., None], (16, 16), method="bilinear").numpy()[..., 0]
        assert cam.max() > 0 and (cam == 0).mean() < 0.9
        np.testing.assert_allclose(got[i], cam / cam.max(), atol=1e-4)
    assert got.dtype == np.float32 and got.shape == (2, 16, 16)


def test_gradcam_nested_efficientnet_equals_cam_closed_form():
    """kfundus EfficientNet-B0 (backbone nested as one layer). With GAP + a linear head the
    Grad-CAM weights are W[:, c] / (h*w), so the map is ReLU(A @ W[:, c]) (Zhou et al.'s CAM)."""
    from kfundus.systems.efficientnet.model import build_efficientnet_b0

    keras.utils.set_random_seed(1)
    model = build_efficientnet_b0(2, image_size=96)
    backbone, layer = explain.find_target_layer(model)
    assert (backbone.name, layer.name) == ("efficientnetb0", "top_activation")
    x = np.random.default_rng(1).uniform(0, 255, (3, 96, 96, 3)).astype("float32")
    explainer = explain.GradCAM(model)  # traced once, used for both classes
    for c in (0, 1):
        got = explainer(x, c)
        assert got.shape == (3, 96, 96) and got.dtype == np.float32
        assert np.isfinite(got).all() and got.min() >= 0 and got.max() <= 1
        features = model.get_layer("efficientnetb0")(x, training=False).numpy()  # (3, 3, 3, 1280)
        weights = model.get_layer("logits").kernel.numpy()[:, c]
        cam = np.maximum(features @ weights, 0)
        cam = tf.image.resize(cam[..., None], (96, 96), method="bilinear").numpy()[..., 0]
        peak = cam.max(axis=(1, 2), keepdims=True)
        assert (peak > 0).any()
        expected = np.where(peak > 0, cam / np.where(peak > 0, peak, 1), 0)
        np.testing.assert_allclose(got, expected, atol=1e-4)
    for name in ("efficientnetb0/top_activation", "top_activation", "efficientnetb0"):
        assert explain.find_target_layer(model, name) == (backbone, layer)
    with pytest.raises(ConfigError, match="not in model"):
        explain.gradcam(model, x, 0, layer="no_such_layer")
    with pytest.raises(ConfigError, match="out of range"):
        explain.gradcam(model, x, 2)


def test_two_eye_models_are_refused_clearly():
    left, right = keras.Input((16, 16, 3), name="left_image"), keras.Input((16, 16, 3), name="right_image")
    conv = keras.layers.Conv2D(2, 3)
    pooled = [keras.layers.GlobalAveragePooling2D()(conv(t)) for t in (left, right)]
    model = keras.Model([left, right], keras.layers.Dense(1, name="logits")(keras.layers.Concatenate()(pooled)))
    with pytest.raises(ConfigError, match="two-eye"):
        explain.GradCAM(model)


def test_mixed_precision_maps_are_float32_and_match_float32_model(trained):
    """The trained weights in a mixed_float16 copy: the activation is float16, the maps are
    finite float32 and agree with the float32 model's."""
    x = trained["x"][trained["n_train"] :][:24]
    reference = explain.gradcam(trained["model"], x, 1)
    previous = keras.mixed_precision.global_policy().name
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        half = small_cnn(name="half")
        half.set_weights(trained["model"].get_weights())
        assert half.get_layer("last_conv").output.dtype == "float16"
        maps = explain.gradcam(half, x, 1)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert maps.dtype == np.float32 and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1 and (maps.max(axis=(1, 2)) == 1).all()
    difference = np.abs(maps - reference)
    print(f"mixed_float16 vs float32 maps: mean |diff| {difference.mean():.5f}, max {difference.max():.4f}")
    assert difference.mean() < 0.01 and difference.max() < 0.1, (difference.mean(), difference.max())


# ---------------------------------------------------------------------------
# Localisation


def test_localisation_metrics_by_hand():
    cams = np.zeros((2, 10, 10))
    cams[0, 2, 2] = 1.0  # one hot pixel, 3 px left of the mask
    cams[1] = 1.0  # flat: energy share = area share
    cams[1, 7, 7] = 3.0
    masks = np.zeros((2, 10, 10))
    masks[0, 2, 5:7] = 1.0
    masks[1, 6:8, 6:9] = 1.0
    masks[1, 0, 0] = 0.5  # fractional edge pixel
    strict = saliency.localisation(cams, masks)
    energy1 = (5 * 1 + 1 * 3 + 0.5 * 1) / (99 + 3)
    area = [2 / 100, 6.5 / 100]
    assert strict["energy_in_mask"] == pytest.approx((0 + energy1) / 2)
    assert strict["area_share"] == pytest.approx(np.mean(area))
    assert strict["ratio"] == pytest.approx(strict["energy_in_mask"] / strict["area_share"])
    assert strict["pointing_game"] == 0.5 and strict["n"] == 2
    assert saliency.localisation(cams, masks, tolerance=2)["pointing_game"] == 0.5
    assert saliency.localisation(cams, masks, tolerance=3)["pointing_game"] == 1.0
    empty = saliency.localisation(np.zeros((1, 4, 4)), np.ones((1, 4, 4)))
    assert empty["energy_in_mask"] == 0 and empty["pointing_game"] == 0 and empty["empty_maps"] == 1


def test_learned_lesions_are_localised(trained):
    """The issue's bar on held-out positives: CAM energy inside the lesion masks >= 3x the
    share of image area they cover, for a model that learned the labels (AUROC > 0.9)."""
    held_out = trained["paths"][trained["n_train"] :]
    assert all(v > 0.9 for v in trained["auroc"].values()), trained["auroc"]
    report = saliency.localisation_report(
        trained["model"], trained["root"], LABELS, trained["pre"], images=held_out, tolerance=0
    ).set_index("label")
    tolerant = saliency.localisation_report(
        trained["model"], trained["root"], LABELS, trained["pre"], images=held_out, tolerance=3
    ).set_index("label")
    report["pointing_game_3px"] = tolerant["pointing_game"]
    print("\n" + report.round(3).to_string())
    y = trained["y"][trained["n_train"] :]
    assert report["images"].to_dict() == {k: int(y[:, i].sum()) for i, k in enumerate(LABELS)}
    for label in LABELS:
        row = report.loc[label]
        assert row["images"] >= 20 and row["empty_maps"] == 0
        assert row["energy_in_mask"] >= 3 * row["area_share"], (label, row.to_dict())
        # far above chance: a random point hits a 3-px-dilated mask of ~2 % area < 10 % of the time
        assert row["pointing_game_3px"] >= 0.5, (label, row.to_dict())
    # whole-field findings are left out by default
    all_labels = ["N", "D", "C", "G"]
    assert list(
        saliency.localisation_report(
            small_cnn(outputs=4), trained["root"], all_labels, trained["pre"], images=held_out[:2]
        )["label"]
    ) == ["D", "G"]


def test_randomised_model_gives_different_maps(trained):
    """Adebayo et al. (2018): maps of the trained model against the re-initialised network,
    averaged over 8 re-initialisations. Measured over 6 seeds of those 8: mean Spearman
    0.06-0.33 (D), 0.00-0.14 (G), 0.07-0.18 (A); a single draw ranged -0.3 to 0.7 for D,
    whose red and yellow dots are the strongest local contrasts even for random filters."""
    x, y = trained["x"][trained["n_train"] :], trained["y"][trained["n_train"] :]
    for c, label in enumerate(LABELS):
        result = saliency.randomisation_check(trained["model"], x[y[:, c] == 1], c, repeats=8, seed=c)
        print(
            label,
            "mean Spearman trained vs randomised:",
            round(result["mean_spearman"], 3),
            "undefined:",
            result["n_undefined"],
            "of",
            result["spearman"].size,
        )
        assert result["spearman"].shape == (8, int(y[:, c].sum()))
        assert result["n_undefined"] <= result["spearman"].size // 2
        assert result["mean_spearman"] < 0.5, (label, result["mean_spearman"])
        # each clone really is re-initialised
        kernels = [m.get_layer("logits").kernel.numpy() for m in result["random_models"]]
        trained_kernel = trained["model"].get_layer("logits").kernel.numpy()
        assert not any(np.allclose(k, trained_kernel) for k in kernels)
        assert not np.allclose(kernels[0], kernels[1])


# ---------------------------------------------------------------------------
# Overlays and the command line


def test_overlay_colours():
    image = np.full((4, 4, 3), 100, np.uint8)
    cam = np.zeros((4, 4))
    cam[0, 0] = 1.0
    assert np.array_equal(explain.overlay(image, cam, alpha=0.0), image)
    full = explain.overlay(image, cam, alpha=1.0)
    assert tuple(full[0, 0]) == (128, 0, 0) and tuple(full[1, 1]) == (0, 0, 128)  # jet: dark red, dark blue
    assert explain.overlay(image, np.ones((2, 2))).shape == (4, 4, 3)


def test_save_overlays_predicted_and_chosen(trained, tmp_path):
    paths = trained["paths"][trained["n_train"] :][:10]
    # the model's input is 8-bit, as in training and serving: the fixture's x rounded
    probs = trained["model"].predict(np.round(trained["x"][trained["n_train"] :][:10]), verbose=0)
    table = explain.save_overlays(
        trained["model"],
        paths,
        tmp_path / "pred",
        labels=LABELS,
        preprocess=trained["pre"],
        threshold=0.5,
        batch_size=4,
        progress=False,
    )
    expected = {(str(p), k) for p, row in zip(paths, probs) for k, v in zip(LABELS, row) if v > 0.5}
    assert set(zip(table["image"], table["label"])) == expected and len(table) == len(expected)
    for row in table.itertuples(index=False):
        p = probs[[str(q) for q in paths].index(row.image), LABELS.index(row.label)]
        assert row.probability == pytest.approx(p, abs=1e-6)
        assert re.fullmatch(rf"\d+_(left|right)__{row.label}_{p:.2f}\.png", row.file.split("/")[-1])
        with Image.open(row.file) as png:
            png.verify()
        with Image.open(row.file) as png:
            assert png.format == "PNG" and png.width > 2 * png.height * 0.9
    chosen = explain.save_overlays(
        trained["model"],
        paths[:3],
        tmp_path / "g",
        labels=LABELS,
        preprocess=trained["pre"],
        classes=["G"],
        progress=False,
    )
    assert list(chosen["label"]) == ["G"] * 3 and all("__G_" in f for f in chosen["file"])
    with pytest.raises(ConfigError, match="not one of"):
        explain.save_overlays(
            trained["model"], paths[:1], tmp_path / "x", labels=LABELS, preprocess=trained["pre"], classes=["Q"]
        )
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a JPEG")
    with pytest.raises(DataError, match="broken.jpg"):
        explain.save_overlays(
            trained["model"],
            [paths[0], bad],
            tmp_path / "x",
            labels=LABELS,
            preprocess=trained["pre"],
            classes="G",
            progress=False,
        )


def test_main_explain_with_a_run_folder(trained, tmp_path, capsys):
    from kfundus.cli import main
    from kfundus.config import Config
    from kfundus.run import RunFolder

    run = RunFolder(tmp_path / "run").start()
    trained["model"].save(run.model_file)
    config = Config()
    config.data.image_size = SIZE
    run.write_config(config)
    run.write_info({"labels": LABELS, "image_size": SIZE})
    run.write_thresholds(LABELS, [0.5] * len(LABELS), None)
    images = tmp_path / "images"
    images.mkdir()
    for p in trained["paths"][-4:]:
        (images / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    assert main(["explain", "--run", str(run), "--images", str(images), "--out", str(out), "--classes", "G,A"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "8 Grad-CAM overlay(s) for 4 image(s)" in printed
    index = pd.read_csv(out / "overlays.csv")
    assert len(index) == 8 and sorted(set(index["label"])) == ["A", "G"]
    assert len(list(out.glob("*.png"))) == 8
    assert main(["explain", "--run", str(run), "--images", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "--images" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Explanations on exactly the model's input, per eye for two-eye models, localisation from the CLI


def _run_folder(model, root, tmp_path):
    """A finished eye-level run folder around the module's trained CNN: config, run.json,
    splits.csv (patients < 112 train, the rest test: the fixture's own split), thresholds."""
    from kfundus.config import load_config
    from kfundus.data.readers import load_dataset
    from kfundus.run import RunFolder

    config = load_config(
        "demo_synthetic",
        [
            f"data.path={root}",
            f"data.labels=[{', '.join(LABELS)}]",
            f"data.image_size={SIZE}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    run = RunFolder(tmp_path / "run").start()
    model.save(run.model_file)
    run.write_config(config)
    frame = load_dataset(config.data).frame
    run.write_splits(frame.assign(split=np.where(frame["patient_id"].astype(int) < 112, "train", "test")))
    info = {"labels": LABELS, "task": "multilabel", "level": "eye", "image_size": SIZE, "source": "odir"}
    run.write_info({**info, "data_path": str(root), "data_root": str(root)})
    run.write_thresholds(LABELS, [0.5] * len(LABELS), None)
    return run, config


def test_caption_probability_is_evaluate_probability_and_localisation_from_the_cli(trained, tmp_path, capsys):
    """Regression (issue 18): Grad-CAM read images unrounded while training, evaluation and
    serving feed 8-bit values, so an explanation's caption disagreed with predictions.csv.
    Now ``kfundus explain`` captions the probability ``kfundus evaluate`` reports, to 1e-6
    (without the rounding the difference here is larger, checked below). The run's data
    has lesion masks, so the same command measures localisation (localisation.csv/.png),
    equal to ``localisation_report`` on the test split, with the counts of held-out
    eyes that have each lesion."""
    from kfundus.cli import main
    from kfundus.data.images import Preprocess
    from kfundus.evaluation import evaluate_run

    run, config = _run_folder(trained["model"], trained["root"], tmp_path)
    evaluate_run(run, split="test", gallery=False)
    predictions = pd.read_csv(run / "eval-test" / "predictions.csv").set_index("image")
    out = tmp_path / "explain"
    command = ["explain", "--run", str(run), "--split", "test", "--classes", "G", "--out", str(out), "--tolerance", "3"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    overlays = pd.read_csv(out / "overlays.csv")
    assert len(overlays) == len(predictions) == len(trained["paths"]) - trained["n_train"]
    got = overlays.set_index("image")["probability"]
    assert np.abs(got - predictions.loc[got.index, "prob_G"]).max() <= 1e-6
    # the unrounded input (what explanations read before) gives other probabilities
    pre = Preprocess.from_config(config.data)
    raw = np.stack([preprocess_image(tf.io.read_file(p), pre).numpy() for p in got.index])
    unrounded = trained["model"].predict(raw, verbose=0)[:, LABELS.index("G")]
    assert np.abs(unrounded - got.to_numpy()).max() > 1e-5

    assert "localisation on the lesion masks" in printed and (out / "localisation.png").stat().st_size > 0
    table = pd.read_csv(out / "localisation.csv")
    direct = saliency.localisation_report(
        trained["model"], trained["root"], LABELS, pre, classes=["G"], images=list(got.index), tolerance=3
    )
    pd.testing.assert_frame_equal(table, direct, check_dtype=False)
    held_out = trained["y"][trained["n_train"] :]
    assert table["images"].tolist() == [int(held_out[:, LABELS.index("G")].sum())]
    assert table["ratio"].iloc[0] >= 3 and table["pointing_game"].iloc[0] >= 0.5  # a learned lesion
    assert main(command[:-2] + ["--masks", str(tmp_path)]) == 2
    assert "--masks" in capsys.readouterr().err


def _clip_pair(two_eye, weights=None):
    from kfundus.systems.clip_lora.model import build_clip_lora

    tiny = dict(patch_size=8, hidden_dim=32, num_layers=2, num_heads=2, intermediate_dim=64)
    keras.utils.set_random_seed(7)
    model = build_clip_lora(2, image_size=32, encoder_config=tiny, two_eye=two_eye, lora_rank=0, dropout=0)
    if weights is not None:
        model.get_layer("encoder").set_weights(weights)
    return model


@pytest.mark.parametrize("family", ["clip", "efficientnet"])
def test_two_eye_maps_are_each_eyes_share_of_the_patient_logit(family):
    """A two-eye model's logit is W_left f(left) + W_right f(right) + b, so its map for one
    eye must be the map of a single-eye model with the same backbone and head W_eye (the
    single-eye explainers are tested against finite differences and closed forms above).
    Maps are compared each divided by its maximum (the two-eye maps share one maximum)."""
    from kfundus.systems.efficientnet.model import build_efficientnet_b0

    size = 32 if family == "clip" else 64  # EfficientNet: a 2x2 last feature map at 64 px
    rng = np.random.default_rng(0)
    images = {n: rng.uniform(0, 255, (4, size, size, 3)).astype("float32") for n in ("left_image", "right_image")}
    if family == "clip":
        pair = _clip_pair(True)
        single = _clip_pair(False, pair.get_layer("encoder").get_weights())
    else:
        keras.utils.set_random_seed(3)
        pair = build_efficientnet_b0(2, image_size=size, two_eye=True, dropout=0)
        single = build_efficientnet_b0(2, image_size=size, dropout=0)
        single.get_layer("efficientnetb0").set_weights(pair.get_layer("efficientnetb0").get_weights())
    kernel, bias = pair.get_layer("logits").get_weights()
    half = kernel.shape[0] // 2
    classes = [1, 0, 1, 0]
    maps = explain.GradCAM(pair)(images, classes)
    assert set(maps) == {"left_image", "right_image"}
    peak = np.maximum(maps["left_image"].max(axis=(1, 2)), maps["right_image"].max(axis=(1, 2)))
    # one maximum per patient (0: no positive evidence in either eye, as a random net can have)
    assert np.all((np.abs(peak - 1) < 1e-6) | (peak == 0)) and (peak > 0).any(), peak
    nonzero = 0
    for eye, rows in (("left_image", slice(0, half)), ("right_image", slice(half, None))):
        single.get_layer("logits").set_weights([kernel[rows], bias])
        alone = explain.GradCAM(single)(images[eye], classes)
        both = maps[eye]
        scale = np.where(both.max(axis=(1, 2)) > 0, both.max(axis=(1, 2)), 1)[:, None, None]
        np.testing.assert_allclose(both / scale, alone, atol=2e-4, err_msg=f"{family} {eye}")
        nonzero += int((alone.max(axis=(1, 2)) > 0).sum())
    assert nonzero >= 2  # the comparison is not between empty maps only


def test_two_eye_run_is_explained_per_eye_from_the_cli(tmp_path, capsys):
    """A patient-level CLIP run: the evaluation gallery and ``kfundus explain --split`` give
    one overlay per eye, captioned with the patient's probability as predictions.csv has it;
    the synthetic data's masks give a per-eye localisation table."""
    import json

    from kfundus.cli import main

    data = make_odir(tmp_path / "data", n_patients=30, size=48, seed=2)
    tiny = json.dumps(dict(patch_size=8, hidden_dim=32, num_layers=2, num_heads=2, intermediate_dim=64))
    settings = [
        f"output_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", "model.weights=null",
        f"model.options.encoder_config={tiny.replace(chr(34), '')}", "data.image_size=32", "train.epochs=1",
        "data.split.test=0.3", "export.formats=[]",
    ]  # fmt: skip
    args = ["train", "--config", "odir_clip_lora_shadow", "--data", str(data), "--no-export"]
    assert main(args + [x for kv in settings for x in ("--set", kv)]) == 0
    run = tmp_path / "runs" / "odir_clip_lora_shadow"
    assert main(["evaluate", "--run", str(run), "--split", "test"]) == 0
    assert len(list((run / "eval-test").glob("gallery_*.png"))) == 8
    predictions = pd.read_csv(run / "eval-test" / "predictions.csv")
    out = tmp_path / "explain"
    assert main(["explain", "--run", str(run), "--split", "test", "--classes", "D", "--out", str(out)]) == 0
    assert "one map per eye" in capsys.readouterr().out
    overlays = pd.read_csv(out / "overlays.csv")
    assert sorted(set(overlays["input"])) == ["left_image", "right_image"]
    assert len(overlays) == 2 * len(predictions)
    for eye in ("left", "right"):
        part = overlays[overlays["input"] == f"{eye}_image"].set_index("image")["probability"]
        expected = predictions.set_index(f"{eye}_image").loc[part.index, "prob_D"]
        assert np.abs(part - expected).max() <= 1e-6
        assert all(
            Path(f).name.split("__")[0].endswith(f"_{eye}")
            for f in overlays["file"][overlays["input"] == f"{eye}_image"]
        )
    table = pd.read_csv(out / "localisation.csv")
    assert table["label"].tolist() == ["D"] and table["images"].iloc[0] > 0
