"""Tests of the synthetic fundus generator: determinism, the dataset layouts it writes,
the laterality convention, and that its lesions are learnable by a tiny CNN."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from kfundus.data.synthetic import fundus as synthetic
from kfundus.data.synthetic import load_masks, make_arrays, make_odir, make_rfmid, render_eye
from kfundus.errors import DataError
from kfundus.labels import (
    ODIR_LABELS,
    RFMID_46,
    odir_keywords_to_labels,
    odir_patient_labels,
    split_keywords,
)

DISEASES = ["D", "G", "C", "A", "H", "M", "O"]
# The header of the official ODIR-5K annotation, as published.
OFFICIAL_ODIR_HEADER = (
    "ID,Patient Age,Patient Sex,Left-Fundus,Right-Fundus,Left-Diagnostic Keywords,"
    "Right-Diagnostic Keywords,N,D,G,C,A,H,M,O"
)


@pytest.fixture(scope="module")
def odir_dir(tmp_path_factory):
    return make_odir(tmp_path_factory.mktemp("odir"), n_patients=100, size=48, seed=3)


def _dilate(mask, steps):
    out = mask.copy()
    for _ in range(steps):
        padded = np.pad(out, 1)
        out = padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return out


# ---------------------------------------------------------------------------
# Rendering
@pytest.mark.parametrize("aspect", [1.0, 1.5])
def test_render_shapes_masks_and_shares(aspect):
    size = 96
    image, masks = render_eye(set(DISEASES), size=size, eye="right", seed=11, aspect=aspect)
    width = round(size * aspect)
    assert image.shape == (size, width, 3) and image.dtype == np.uint8
    assert sorted(masks) == sorted(DISEASES)
    lit = image.max(axis=2) > 20  # the field of view, seen from the image alone
    if aspect > 1:  # a wide frame: black at the sides, the FOV clipped at top and bottom
        assert not lit[:, :3].any() and not lit[:, -3:].any()
        assert lit[0].any() and lit[-1].any()
    for label, mask in masks.items():
        assert mask.shape == (size, width) and mask.dtype == bool
        assert mask.any(), label
        assert not (mask & ~_dilate(lit, 1)).any(), f"{label} mask leaves the field of view"
    share = {k: m.mean() for k, m in masks.items()}
    if aspect == 1.0:
        # FOV radius 0.44-0.48 of the height; disc diameter 0.24-0.3 FOV radii, up to 12 % taller
        assert 0.6 < share["C"] < 0.73 and share["M"] == share["C"]
        assert np.pi * 0.12**2 * 0.44**2 * 0.9 < share["G"] < np.pi * 0.15**2 * 1.12 * 0.48**2 * 1.1
    for label in "DAO":
        assert 0.002 < share[label] < 0.08, (label, share[label])
    assert 0.01 < share["H"] < 0.25


def test_normal_eye_has_no_masks_and_N_is_ignored():
    image, masks = render_eye({"N"}, size=64, seed=2)
    assert masks == {}
    assert np.array_equal(image, render_eye(set(), size=64, seed=2)[0])
    with pytest.raises(ValueError, match="unknown findings"):
        render_eye({"X"}, size=64)


@pytest.mark.parametrize("label", ["D", "A", "O", "G"])
def test_a_finding_changes_only_its_own_pixels(label):
    """The lesion streams are separate from the anatomy, so the mask locates the evidence."""
    normal, _ = render_eye(set(), size=96, eye="left", seed=5)
    sick, masks = render_eye({label}, size=96, eye="left", seed=5)
    changed = np.abs(sick.astype(int) - normal.astype(int)).max(axis=2) > 3
    assert changed.sum() > 10
    assert not (changed & ~_dilate(masks[label], 2)).any()


def test_render_is_deterministic():
    a, ma = render_eye({"D", "H"}, size=64, seed=7)
    b, mb = render_eye({"D", "H"}, size=64, seed=7)
    c, _ = render_eye({"D", "H"}, size=64, seed=8)
    assert np.array_equal(a, b) and all(np.array_equal(ma[k], mb[k]) for k in ma)
    assert not np.array_equal(a, c)


def test_left_eye_mirrors_right_eye():
    for seed in range(3):
        right, mr = render_eye({"G", "D", "O"}, size=64, eye="right", seed=seed, aspect=1.3)
        left, ml = render_eye({"G", "D", "O"}, size=64, eye="left", seed=seed, aspect=1.3)
        assert np.array_equal(left, right[:, ::-1])
        assert all(np.array_equal(ml[k], mr[k][:, ::-1]) for k in mr)


@pytest.mark.parametrize("aspect", [1.0, 1.5])
def test_disc_is_brightest_on_the_nasal_side(aspect):
    """Disc (brightest region) on the image's left for left eyes, right for right eyes."""
    for seed in range(8):
        for eye in ("left", "right"):
            image, _ = render_eye(set() if seed % 2 else {"G"}, size=64, eye=eye, seed=seed, aspect=aspect)
            blurred = np.asarray(Image.fromarray(image).convert("L").filter(ImageFilter.BoxBlur(2)), dtype=float)
            _, col = np.unravel_index(np.argmax(blurred), blurred.shape)
            on_left = col < image.shape[1] / 2
            assert on_left == (eye == "left"), (seed, eye, col)


def test_render_speed():
    start = time.perf_counter()
    for seed in range(100):
        render_eye({DISEASES[seed % 7]} if seed % 3 else set(), size=128, seed=seed)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"100 images at 128 px took {elapsed:.1f} s (target ~0.6 s)"


# ---------------------------------------------------------------------------
# ODIR layout
def test_odir_header_and_files(odir_dir):
    header = (odir_dir / "annotation.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == OFFICIAL_ODIR_HEADER
    table = pd.read_csv(odir_dir / "annotation.csv")
    assert len(table) == 100 and table["ID"].is_unique
    for column in ("Left-Fundus", "Right-Fundus"):
        for name in table[column]:
            with Image.open(odir_dir / "images" / name) as image:
                assert image.format == "JPEG" and image.size == (48, 48) and image.mode == "RGB"
    assert set(table["Patient Sex"]) == {"Male", "Female"}
    assert table["Patient Age"].between(1, 100).all()


def test_odir_labels_follow_keywords_and_rendered_findings(odir_dir):
    table = pd.read_csv(odir_dir / "annotation.csv")
    separators = ""
    for row in table.itertuples(index=False):
        left, right = row[5], row[6]
        separators += "".join(ch for ch in left + right if ch in ",，")
        expected = odir_patient_labels(odir_keywords_to_labels(left), odir_keywords_to_labels(right))
        assert {k: getattr(row, k) for k in ODIR_LABELS} == expected, row
        found = set()
        for eye, cell in (("left", left), ("right", right)):
            masks = load_masks(odir_dir, f"images/{row.ID}_{eye}.jpg")
            per_eye = {k for k, v in odir_keywords_to_labels(cell).items() if v}
            # the keywords say exactly what was drawn in that eye
            assert per_eye - {"N"} == set(masks), (row.ID, eye, cell, sorted(masks))
            assert ("N" in per_eye) == (not masks)
            assert all(m.shape == (48, 48) and m.any() for m in masks.values())
            found |= set(masks)
        assert {k for k in DISEASES if getattr(row, k)} == found
    assert "，" in separators and "," in separators  # both separators of the real file
    keywords = {k for cell in table.iloc[:, 5:7].to_numpy().ravel() for k in split_keywords(cell)}
    assert "lens dust" in keywords and "normal fundus" in keywords


def test_odir_default_prevalence(odir_dir):
    table = pd.read_csv(odir_dir / "annotation.csv")
    assert 0.2 <= table["N"].mean() <= 0.45, "roughly a third of patients should be normal"
    for label in DISEASES:
        assert table[label].sum() >= 8, f"{label} too rare to learn in 100 patients"
    eyes = [load_masks(odir_dir, f"images/{i}_{e}.jpg") for i in table["ID"] for e in ("left", "right")]
    bilateral = sum(bool(a) and set(a) == set(b) for a, b in zip(eyes[::2], eyes[1::2]))
    unilateral = sum(bool(a) != bool(b) for a, b in zip(eyes[::2], eyes[1::2]))
    assert bilateral > 0 and unilateral > 0


def test_odir_bytes_are_deterministic(tmp_path):
    a = make_odir(tmp_path / "a", n_patients=4, size=40, seed=1)
    b = make_odir(tmp_path / "b", n_patients=4, size=40, seed=1)
    c = make_odir(tmp_path / "c", n_patients=4, size=40, seed=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 1 + 8 + 8
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    images = [f for f in files if f.suffix == ".jpg"]
    assert all((a / f).read_bytes() != (c / f).read_bytes() for f in images)


def test_odir_wide_frames_and_no_masks(tmp_path):
    out = make_odir(tmp_path, n_patients=2, size=40, aspect=1.5, write_masks=False)
    with Image.open(out / "images" / "0_left.jpg") as image:
        assert image.size == (60, 40)
    assert not (out / "masks").exists()
    with pytest.raises(DataError, match="no mask file"):
        load_masks(out, out / "images" / "0_left.jpg")
    with pytest.raises(DataError, match="not inside"):
        load_masks(out / "images", tmp_path.parent / "elsewhere.jpg")


# ---------------------------------------------------------------------------
# RFMiD layout
def test_rfmid_layout(tmp_path):
    out = make_rfmid(tmp_path, n_images=20, size=40, seed=4, aspect=1.5)
    assert len(RFMID_46) == 46
    sizes = {}
    for split in ("Training", "Validation", "Testing"):
        table = pd.read_csv(out / f"RFMiD_{split}_Labels.csv")
        assert list(table.columns) == ["ID", *RFMID_46]
        assert table["ID"].tolist() == list(range(1, len(table) + 1))
        sizes[split] = len(table)
        diseases = table[RFMID_46[1:]]
        assert (table["Disease_Risk"] == diseases.any(axis=1).astype(int)).all()
        for row in table.itertuples(index=False):
            path = out / split / f"{row.ID}.png"
            with Image.open(path) as image:
                assert image.size == (60, 40)
            masks = load_masks(out, path)
            positive = {c for c in RFMID_46[1:] if getattr(row, c)}
            assert set(masks) == positive and all(m.any() for m in masks.values())
            assert positive <= {c for cols in synthetic.RFMID_MAP.values() for c in cols}
    assert sizes == {"Training": 12, "Validation": 4, "Testing": 4}
    with pytest.raises(ValueError, match="split_fractions"):
        make_rfmid(tmp_path / "bad", n_images=5, split_fractions=(0.5, 0.2, 0.2))


# ---------------------------------------------------------------------------
# Command line
def test_cli_main(tmp_path, capsys):
    from kfundus.cli import main

    assert (
        main(
            [
                "synth",
                "--layout",
                "odir",
                "--out",
                str(tmp_path / "o"),
                "--patients",
                "3",
                "--size",
                "32",
                "--seed",
                "0",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert str(tmp_path / "o") in printed and "patients per label" in printed
    assert len(pd.read_csv(tmp_path / "o" / "annotation.csv")) == 3
    assert len(list((tmp_path / "o" / "images").glob("*.jpg"))) == 6


def test_cli_module_entry(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kfundus",
            "synth",
            "--layout",
            "rfmid",
            "--out",
            str(tmp_path),
            "--images",
            "5",
            "--size",
            "32",
            "--no-masks",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Training" in result.stdout
    assert len(list((tmp_path / "Training").glob("*.png"))) == 3
    assert not (tmp_path / "masks").exists()


# ---------------------------------------------------------------------------
# Learnable
def test_lesions_are_learnable_by_a_tiny_cnn():
    """The property the demo and the model tests rely on: a 3-layer CNN trained for a few
    seconds on 220 eyes at 64 px separates G, C and D on 80 held-out eyes."""
    import keras
    from sklearn.metrics import roc_auc_score

    labels = ["D", "G", "C"]
    x, y = make_arrays(300, size=64, labels=labels, prevalence=0.35, seed=0)
    assert x.shape == (300, 64, 64, 3) and y.shape == (300, 3)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64, 64, 3), name="image")
    h = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    for filters in (16, 32, 64):
        h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(h)
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Concatenate()([keras.layers.GlobalMaxPooling2D()(h), keras.layers.GlobalAveragePooling2D()(h)])
    outputs = keras.layers.Dense(len(labels), activation="sigmoid", name="labels")(h)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    model.fit(x[:220], y[:220], epochs=20, batch_size=32, verbose=0)
    scores = model.predict(x[220:], verbose=0)
    auroc = {k: roc_auc_score(y[220:, i], scores[:, i]) for i, k in enumerate(labels)}
    assert all(v > 0.9 for v in auroc.values()), auroc
