"""Synthetic OCT B-scans through the fovea, in the Kermany et al. 2018 layout
(``kfundus synth --layout oct``): a layered retina with the findings of the four classes
(CNV, DME, DRUSEN, NORMAL), for the dual-stream OCT model's demo and tests. numpy and
Pillow only; the colour-fundus generator is ``kfundus.data.synthetic``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from kfundus.data.synthetic.render import eye_seed

# Retinal layers between the inner limiting membrane (t = 0) and the top of the retinal
# pigment epithelium (t = 1), and their reflectivity: NFL, GCL+IPL, INL, OPL, ONL, ELM +
# ellipsoid zone, outer segments, interdigitation zone.
_OCT_LAYERS = np.array([0.0, 0.08, 0.3, 0.42, 0.5, 0.82, 0.86, 0.93, 1.0])
_OCT_REFLECTIVITY = np.array([0.85, 0.5, 0.2, 0.55, 0.12, 0.7, 0.3, 0.45])


def render_bscan(label: str = "NORMAL", *, size=128, seed=0, aspect=1.0) -> np.ndarray:
    """Render one synthetic OCT B-scan through the fovea (greyscale uint8 of shape
    ``(size, round(size * aspect))``).

    Dark vitreous; a layered retina (bright nerve fibre layer, dark nuclear layers, bright
    plexiform and photoreceptor lines) with a foveal pit, random tilt and curvature; the
    bright retinal pigment epithelium (RPE); a choroid fading with depth; speckle. The
    findings of the Kermany classes (``kfundus.labels.OCT_CLASSES``):

    - ``CNV``: a dome of RPE and retina elevated by 8-12 % of the height, with dark fluid
      under it and a bright fibrovascular mass on Bruch's membrane;
    - ``DME``: a thickened retina without its pit, with 3-7 dark intraretinal cysts;
    - ``DRUSEN``: 2-5 small bumps of the RPE over moderately reflective deposits;
    - ``NORMAL``: none.
    """
    from kfundus.labels import OCT_CLASSES

    if label not in OCT_CLASSES:
        raise ValueError(f"label must be one of {OCT_CLASSES}, got {label!r}")
    rng = np.random.default_rng([seed, 11])
    find = np.random.default_rng([seed, 12 + OCT_CLASSES.index(label)])
    h, w = size, max(size, int(round(size * aspect)))
    x = (np.arange(w) + 0.5) / w
    y = (np.arange(h)[:, None] + 0.5) / h
    rpe_h = 0.025
    xf = rng.uniform(0.4, 0.6)
    rpe = rng.uniform(0.5, 0.62) + rng.uniform(-0.12, 0.12) * (x - 0.5) + rng.uniform(0, 0.35) * (x - 0.5) ** 2
    thick = rng.uniform(0.2, 0.25)
    pit = rng.uniform(0.5, 0.7) * thick * np.exp(-(((x - xf) / 0.07) ** 2))
    lift = np.zeros(w)
    cysts = []
    if label == "CNV":
        xc, width = xf + find.uniform(-0.1, 0.1), find.uniform(0.1, 0.16)
        lift = find.uniform(0.08, 0.12) * np.exp(-(((x - xc) / width) ** 2))
        pit = pit * 0.4
    elif label == "DME":
        pit = pit * 0.15 - find.uniform(0.06, 0.1) * np.exp(-(((x - xf) / 0.15) ** 2))
        cysts = [
            (
                xf + find.uniform(-0.18, 0.18),
                find.uniform(0.3, 0.75),
                find.uniform(0.02, 0.045),
                find.uniform(0.15, 0.3),
            )
            for _ in range(int(find.integers(3, 8)))
        ]
    elif label == "DRUSEN":
        for _ in range(int(find.integers(2, 6))):
            lift = lift + find.uniform(0.035, 0.06) * np.exp(
                -(((x - find.uniform(0.2, 0.8)) / find.uniform(0.025, 0.045)) ** 2)
            )
    top_rpe = rpe - lift
    ilm = rpe - thick + pit - (0.9 if label == "CNV" else 0.5) * lift
    t = (y - ilm) / (top_rpe - ilm)
    layer = np.clip(np.searchsorted(_OCT_LAYERS, t, side="right") - 1, 0, len(_OCT_REFLECTIVITY) - 1)
    img = np.where((t >= 0) & (t < 1), _OCT_REFLECTIVITY[layer], 0.03)
    for cx, ct, rx, rt in cysts:  # rx in widths, rt in retina thicknesses
        img = np.where(((x - cx) / rx) ** 2 + ((t - ct) / rt) ** 2 < 1, 0.05, img)
    bruch = rpe + rpe_h
    img = np.where((y >= top_rpe) & (y < top_rpe + rpe_h), 0.95, img)
    gap = (y >= top_rpe + rpe_h) & (y < bruch)
    if label == "CNV":
        mass = gap & (y > bruch - 0.4 * (bruch - top_rpe - rpe_h)) & (lift > 0.5 * lift.max())
        img = np.where(gap, 0.04, img)
        img = np.where(mass, 0.65, img)
    elif label == "DRUSEN":
        img = np.where(gap, 0.45, img)
    texture = 0.6 + 0.4 * np.clip(_smooth_field(rng, h, w), -1, 1)
    below = np.maximum(bruch, top_rpe + rpe_h)
    img = np.where(y >= below, 0.55 * np.exp(-(y - below) / 0.1) * texture, img)
    blurred = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(0.35 * size / 128)
    )
    img = np.asarray(blurred, dtype=np.float32) / 255.0
    img = img * rng.gamma(4.0, 0.25, img.shape) * rng.uniform(0.8, 1.1) + rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _smooth_field(rng, h, w, cells=(4, 16)):
    """Low-frequency noise in about [-1, 1] (choroidal vessels), wider than tall."""
    small = rng.standard_normal(cells).astype(np.float32)
    field = np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BICUBIC))
    return field / (np.abs(field).max() + 1e-6)


def make_oct(
    out_dir,
    *,
    n_patients=40,
    images_per_patient=2,
    size=128,
    seed=0,
    test_fraction=0.2,
    classes=None,
    aspect=1.0,
    jpeg_quality=90,
) -> Path:
    """Write synthetic OCT B-scans in the Kermany et al. 2018 layout:
    ``{train,test}/{CNV,DME,DRUSEN,NORMAL}/{CLASS}-{patient}-{n}.jpeg`` (greyscale JPEG).

    Patients (ids from 1000001) are given the classes in turn, so the classes are balanced;
    ``test_fraction`` of each class's patients go to ``test``, the rest to ``train``; each
    patient has ``images_per_patient`` B-scans (different seeds: different slices).

    Returns ``out_dir`` as a Path.
    """
    from kfundus.labels import OCT_CLASSES

    classes = list(classes or OCT_CLASSES)
    out_dir = Path(out_dir)
    rng = np.random.default_rng([seed, 4000])
    by_class = {c: [p for p in range(n_patients) if classes[p % len(classes)] == c] for c in classes}
    for label, patients in by_class.items():
        order = rng.permutation(patients)
        n_test = int(round(len(order) * test_fraction))
        for i, p in enumerate(order):
            split = "test" if i < n_test else "train"
            folder = out_dir / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(1, images_per_patient + 1):
                image = render_bscan(label, size=size, seed=eye_seed(seed, 40, int(p), k), aspect=aspect)
                Image.fromarray(image, mode="L").save(
                    folder / f"{label}-{1000001 + int(p)}-{k}.jpeg", quality=jpeg_quality
                )
    return out_dir
