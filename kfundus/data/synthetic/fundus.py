"""Synthetic colour fundus photographs whose lesions encode their labels.

A seeded generator for the demo and the tests. It draws fundus-like images (a circular
field of view on black, a reddish-orange background with vignetting, an optic disc with a
cup, a darker macula, a branching vessel tree), paints one kind of lesion per ODIR label,
and writes them in the layouts of public datasets (ODIR-5K, RFMiD) so that the real readers
are exercised. numpy and Pillow only; a 128 px image takes about 6 ms on one core.

The drawing itself (anatomy, lesions, their masks, the conventions for laterality and
sizes) is ``kfundus.data.synthetic.render.render_eye``.

Example:

>>> image, masks = render_eye({"G", "D"}, size=128, eye="right", seed=3)
>>> make_odir("demo/odir", n_patients=200)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from kfundus.data.synthetic.render import DISEASES, eye_seed, render_eye
from kfundus.errors import DataError
from kfundus.labels import ODIR_COLUMNS, ODIR_LABELS, RFMID_46, odir_keywords_to_labels, odir_patient_labels

# "N": share of normal patients; a disease: chance that an abnormal patient has it (at
# least one is always drawn). About 25 of 100 patients have D, 20 G and C, 13 A, H and M.
DEFAULT_PREVALENCE = {"N": 0.33, "D": 0.35, "G": 0.3, "C": 0.3, "A": 0.2, "H": 0.2, "M": 0.2, "O": 0.15}
BILATERAL = {"D": 0.8, "G": 0.7, "C": 0.6, "A": 0.7, "H": 0.85, "M": 0.85, "O": 0.3}
# ODIR keywords written for each finding (D: by grade 1-3).
KEYWORDS = {
    "D": [
        "mild nonproliferative retinopathy",
        "moderate non proliferative retinopathy",
        "severe nonproliferative retinopathy",
    ],
    "G": ["glaucoma"] * 3 + ["suspected glaucoma"],
    "C": ["cataract"],
    "A": ["dry age-related macular degeneration"] * 2 + ["wet age-related macular degeneration"],
    "H": ["hypertensive retinopathy"],
    "M": ["pathological myopia"],
    "O": ["laser spot", "chorioretinal atrophy", "retinal pigmentation"],
}
# Findings -> RFMiD columns (C shows as media haze; the O scar as laser scars).
RFMID_MAP = {"D": ["DR"], "G": ["ODC"], "C": ["MH"], "A": ["ARMD"], "H": ["HR"], "M": ["MYA", "TSLN"], "O": ["LS"]}
RFMID_SPLITS = ("Training", "Validation", "Testing")


def make_arrays(n, *, size=64, labels=("D", "G", "C"), prevalence=0.35, seed=0, aspect=1.0):
    """Render ``n`` eyes in memory (random sides), each label present independently with
    probability ``prevalence``: learnable data for model tests, without files.

    Returns:
        ``(images, targets)``: uint8 (n, size, width, 3) and float32 (n, len(labels)).
    """
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(labels))) < prevalence).astype(np.float32)
    sides, seeds = rng.choice(["left", "right"], n), rng.integers(0, 2**31, n)
    x = [
        render_eye({k for k, on in zip(labels, row) if on}, size=size, eye=str(side), seed=int(s), aspect=aspect)[0]
        for row, side, s in zip(y, sides, seeds)
    ]
    return np.stack(x), y


def _draw_findings(rng, prevalence):
    """Findings of one patient's eyes: (left set, right set)."""
    eyes = (set(), set())
    if rng.random() < prevalence["N"]:
        return eyes
    p = np.array([prevalence[k] for k in DISEASES])
    present = rng.random(len(DISEASES)) < p
    if not present.any():
        present[rng.choice(len(DISEASES), p=p / p.sum())] = True
    for label in np.array(DISEASES)[present]:
        if rng.random() < BILATERAL[label]:
            eyes[0].add(str(label)), eyes[1].add(str(label))
        else:
            eyes[int(rng.integers(2))].add(str(label))
    return eyes


def _keywords(rng, findings, grade):
    """One eye's ODIR keyword cell: a keyword per finding, or "normal fundus"; sometimes
    "lens dust" besides; joined by a full-width comma (mostly, as in ODIR) or a comma."""
    words = [
        KEYWORDS[k][grade - 1] if k == "D" else KEYWORDS[k][rng.integers(len(KEYWORDS[k]))]
        for k in DISEASES
        if k in findings
    ]
    rng.shuffle(words)
    words = words or ["normal fundus"]
    if rng.random() < 0.08:
        words.insert(int(rng.integers(len(words) + 1)), "lens dust")
    return ("，" if rng.random() < 0.75 else ",").join(words)


def _prevalence(prevalence):
    out = dict(DEFAULT_PREVALENCE)
    for key, value in (prevalence or {}).items():
        if key not in out or not 0 <= value <= 1:
            raise ValueError(f"prevalence[{key!r}]={value!r}: use keys of {list(out)}, values 0-1")
        out[key] = float(value)
    if not any(out[k] > 0 for k in DISEASES):
        raise ValueError("prevalence: give at least one disease a probability above 0")
    return out


def _save_masks(path, masks):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **masks)


def make_odir(
    out_dir, *, n_patients=100, size=128, seed=0, prevalence=None, aspect=1.0, jpeg_quality=92, write_masks=True
) -> Path:
    """Write a synthetic dataset in the ODIR-5K layout.

    Writes ``images/{ID}_left.jpg`` and ``{ID}_right.jpg``; ``annotation.csv`` with the
    official columns, per-eye ODIR keywords and the patient labels derived from them by
    :func:`kfundus.labels.odir_patient_labels`; and, with ``write_masks``,
    ``masks/{ID}_{eye}.npz`` holding one boolean array per finding of that eye.

    Args:
        out_dir: the folder to write (created if needed).
        n_patients: patients (two images each); IDs are 0 .. n_patients - 1.
        size: image height in pixels.
        seed: the random seed; the same arguments write the same bytes.
        prevalence: overrides of :data:`DEFAULT_PREVALENCE` (``"N"``: share of normal
            patients; a disease letter: the chance that an abnormal patient has it).
        aspect: width / height of the images (see :func:`render_eye`).
        jpeg_quality: JPEG quality.
        write_masks: whether to write the lesion masks.

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    prevalence = _prevalence(prevalence)
    rng = np.random.default_rng([seed, 1000])
    rows = []
    for pid in range(n_patients):
        findings = _draw_findings(rng, prevalence)
        grade = int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2]))
        cells = [_keywords(rng, found, grade) for found in findings]
        age = int(np.clip(rng.normal(58, 11) + 8 * ("A" in findings[0] | findings[1]), 20, 90))
        sex = ("Male", "Female")[int(rng.integers(2))]
        for side, found in zip(("left", "right"), findings):
            image, masks = render_eye(
                found, size=size, eye=side, aspect=aspect, dr_grade=grade, seed=eye_seed(seed, pid, side == "right")
            )
            Image.fromarray(image).save(out_dir / "images" / f"{pid}_{side}.jpg", quality=jpeg_quality)
            if write_masks:
                _save_masks(out_dir / "masks" / f"{pid}_{side}.npz", masks)
        labels = odir_patient_labels(*(odir_keywords_to_labels(cell) for cell in cells))
        rows.append([pid, age, sex, f"{pid}_left.jpg", f"{pid}_right.jpg", *cells, *(labels[k] for k in ODIR_LABELS)])
    pd.DataFrame(rows, columns=ODIR_COLUMNS).to_csv(out_dir / "annotation.csv", index=False)
    return out_dir


def make_rfmid(
    out_dir,
    *,
    n_images=60,
    size=128,
    seed=0,
    split_fractions=(0.6, 0.2, 0.2),
    prevalence=None,
    aspect=1.0,
    write_masks=True,
) -> Path:
    """Write a synthetic dataset in the RFMiD layout.

    Writes ``RFMiD_{split}_Labels.csv`` (``ID`` + :data:`kfundus.labels.RFMID_46`; IDs
    restart at 1 in each split, as in RFMiD) and ``{split}/{ID}.png`` for the splits
    Training, Validation, Testing. Findings map to columns by :data:`RFMID_MAP`;
    ``Disease_Risk`` = any finding. Masks, keyed by column, go to ``masks/{split}/{ID}.npz``.

    Args:
        out_dir: the folder to write (created if needed).
        n_images: images over all splits.
        split_fractions: shares of Training, Validation and Testing (summing to 1).
        size, seed, prevalence, aspect, write_masks: as in :func:`make_odir` (findings are
            drawn per image).

    Returns:
        ``out_dir`` as a Path.
    """
    fractions = np.asarray(split_fractions, dtype=float)
    if fractions.shape != (3,) or (fractions < 0).any() or abs(fractions.sum() - 1) > 1e-6:
        raise ValueError(f"split_fractions={split_fractions!r}: give 3 shares >= 0 summing to 1")
    out_dir = Path(out_dir)
    prevalence = _prevalence(prevalence)
    rng = np.random.default_rng([seed, 2000])
    n_train = int(round(n_images * fractions[0]))
    n_val = min(int(round(n_images * fractions[1])), n_images - n_train)
    counts = (n_train, n_val, n_images - n_train - n_val)
    for number, (split, count) in enumerate(zip(RFMID_SPLITS, counts)):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for image_id in range(1, count + 1):
            found = _draw_findings(rng, prevalence)[int(rng.integers(2))]
            side = "left" if rng.random() < 0.5 else "right"
            image, masks = render_eye(
                found, size=size, eye=side, aspect=aspect, seed=eye_seed(seed, 7, number, image_id)
            )
            Image.fromarray(image).save(out_dir / split / f"{image_id}.png")
            columns = {c: masks[k] for k in found for c in RFMID_MAP[k]}
            if write_masks:
                _save_masks(out_dir / "masks" / split / f"{image_id}.npz", columns)
            rows.append(
                {"ID": image_id, "Disease_Risk": int(bool(found)), **{c: int(c in columns) for c in RFMID_46[1:]}}
            )
        pd.DataFrame(rows, columns=["ID", *RFMID_46]).to_csv(out_dir / f"RFMiD_{split}_Labels.csv", index=False)
    return out_dir


# ---------------------------------------------------------------------------
# Diabetic-retinopathy grades in the EyePACS layout, and OCT B-scans in the Kermany layout

DR_GRADE_SHARES = (0.4, 0.15, 0.2, 0.15, 0.1)


def render_dr_grade(grade: int, *, size=128, eye="left", seed=0, aspect=1.0) -> np.ndarray:
    """A fundus photograph of DR grade 0-4: 0 none, 1-3 mild / moderate / severe
    non-proliferative lesions (:func:`render_eye` ``"D"``), 4 proliferative: severe lesions
    plus the pigmented scars of pan-retinal laser treatment (``"O"``)."""
    if grade not in range(5):
        raise ValueError(f"grade must be 0-4, got {grade!r}")
    findings = set() if grade == 0 else ({"D", "O"} if grade == 4 else {"D"})
    image, _ = render_eye(findings, size=size, eye=eye, seed=seed, aspect=aspect, dr_grade=min(max(grade, 1), 3))
    return image


def make_dr(out_dir, *, n_patients=100, size=128, seed=0, shares=DR_GRADE_SHARES, aspect=1.0, jpeg_quality=92) -> Path:
    """Write a synthetic DR-grading dataset in the Kaggle EyePACS layout:
    ``trainLabels.csv`` (``image,level``) and ``train/{patient}_{left,right}.jpeg``.

    Each eye's grade is drawn from ``shares`` (grades 0-4), the second eye within one grade
    of the first (eyes of one patient are alike). Returns ``out_dir`` as a Path.
    """
    shares = np.asarray(shares, dtype=float)
    if shares.shape != (5,) or (shares < 0).any() or shares.sum() <= 0:
        raise ValueError(f"shares={shares!r}: give 5 non-negative shares for grades 0-4")
    out_dir = Path(out_dir)
    (out_dir / "train").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 3000])
    rows = []
    for pid in range(1, n_patients + 1):
        first = int(rng.choice(5, p=shares / shares.sum()))
        second = int(np.clip(first + rng.integers(-1, 2), 0, 4)) if rng.random() < 0.5 else first
        for side, grade in zip(("left", "right"), (first, second)):
            image = render_dr_grade(
                grade, size=size, eye=side, aspect=aspect, seed=eye_seed(seed, 30, pid, side == "right")
            )
            Image.fromarray(image).save(out_dir / "train" / f"{pid}_{side}.jpeg", quality=jpeg_quality)
            rows.append({"image": f"{pid}_{side}", "level": grade})
    pd.DataFrame(rows).to_csv(out_dir / "trainLabels.csv", index=False)
    return out_dir


def load_masks(out_dir, image_path) -> dict[str, np.ndarray]:
    """The lesion masks written with a synthetic image.

    Args:
        out_dir: the dataset folder given to :func:`make_odir` or :func:`make_rfmid`.
        image_path: the image, absolute or relative to ``out_dir``.

    Returns:
        ``{label: bool (H, W)}`` by ODIR letter or RFMiD column; empty for a normal eye.
    """
    out_dir = Path(out_dir).resolve()
    path = Path(image_path)
    try:
        rel = (path if path.is_absolute() else out_dir / path).resolve().relative_to(out_dir)
    except ValueError:
        raise DataError(
            f"image {image_path} is not inside the synthetic dataset {out_dir}: pass the folder it was generated in"
        ) from None
    parts = rel.parts[1:] if rel.parts[:1] == ("images",) else rel.parts
    mask_path = out_dir.joinpath("masks", *parts).with_suffix(".npz")
    if not mask_path.exists():
        raise DataError(
            f"no mask file {mask_path} for image {image_path}: generate the dataset "
            "with masks (write_masks=True; the CLI without --no-masks)"
        )
    with np.load(mask_path) as data:
        return {key: data[key].astype(bool) for key in data.files}
