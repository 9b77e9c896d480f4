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


def mask_dataset(path) -> Path | None:
    """The dataset folder of a ``masks/`` folder (``path`` is the dataset folder or its
    ``masks`` folder), or None when there is none."""
    path = Path(path)
    if path.name == "masks" and path.is_dir():
        return path.parent
    return path if (path / "masks").is_dir() else None


def has_mask(dataset_dir, image_path) -> bool:
    """Whether a synthetic dataset has a mask file for this image."""
    dataset_dir = Path(dataset_dir).resolve()
    try:
        rel = Path(image_path).resolve().relative_to(dataset_dir)
    except ValueError:
        return False
    parts = rel.parts[1:] if rel.parts[:1] == ("images",) else rel.parts
    return dataset_dir.joinpath("masks", *parts).with_suffix(".npz").exists()


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
    the image's own geometry (``preprocess_mask``); images are read as the model sees them
    (``load_images``: 8-bit). A two-eye model is measured per eye: each eye that has the
    lesion, with that eye's map of the patient's class logit (``GradCAM``).

    Args:
        model: the classifier; ``labels``: its output names.
        dataset_dir: a folder written by ``make_odir`` / ``make_rfmid`` with masks.
        preprocess: the ``Preprocess`` the model was trained with.
        classes: labels to measure. Default: all but ``N`` and the whole-field findings
            (cataract ``C``, myopia ``M``, their RFMiD columns): their mask is the entire
            field of view, where localisation is meaningless.
        images: the image paths to use (e.g. a held-out split; relative ones to the
            dataset folder), or for a two-eye model a table with ``left_image`` and
            ``right_image`` columns; default all images with masks (single-eye models).
        layer, batch_size: see ``gradcam``; ``tolerance``: see ``localisation``.
        threshold: for the ``predicted`` column (one value or one per label).

    Returns:
        One row per class: label, images, predicted, energy_in_mask, area_share, ratio,
        pointing_game, empty_maps.
    """
    from tqdm.auto import tqdm

    from kfundus.data.images import preprocess_mask
    from kfundus.data.synthetic import load_masks

    labels, dataset_dir = list(labels), Path(dataset_dir)
    classes = [c for c in labels if c != "N" and c not in WHOLE_FIELD_LABELS] if classes is None else list(classes)
    if set(classes) - set(labels):
        raise ConfigError(f"classes {sorted(set(classes) - set(labels))} are not among the model's labels {labels}")
    explainer = GradCAM(model, layer)
    inputs = explainer.input_names

    def resolve(p):  # relative: to the dataset folder
        return Path(p) if Path(p).is_absolute() or Path(p).exists() else dataset_dir / p

    if isinstance(images, pd.DataFrame):
        table = pd.DataFrame({n: [resolve(p) if str(p) else None for p in images[n]] for n in inputs})
    elif len(inputs) > 1:
        raise ConfigError(f"model {model.name} reads {inputs}: give images as a table with those columns")
    else:
        paths = _dataset_images(dataset_dir) if images is None else [resolve(p) for p in images]
        table = pd.DataFrame({inputs[0]: paths})
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=float), (len(labels),))
    per_class = {c: [] for c in classes}
    for start in tqdm(range(0, len(table), batch_size), desc="localisation", disable=not progress):
        chunk = table.iloc[start : start + batch_size].reset_index(drop=True)
        pairs = [
            (i, n, c, m[c])
            for i in range(len(chunk))
            for n in inputs
            if chunk[n].iloc[i] is not None and has_mask(dataset_dir, chunk[n].iloc[i])
            for m in [load_masks(dataset_dir, chunk[n].iloc[i])]
            for c in classes
            if c in m
        ]
        if not pairs:
            continue
        batch = {n: load_images(chunk[n], preprocess) for n in inputs}
        probs = explainer.predict(batch)
        index = np.array([i for i, _, _, _ in pairs])
        maps = explainer({n: batch[n][index] for n in inputs}, [labels.index(c) for _, _, c, _ in pairs])
        maps = maps if isinstance(maps, dict) else {inputs[0]: maps}
        for k, (i, n, c, mask) in enumerate(pairs):
            aligned = preprocess_mask(mask, tf.io.read_file(str(chunk[n].iloc[i])), preprocess).numpy()
            per_class[c].append((maps[n][k], aligned, probs[i, labels.index(c)] > thresholds[labels.index(c)]))
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


def plot_localisation(table: pd.DataFrame, path) -> Path:
    """Two bar panels per class of a ``localisation_report`` table: the energy ratio
    (energy share in the mask over its area share; the dashed line at 1 is chance) and
    the pointing game (share of maps whose maximum hits the lesion)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(max(5.0, 1.2 * len(table) + 3), 3.4), dpi=120)
    FigureCanvasAgg(fig)
    names = [f"{r.label}\n(n={r.images})" for r in table.itertuples()]
    for k, (column, title) in enumerate(
        (("ratio", "energy in mask / mask area"), ("pointing_game", "pointing game (hit rate)"))
    ):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.bar(range(len(table)), np.nan_to_num(table[column].to_numpy(dtype=float)))
        ax.set_xticks(range(len(table)), names, fontsize=8)
        ax.set_title(title, fontsize=9)
        if column == "ratio":
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        else:
            ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path)
    return path


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
