"""Synthetic OCT B-scans in the Kermany layout, and the dual-stream network learning the two
OCT tasks (TO1 CNV/DME/DRUSEN/NORMAL, TO2 normal vs abnormal) from them, end to end:
generator -> class-folder reader -> pipeline (no fundus crop) -> train() -> evaluate_run
-> export (SavedModel + TFLite, every named output)."""

from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from kfundus.config import load_config
from kfundus.data.images import Preprocess
from kfundus.data.pipeline import make_dataset, prepare
from kfundus.data.readers import load_source
from kfundus.data.synthetic.oct import make_oct, render_bscan
from kfundus.deploy.saved_model import export_bundle, run_saved_model
from kfundus.deploy.tflite import run_tflite, tflite_ops
from kfundus.evaluation import evaluate_run
from kfundus.labels import OCT_CLASSES
from kfundus.workflows.supervised import train

REPO = Path(__file__).resolve().parents[1]
CONFIG = "oct_dual_stream_wlsr"


def test_generator_writes_kermany_layout_read_as_greyscale_rgb(tmp_path):
    root = make_oct(tmp_path / "oct", n_patients=8, images_per_patient=2, size=48, test_fraction=0.5)
    files = sorted(root.glob("*/*/*.jpeg"))
    assert len(files) == 16
    assert {f.parent.parent.name for f in files} == {"train", "test"}
    assert {f.parent.name for f in files} == set(OCT_CLASSES)
    assert all(f.name.startswith(f.parent.name + "-") for f in files)
    assert Image.open(files[0]).mode == "L"  # greyscale JPEG, like Kermany's B-scans

    manifest = load_source("folders", root)
    assert manifest.labels == OCT_CLASSES and manifest.task == "multiclass"
    assert manifest.frame["patient_id"].nunique() == 8  # CNV-1000001-2.jpeg -> patient 1000001
    assert (manifest.frame.groupby("patient_id")["split"].nunique() == 1).all()
    assert (manifest.targets().sum(axis=1) == 1).all()

    prepared = prepare(manifest, Preprocess(image_size=32, crop_fundus=False), cache_dir=tmp_path / "cache")
    images, _ = next(iter(make_dataset(prepared, batch_size=16)))
    images = np.asarray(images)
    assert images.shape == (16, 32, 32, 3)
    np.testing.assert_array_equal(images[..., 0], images[..., 1])  # grey replicated to RGB
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_each_finding_changes_part_of_the_scan_and_keeps_the_anatomy():
    """Same seed, same anatomy: each class differs from NORMAL where its finding is, and
    the rows above the retina (vitreous) stay dark."""
    normal = render_bscan("NORMAL", size=96, seed=5).astype(float)
    for label in ["CNV", "DME", "DRUSEN"]:
        image = render_bscan(label, size=96, seed=5).astype(float)
        diff = np.abs(image - normal) > 40
        assert 0.003 < diff.mean() < 0.2, (label, diff.mean())
        assert normal[:10].mean() < 30 and image[:10].mean() < 30
    assert np.array_equal(render_bscan("DME", size=64, seed=1), render_bscan("DME", size=64, seed=1))
    with pytest.raises(ValueError, match="OCT_CLASSES|one of"):
        render_bscan("GLAUCOMA")


@pytest.fixture(scope="module")
def oct_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("oct")
    data = make_oct(out / "data", n_patients=80, images_per_patient=2, size=96, seed=3, test_fraction=0.2)
    config = load_config(
        CONFIG,
        [
            f"output_dir={out / 'runs'}",
            f"data.cache_dir={out / 'cache'}",
            "data.image_size=64",
            "model.options.depth=3",
            "model.options.width=16",
            "train.epochs=14",
            "train.batch_size=16",
            "train.learning_rate=0.003",
            "data.augment.zoom=0",
            "data.augment.contrast=0",
            "data.augment.brightness=0",
        ],
    )
    run = train(config, str(data))
    return out, data, run


def test_dual_stream_learns_both_oct_tasks(oct_run):
    _, data, run = oct_run
    history = (run / "history.csv").read_text().splitlines()[0].split(",")
    for name in ["val_oct_class_auroc", "val_oct_class_macro_f1", "val_abnormal_auroc", "val_abnormal_loss"]:
        assert name in history, name
    metrics = evaluate_run(run, data, split="test", gallery=True)
    print("OCT test:", metrics["macro_auroc"], metrics["accuracy"], metrics["heads"]["abnormal"]["auroc"])
    assert metrics["n_samples"] == 32
    assert metrics["macro_auroc"] > 0.9, metrics  # TO1, held-out patients
    assert metrics["heads"]["abnormal"]["auroc"] > 0.9, metrics["heads"]["abnormal"]  # TO2
    assert (run / "eval-test" / "gallery_CNV.png").stat().st_size > 0  # Grad-CAM on the primary head


def test_exports_reproduce_every_named_output(oct_run):
    out, _, run = oct_run
    model = keras.saving.load_model(run / "model.keras")
    with np.load(run / "samples.npz") as samples:
        inputs = {"image": samples["image"].astype("float32")}
    labels = {"oct_class": OCT_CLASSES, "abnormal": ["abnormal"]}
    paths = export_bundle(model, out / "bundle", labels=labels, sample_inputs=inputs)  # checks parity too
    assert not [op for op in tflite_ops(paths["tflite"]) if op.startswith("Flex")]
    want = {k: np.asarray(v) for k, v in model(inputs["image"]).items()}
    assert want["oct_class"].std(axis=0).max() > 0.01  # real images: outputs not saturated
    for name, got in [
        ("saved_model", run_saved_model(paths["saved_model"], inputs)),
        ("tflite", run_tflite(paths["tflite"], inputs)),
    ]:
        assert set(got) == set(want), name
        for head in want:
            np.testing.assert_allclose(got[head], want[head], atol=1e-4, err_msg=f"{name} {head}")
    assert (out / "bundle" / "labels_oct_class.txt").read_text().split() == OCT_CLASSES
