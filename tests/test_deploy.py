"""The run users make (conftest ``trained``: train, evaluate, export), end to end: its run
folder and report, then deployment: the bytes serving signature, quantised TFLite variants,
the model card and ``kfundus predict``. Every test of ``trained`` lives in this file, so a
parallel run (pytest-xdist, ``--dist loadfile``) builds it once."""

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from kfundus.cli import main
from kfundus.data.images import Preprocess
from kfundus.data.pipeline import make_dataset, prepare
from kfundus.deploy import saved_model as export
from kfundus.deploy.tflite import TFLITE_FILES, has_flex_ops, run_tflite
from tests.test_pipeline import fundus_like, manifest_of, write

pytestmark = pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")


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


def identity_model(size):
    """Returns its input: what the serving graph feeds the model, made visible."""
    image = keras.Input((size, size, 3), name="image")
    return keras.Model(image, keras.layers.Identity(name="probabilities")(image), name="identity")


def test_bytes_signature_feeds_the_model_what_training_does(tmp_path, request):
    """Same file -> serving_default's model input == the training pipeline's (cache) input."""
    files = []
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(90, 120), (120, 90), (100, 100)]):
        img = fundus_like(h, w, min(h, w) // 2 - 3)
        img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
        files.append(write(tmp_path / f"jpeg{i}.jpg", img, quality=90))
    base = fundus_like(80, 100, 38, value=(200, 120, 60))
    files.append(write(tmp_path / "grey.png", base[..., 0]))
    files.append(write(tmp_path / "rgba.png", np.dstack([base, np.full(base.shape[:2], 255, np.uint8)])))
    sixteen = base[..., 1].astype(np.uint16) * 257
    Image.fromarray(sixteen).save(tmp_path / "sixteen.png")
    files.append(str(tmp_path / "sixteen.png"))
    for name in ("odir_sample", "idrid_grading"):  # a real 400 px JPEG, a 12 MP one (DCT-reduced decode)
        try:
            root = request.getfixturevalue(name)
        except pytest.skip.Exception:
            continue
        files.append(str(sorted((root / "images").rglob("*.jpg"))[0]))

    size = 48
    pre = Preprocess(image_size=size)
    saved = export.export_saved_model(identity_model(size), tmp_path / "sm", preprocess=pre, labels=["r", "g", "b"])
    served = export.run_saved_model(
        saved, {"image_bytes": [Path(f).read_bytes() for f in files]}, signature="serving_default"
    )
    prepared = prepare(manifest_of(files), pre, cache_dir=tmp_path / "cache", progress=False)
    assert len(prepared) == len(files)
    trained_input = np.concatenate(list(make_dataset(prepared, batch_size=4, with_targets=False).as_numpy_iterator()))
    assert served["probabilities"].shape == trained_input.shape == (len(files), size, size, 3)
    assert trained_input.std() > 10  # real pictures, not blank frames
    # exact: same decode, crop, resize and 8-bit rounding (tolerance 0)
    np.testing.assert_array_equal(served["probabilities"], trained_input)
    assert served["labels"].tolist() == [[b"r", b"g", b"b"]] * len(files)


def test_bundle_has_card_and_every_tflite_variant(trained):
    _, _, run, bundle = trained
    card = json.loads((bundle / "model_card.json").read_text())
    assert card["labels"] == ["N", "C"] and card["task"] == "multilabel"
    thresholds = json.loads((run / "thresholds.json").read_text())
    assert card["thresholds"]["values"] == thresholds["thresholds"]
    assert card["preprocessing"]["image_size"] == card["image_size"] == 64
    assert card["preprocessing"]["crop_fundus"] is True
    test_metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert card["metrics"]["test"]["macro_auroc"] == test_metrics["macro_auroc"]
    assert card["metrics"]["validation"]["macro_auroc"] > 0.5
    assert card["data"]["counts"]["train"]["rows"] > 0
    assert card["versions"]["tensorflow"] == tf.__version__
    assert set(card["signatures"]) == {"serving_default", "serving_preprocessed"}

    sizes = {}
    x = np.load(run / "samples.npz")["image"].astype("float32")
    want = np.asarray(keras.saving.load_model(bundle / "model.keras")(x))
    for variant, name in TFLITE_FILES.items():
        path = bundle / name
        sizes[variant] = path.stat().st_size
        assert not has_flex_ops(path), variant
        got = run_tflite(path, {"image": x})["probabilities"]
        assert got.shape == want.shape and np.isfinite(got).all(), variant
        # float32 is the model; the quantized files are approximations (measured max |diff|:
        # float16 1e-3, dynamic int8 0.02; int8 0.18-0.56 on single images across training runs,
        # so int8 is bounded on the mean here and by its validation AUROC below)
        if variant == "int8":
            assert np.abs(got - want).mean() < 0.2 and ((got >= 0) & (got <= 1)).all()
        else:
            tolerance = {"float32": 1e-4, "float16": 1e-2, "dynamic_int8": 0.05}[variant]
            assert np.abs(got - want).max() < tolerance, variant
        assert card["tflite"][variant]["size_bytes"] == sizes[variant]
    assert sizes["int8"] < 0.35 * sizes["float32"] and sizes["float16"] < 0.6 * sizes["float32"]
    interpreter = tf.lite.Interpreter(model_path=str(bundle / TFLITE_FILES["int8"]))
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8  # integer-only from the pixels on
    assert any(d["dtype"] == np.int8 for d in interpreter.get_tensor_details())

    # accuracy per format on the validation split, measured at export
    accuracy = card["accuracy_by_format"]
    assert accuracy["rows"] >= 15
    keras_auroc = accuracy["keras"]["macro_auroc"]
    assert keras_auroc > 0.8
    # Full int8 orders the validation images as Keras does (Spearman, measured 0.92-0.98 per
    # label over runs of this fixture) and loses little AUROC. Its AUROC gap on these 40 images
    # of a 6-epoch model measured 0.004-0.047 across runs (the int8 logits span [-77, 3] here,
    # 0.31 per step), so it is bounded loosely; issue 8's 0.01 is measured by benchmarks/tflite.py.
    int8 = accuracy["model_int8.tflite"]
    assert int8["rank_correlation_vs_keras"] > 0.8
    assert abs(int8["macro_auroc"] - keras_auroc) <= 0.1
    assert accuracy["model.tflite"]["rank_correlation_vs_keras"] > 0.999
    assert abs(accuracy["model.tflite"]["macro_auroc"] - keras_auroc) <= 1e-3


def test_predict_folder_with_a_corrupt_file_on_each_backend(trained, tmp_path, capsys):
    out, data, run, bundle = trained
    splits = pd.read_csv(run / "splits.csv")
    test_rows = splits[splits["split"] == "test"].head(6)
    folder = tmp_path / "incoming"
    folder.mkdir()
    for path in test_rows["image"]:
        shutil.copy(path, folder)
    (folder / "broken.jpg").write_bytes(Path(test_rows["image"].iloc[0]).read_bytes()[:300])  # truncated
    (folder / "notes.txt").write_text("not an image")  # not read: listed as ignored, with the reason

    tables = {}
    for backend, extra in (
        ("keras", []),
        ("saved_model", []),
        ("tflite", ["--tflite", "float32"]),
        ("tflite", ["--tflite", "int8"]),
    ):
        csv = tmp_path / f"{backend}{extra[-1] if extra else ''}.csv"
        assert (
            main(
                [
                    "predict",
                    "--bundle",
                    str(bundle),
                    "--images",
                    str(folder),
                    "--format",
                    backend,
                    "--out",
                    str(csv),
                    *extra,
                ]
            )
            == 0
        )
        tables[csv.stem] = pd.read_csv(csv)
    printed = capsys.readouterr().out
    assert "1 skipped" in printed and "ignored 1 entr(ies)" in printed and "notes.txt" in printed

    reference = tables["keras"]
    assert len(reference) == 8
    notes = reference[reference["id"] == "notes"]
    assert notes["status"].iloc[0] == (
        "ignored: not an image by its extension (extension .txt; read: .jpg .jpeg .png .bmp .tif .tiff)"
    )
    assert notes["image"].iloc[0] == str(folder / "notes.txt") and notes["prob_C"].isna().all()
    reference = reference[reference["id"] != "notes"].reset_index(drop=True)
    tables = {k: v[v["id"] != "notes"].reset_index(drop=True) for k, v in tables.items()}
    broken = reference[reference["id"] == "broken"]
    assert broken["status"].iloc[0].startswith("skipped: broken.jpg") and broken["prob_C"].isna().all()
    ok = reference[reference["status"] == "ok"]
    assert len(ok) == 6
    # decisions use the bundle's validation thresholds, strictly above as kfundus evaluate counts
    card = json.loads((bundle / "model_card.json").read_text())
    threshold = dict(zip(card["thresholds"]["labels"], card["thresholds"]["values"]))["C"]
    assert (ok["pred_C"] == (ok["prob_C"] > threshold).astype(int)).all()
    # the same probabilities, whichever model of the bundle runs
    for name, table in tables.items():
        assert (table["status"] == reference["status"]).all(), name
        diff = np.abs(table.loc[ok.index, ["prob_N", "prob_C"]].to_numpy() - ok[["prob_N", "prob_C"]].to_numpy())
        if name == "tfliteint8":  # an approximation: see the variant test
            assert diff.mean() < 0.2, name
        else:
            assert diff.max() <= 1e-4, name
    # and they match the truth of these synthetic eyes
    truth = test_rows.set_index(test_rows["image"].map(lambda p: p.rsplit("/", 1)[-1].rsplit(".", 1)[0]))["C"]
    predicted = ok.set_index("id")["pred_C"]
    assert (predicted == truth.loc[predicted.index]).mean() >= 0.8


def test_list_images_lists_what_it_does_not_read(tmp_path):
    """Regression (issue 18): predict dropped files it does not read without a word, and a
    folder named like an image crashed the read. Every entry of a folder or glob is now a
    row: to predict (empty status) or ``ignored: <why>``."""
    from kfundus.deploy.predict import ignored_rows, list_images
    from kfundus.errors import DataError

    folder = tmp_path / "incoming"
    folder.mkdir()
    for name in ("1_left.jpg", "1_right.JPG", "2_left.png", "scan.jpeg"):
        write(folder / name, fundus_like(40, 40, 18))
    (folder / "notes.txt").write_text("x")
    (folder / "README").write_text("x")
    (folder / "old.jpg").mkdir()  # a folder named like an image
    table = list_images(folder, ["image"])
    assert table.loc[table["status"] == "", "id"].tolist() == ["1_left", "1_right", "2_left", "scan"]
    reasons = dict(zip(ignored_rows(table)["id"], ignored_rows(table)["status"]))
    assert reasons == {
        "README": "ignored: not an image by its extension (no extension; read: .jpg .jpeg .png .bmp .tif .tiff)",
        "notes": "ignored: not an image by its extension (extension .txt; read: .jpg .jpeg .png .bmp .tif .tiff)",
        "old": "ignored: a folder, not searched (give a glob such as 'DIR/**/*.jpg' to read sub-folders)",
    }
    # a two-eye model pairs <id>_left / <id>_right and lists the images it cannot pair
    pairs = list_images(str(folder / "*"), ["left_image", "right_image"])
    ok = pairs[pairs["status"] == ""]
    assert ok["id"].tolist() == ["1", "2"] and ok["right_image"].tolist() == [str(folder / "1_right.JPG"), ""]
    unpaired = pairs[pairs["id"] == "scan"]
    assert unpaired["status"].iloc[0].startswith("ignored: not named <id>_left")
    assert unpaired["left_image"].iloc[0] == str(folder / "scan.jpeg")
    # nothing to read: the error says what is there
    empty = tmp_path / "docs"
    empty.mkdir()
    (empty / "a.pdf").write_text("x")
    with pytest.raises(DataError, match=r"no image files .* it has 1 other entr\(ies\), e.g. a.pdf"):
        list_images(empty, ["image"])


def test_predict_errors_name_the_fix(trained, tmp_path, capsys):
    _, _, _, bundle = trained
    assert main(["predict", "--bundle", str(tmp_path), "--images", str(tmp_path)]) == 2
    assert "model_card.json" in capsys.readouterr().err
    assert main(["predict", "--bundle", str(bundle), "--images", str(tmp_path / "nothing-*.jpg")]) == 2
    assert "no image files" in capsys.readouterr().err
    write(tmp_path / "eye.png", fundus_like(40, 40, 18))
    assert (
        main(
            [
                "predict",
                "--bundle",
                str(bundle),
                "--images",
                str(tmp_path),
                "--format",
                "tflite",
                "--tflite",
                "model_bf16.tflite",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "model_bf16.tflite" in err and "model_int8.tflite" in err


def test_rank_agreement_matches_pandas_spearman():
    from kfundus.deploy.bundle import rank_agreement

    rng = np.random.default_rng(3)
    reference = rng.random((30, 3))
    noisy = reference + rng.normal(0, 0.2, reference.shape)
    noisy[:, 2] = 0.5  # constant column: no ordering, left out
    want = np.mean([pd.Series(noisy[:, j]).corr(pd.Series(reference[:, j]), method="spearman") for j in (0, 1)])
    assert rank_agreement(noisy, reference) == pytest.approx(want)
    assert 0.3 < want < 0.99
    assert rank_agreement(reference, reference) == pytest.approx(1.0)
    assert rank_agreement(noisy[:, 2:], reference[:, 2:]) is None
