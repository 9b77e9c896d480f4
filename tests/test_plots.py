"""kfundus.plots writes readable PNG files (valid, non-trivial, not blank)."""

import numpy as np
import pytest
from PIL import Image

from kfundus.errors import DataError
from kfundus.evaluation import plots
from kfundus.labels import OCT_CLASSES, ODIR_LABELS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=8_000):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > min_bytes
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert min(pixels.shape[:2]) > 200
    return pixels


@pytest.fixture
def multilabel():
    rng = np.random.default_rng(0)
    y = (rng.random((60, 8)) < 0.3).astype(int)
    y[:, 5] = 0  # a class without positives is skipped, not a crash
    p = np.clip(0.4 * y + 0.6 * rng.random(y.shape), 0, 1)
    return y, p


def test_roc_curves_written_and_not_blank(tmp_path, multilabel):
    y, p = multilabel
    out = plots.plot_roc_curves(y, p, ODIR_LABELS, tmp_path / "figs" / "roc.png", title="ODIR val")
    assert out == tmp_path / "figs" / "roc.png"
    pixels = assert_png(out)
    # drawn content: many distinct colours (8 curves) and a large share of non-white pixels
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50
    assert np.mean(pixels.min(axis=2) < 200) > 0.02


def test_pr_curves_binary_and_multiclass_indices(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 50)
    assert_png(plots.plot_pr_curves(y, rng.random(50), ["hr"], tmp_path / "pr_bin.png"))
    y4 = rng.integers(0, 4, 50)  # class indices: one-vs-rest curves
    assert_png(plots.plot_pr_curves(y4, rng.random((50, 4)), OCT_CLASSES, tmp_path / "pr_oct.png"))


@pytest.mark.parametrize("task", ["multilabel", "multiclass", "binary"])
def test_confusion_matrices(tmp_path, multilabel, task):
    rng = np.random.default_rng(2)
    if task == "multilabel":
        y, p = multilabel
        labels, thresholds = ODIR_LABELS, np.linspace(0.3, 0.7, 8)
    elif task == "multiclass":
        y, p, labels, thresholds = rng.integers(0, 5, 80), rng.random((80, 5)), list("01234"), None
    else:
        y, p, labels, thresholds = rng.integers(0, 2, 40), rng.random(40), ["hr"], 0.4
    out = plots.plot_confusion_matrices(y, p, labels, tmp_path / f"cm_{task}.png", task, thresholds)
    assert_png(out)


def test_training_curves_from_csvlogger(tmp_path):
    log = tmp_path / "history.csv"
    rows = ["epoch,auroc,learning_rate,loss,val_auroc,val_loss"]
    for epoch in range(6):
        rows.append(
            f"{epoch},{0.6 + 0.05 * epoch},{1e-3 * 0.5**epoch},{1 / (epoch + 1)},"
            f"{0.55 + 0.04 * epoch},{1.2 / (epoch + 1)}"
        )
    rows.append("5,0.86,3e-05,0.17,0.76,0.21")  # a resumed run appended epoch 5 again
    log.write_text("\n".join(rows) + "\n")
    assert_png(plots.plot_training_curves(log, tmp_path / "curves.png"))


def test_training_curves_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.csv"):
        plots.plot_training_curves(empty, tmp_path / "x.png")
    with pytest.raises(DataError, match="missing.csv"):
        plots.plot_training_curves(tmp_path / "missing.csv", tmp_path / "x.png")
