"""Synthetic hypertensive-retinopathy data in the CGI-HRDC layout (``kfundus synth --layout hrdc``).

The CGI-HRDC 2023 challenge ships ``1-Images/1-Training Set/<name>.png`` and
``2-Groundtruths/HRDC Hypertensive Classification Training Labels.csv`` (columns
``Image,Hypertensive``; task 2 names its column ``Hypertensive Retinopathy``). This module
writes that layout with images from :func:`kfundus.data.synthetic.render.render_eye`.

The task is built so that the transfer protocols separate (the transfer study's tests):

- a hypertensive eye has the renderer's hypertensive findings (``"H"``: narrowed,
  straightened arteries from ``_vessel_tree(hypertensive=True)``, copper-wire reflex,
  flame haemorrhages by the disc) plus cotton-wool spots, pale fluffy patches, near the
  optic disc;
- a control eye gets the *same number and kind* of pale patches near the macula instead
  (hard-exudate-like decoys), and, with probability ``decoy_flames``, red streaks there too;
- both classes draw the same nuisance findings (cataract haze, myopic tessellation,
  drusen) with probability ``nuisance`` each, and a random exposure (brightness) change.

What separates the classes is *where* the lesions are (by the disc vs by the macula), not
how much lesion there is. A frozen, randomly initialised encoder pools its patches almost
uniformly, so its features barely see the position (a linear probe on them is poor); a
fine-tuned encoder learns it. All images are right eyes by default (disc on the image's
right), so position is a fixed image region; ``eyes="both"`` mixes laterality (harder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from kfundus.data.synthetic.render import Eye, blend, eye_seed, polar, render_eye

HRDC_IMAGES = Path("1-Images") / "1-Training Set"
HRDC_LABELS = Path("2-Groundtruths") / "HRDC Hypertensive Classification Training Labels.csv"
NUISANCE = ("C", "M", "A")


def _patches(geo, centre, rng, count, rmin, rmax):
    """Soft pale patches (alpha) around ``centre``, radius 0.07-0.1 FOV radii."""
    image, draw = geo.canvas()
    for point in polar(rng, centre, rmin, rmax, count):
        geo.dot(draw, point, rng.uniform(0.07, 0.1), rng.uniform(0.7, 1.3))
    return geo.alpha(image, blur=0.01)


def render_hr_eye(hypertensive: bool, *, size=64, eye="right", seed=0, nuisance=0.3, decoy_flames=0.5):
    """One synthetic eye of the HR task (see the module docstring); uint8 (size, size, 3)."""
    rng = np.random.default_rng([seed, 77])
    findings = {k for k in NUISANCE if rng.random() < nuisance}
    if hypertensive:
        findings.add("H")
    elif rng.random() < decoy_flames:
        findings.add("D")  # red lesions near the macula: the decoy of the flame haemorrhages
    image, _ = render_eye(findings, size=size, eye="right", seed=seed)
    # the renderer's geometry: Eye is the first draw of its "base" stream
    geo = Eye(np.random.default_rng([seed, 0]), size, 1.0)
    img = image.astype(np.float32) / 255.0
    illum = np.clip(1 - 0.35 * geo.rho**2.2, 0, 1)
    count = int(rng.integers(3, 6))
    centre, rmin, rmax = (geo.disc, geo.rd + 0.05, geo.rd + 0.3) if hypertensive else (geo.macula, 0.05, 0.3)
    alpha = _patches(geo, centre, rng, count, rmin, rmax)
    blend(img, illum, alpha * geo.fov, (0.97, 0.95, 0.86), 0.9)
    img *= rng.uniform(0.75, 1.2)  # exposure
    out = (np.clip(img * geo.fov[..., None], 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(out[:, ::-1]) if eye == "left" else out


def make_hrdc(
    out_dir,
    *,
    n_images=200,
    size=64,
    seed=0,
    prevalence=0.5,
    eyes="right",
    nuisance=0.3,
    decoy_flames=0.5,
    column="Hypertensive",
) -> Path:
    """Write a synthetic CGI-HRDC-layout dataset (see the module docstring).

    Args:
        out_dir: folder to write.
        n_images: images; each is its own patient (as in CGI-HRDC, which has no patient ids).
        size: image side in pixels.
        seed: the random seed (the same arguments write the same bytes).
        prevalence: share of hypertensive images.
        eyes: ``"right"`` (all right eyes) or ``"both"`` (random laterality).
        nuisance: probability of each nuisance finding (cataract, myopia, drusen), both classes.
        decoy_flames: probability that a control eye has red lesions near the macula.
        column: the label column name (``Hypertensive``: task 1; ``Hypertensive Retinopathy``: task 2).

    Returns:
        ``out_dir`` as a Path.
    """
    if eyes not in ("right", "both"):
        raise ValueError(f"eyes={eyes!r}: use 'right' or 'both'")
    out_dir = Path(out_dir)
    (out_dir / HRDC_IMAGES).mkdir(parents=True, exist_ok=True)
    (out_dir / HRDC_LABELS).parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7000])
    labels = rng.permutation(np.arange(n_images) < int(round(prevalence * n_images))).astype(int)
    rows = []
    for i, label in enumerate(labels):
        side = "right" if eyes == "right" else str(rng.choice(["left", "right"]))
        image = render_hr_eye(
            bool(label), size=size, eye=side, seed=eye_seed(seed, 70, i), nuisance=nuisance, decoy_flames=decoy_flames
        )
        name = f"{i:05d}.png"
        Image.fromarray(image).save(out_dir / HRDC_IMAGES / name)
        rows.append({"Image": name, column: int(label)})
    pd.DataFrame(rows).to_csv(out_dir / HRDC_LABELS, index=False)
    return out_dir
