"""Saliency maps measured, not only drawn: localisation on synthetic lesion masks and the
model-randomisation sanity check.

``localisation`` / ``localisation_report`` measure the Grad-CAM energy inside synthetic
lesion masks against their area, and the pointing game (Zhang et al. 2016);
``randomisation_check`` is the sanity check of Adebayo et al. (2018). The maps come from
``kfundus.explain`` (Grad-CAM for CNNs, token Grad-CAM for ViT encoders).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from kfundus.errors import ConfigError
from kfundus.explain.cam import IMAGE_SUFFIXES, GradCAM, gradcam, load_images

# Synthetic masks that are the whole field of view (cataract, myopia; RFMiD columns too).
WHOLE_FIELD_LABELS = frozenset({"C", "M", "MH", "MYA", "TSLN"})

# ---------------------------------------------------------------------------
# Measured localisation


def _per_image(cams, masks, tolerance: int):
    """Per image: energy share inside the mask, mask area share, pointing-game hit."""
    cams = np.asarray(cams, dtype=np.float64)
    masks = np.asarray(masks, dtype=np.float64)
    if cams.shape != masks.shape or cams.ndim != 3:
        raise ValueError(f"cams {cams.shape} and masks {masks.shape} must both be (N, H, W)")
    total = cams.sum(axis=(1, 2))
    inside = (cams * masks).sum(axis=(1, 2))
    energy = np.divide(inside, total, out=np.zeros_like(total), where=total > 0)
    area = masks.mean(axis=(1, 2))
    n, h, w = cams.shape
    if n == 0:
        return energy, area, np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
    rows, cols = np.divmod(cams.reshape(n, -1).argmax(axis=1), w)
    yy, xx = np.mgrid[-tolerance : tolerance + 1, -tolerance : tolerance + 1]
    near = yy**2 + xx**2 <= tolerance**2  # a disc of the tolerance's radius
    r, c = rows[:, None] + yy[near], cols[:, None] + xx[near]
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    on_mask = masks[np.arange(n)[:, None], r.clip(0, h - 1), c.clip(0, w - 1)] >= 0.5
    hits = (on_mask & inside).any(axis=1) & (total > 0)  # an empty map points nowhere: a miss
    return energy, area, hits, total <= 0


def localisation(cams, masks, *, tolerance: int = 0) -> dict:
    """How well maps fall on lesions.

    Args:
        cams: (N, H, W) non-negative maps.
        masks: (N, H, W) lesion masks in [0, 1] aligned with the maps (e.g. by
            ``preprocess_mask``); fractional edge pixels count fractionally.
        tolerance: pointing-game tolerance in pixels: a map's maximum is a hit when a mask
            pixel (>= 0.5) lies within this Euclidean distance (0: the pixel itself). Zhang
            et al. (2016) used 15 px at ~224 px; maps upsampled from coarse grids justify a few.

    Returns:
        ``energy_in_mask``: share of each map's total energy inside its mask, averaged
        over images (an all-zero map counts 0); ``area_share``: mask area over image
        area, averaged; ``ratio``: energy_in_mask / area_share (1 = no better than
        chance, the issue asks >= 3); ``pointing_game``: share of images whose map
        maximum hits the mask; ``n``; ``empty_maps``; ``tolerance``.
    """
    energy, area, hits, empty = _per_image(cams, masks, tolerance)
    n = len(energy)
    e, a, p = (float(np.mean(v)) if n else float("nan") for v in (energy, area, hits))
    return {
        "n": n,
        "energy_in_mask": e,
        "area_share": a,
        "ratio": e / a if n and a > 0 else float("nan"),
        "pointing_game": p,
        "empty_maps": int(np.sum(empty)),
        "tolerance": tolerance,
    }


def _dataset_images(dataset_dir: Path) -> list[Path]:
    """The images of a synthetic dataset that have a mask file (ODIR or RFMiD layout)."""

    def mask_file(path):
        rel = path.relative_to(dataset_dir).parts
        return dataset_dir.joinpath("masks", *(rel[1:] if rel[0] == "images" else rel)).with_suffix(".npz")

    return [
        p
        for p in sorted(dataset_dir.rglob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.relative_to(dataset_dir).parts[0] != "masks"
        and mask_file(p).exists()
    ]


def localisation_report(
    model,
    dataset_dir,
    labels,
    preprocess,
    *,
    classes=None,
    images=None,
    layer: str | None = None,
    tolerance: int = 0,
    threshold=0.5,
    batch_size: int = 16,
    progress: bool = False,
) -> pd.DataFrame:
    """Localisation of a model's Grad-CAM maps on a synthetic dataset, per class.

    For each class, **every image that has the lesion** is explained for that class,
    predicted or not (the measure is not conditioned on the model's decision; the column
    ``predicted`` counts those above ``threshold``). Masks from ``load_masks`` go through
    the image's own geometry (``preprocess_mask``).

    Args:
        model: the classifier; ``labels``: its output names.
        dataset_dir: a folder written by ``make_odir`` / ``make_rfmid`` with masks.
        preprocess: the ``Preprocess`` the model was trained with.
        classes: labels to measure. Default: all but ``N`` and the whole-field findings
            (cataract ``C``, myopia ``M``, their RFMiD columns): their mask is the entire
            field of view, where localisation is meaningless.
        images: the image paths to use (e.g. a held-out split); default all with masks.
        layer, batch_size: see ``gradcam``; ``tolerance``: see ``localisation``.
        threshold: for the ``predicted`` column (one value or one per label).

    Returns:
        One row per class: label, images, predicted, energy_in_mask, area_share, ratio,
        pointing_game, empty_maps.
    """
    from tqdm.auto import tqdm

    from kfundus.data.pipeline import preprocess_mask
    from kfundus.data.synthetic import load_masks

    labels, dataset_dir = list(labels), Path(dataset_dir)
    classes = [c for c in labels if c != "N" and c not in WHOLE_FIELD_LABELS] if classes is None else list(classes)
    if set(classes) - set(labels):
        raise ConfigError(f"classes {sorted(set(classes) - set(labels))} are not among the model's labels {labels}")
    paths = (
        _dataset_images(dataset_dir)
        if images is None
        else [  # relative: to the dataset folder
            Path(p) if Path(p).is_absolute() or Path(p).exists() else dataset_dir / p for p in images
        ]
    )
    explainer = GradCAM(model, layer)
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=float), (len(labels),))
    per_class = {c: [] for c in classes}
    for start in tqdm(range(0, len(paths), batch_size), desc="localisation", disable=not progress):
        chunk = paths[start : start + batch_size]
        pairs = [
            (i, c, m[c]) for i, p in enumerate(chunk) for m in [load_masks(dataset_dir, p)] for c in classes if c in m
        ]
        if not pairs:
            continue
        batch = load_images(chunk, preprocess)
        probs = explainer.predict(batch)
        index = np.array([i for i, _, _ in pairs])
        maps = explainer(batch[index], [labels.index(c) for _, c, _ in pairs])
        for (i, c, mask), cam in zip(pairs, maps):
            aligned = preprocess_mask(mask, tf.io.read_file(str(chunk[i])), preprocess).numpy()
            per_class[c].append((cam, aligned, probs[i, labels.index(c)] > thresholds[labels.index(c)]))
    rows = []
    for c in classes:
        cams, masks, predicted = (
            (np.stack(v) for v in zip(*per_class[c])) if per_class[c] else [np.zeros((0, 1, 1))] * 3
        )
        summary = localisation(cams, masks, tolerance=tolerance)
        keys = ("energy_in_mask", "area_share", "ratio", "pointing_game", "empty_maps")
        rows.append(
            {"label": c, "images": summary["n"], "predicted": int(np.sum(predicted)), **{k: summary[k] for k in keys}}
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------
# Sanity check


def randomisation_check(
    model,
    images,
    class_index,
    *,
    layer: str | None = None,
    repeats: int = 3,
    seed: int | None = None,
    batch_size: int = 32,
) -> dict:
    """Model-randomisation test of Adebayo et al. (2018): Grad-CAM maps of the trained
    model against those of the same architecture with every weight re-initialised
    (``keras.models.clone_model`` draws fresh initial values; BatchNorm statistics
    reset). Maps that barely change reflect the input or the architecture, not the model.

    One random network is a noisy reference: by the signs its initial weights happen to
    take, its map favours the same high-contrast structures as the trained one or their
    complement (synthetic DR: single-draw means from -0.3 to 0.7), so the correlation is
    averaged over ``repeats`` re-initialisations.

    Args:
        model, images, class_index, layer, batch_size: as in ``gradcam``.
        repeats: independent re-initialisations.
        seed: if given, ``keras.utils.set_random_seed(seed)`` is called first (it resets
            Python's, NumPy's and Keras' global generators).

    Returns:
        ``spearman``: (repeats, N) Spearman rank correlations between the trained and the
        randomised maps (NaN where either map is constant, e.g. all zeros);
        ``mean_spearman``: their mean over the defined ones; ``n_undefined``;
        ``random_models``: the re-initialised models.
    """
    from scipy.stats import spearmanr

    if seed is not None:
        keras.utils.set_random_seed(seed)
    trained = gradcam(model, images, class_index, layer=layer, batch_size=batch_size)
    rho = np.full((repeats, len(trained)), np.nan)
    random_models = []
    for r in range(repeats):
        random_models.append(keras.models.clone_model(model))
        randomised = gradcam(random_models[-1], images, class_index, layer=layer, batch_size=batch_size)
        for i, (a, b) in enumerate(zip(trained, randomised)):
            if np.ptp(a) > 0 and np.ptp(b) > 0:
                rho[r, i] = spearmanr(a.ravel(), b.ravel()).statistic
    defined = rho[np.isfinite(rho)]
    return {
        "spearman": rho,
        "mean_spearman": float(defined.mean()) if defined.size else float("nan"),
        "n_undefined": int(np.sum(~np.isfinite(rho))),
        "random_models": random_models,
    }
