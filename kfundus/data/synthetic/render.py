"""The fundus renderer behind ``kfundus.data.synthetic``: one eye at a time, anatomy and
lesions drawn in field-of-view units with numpy and Pillow (a 128 px image takes about
6 ms on one core). ``render_eye`` returns the image and one mask per drawn label.

Conventions (chosen here; the datasets leave them implicit):

- Laterality: as the camera sees the eye (as in ODIR), the optic disc is on the nasal side:
  the image's right for a right eye, the left for a left eye; the macula lies 2.5 disc
  diameters temporal to it, slightly below. A left eye is exactly ``np.fliplr`` of the
  right eye drawn with the same seed.
- Sizes are in field-of-view (FOV) radii, so lesions scale with the image (dots keep at
  least 0.6 px), and one seed gives the same eye at every ``size``.
- The anatomy comes from ``seed``, each label's lesions from a stream of their own: adding a
  finding changes only its pixels (cataract changes the whole image, hypertension arteries).
- Lesions (the mask of a label is where it is drawn): D microaneurysms, blot haemorrhages
  and hard-exudate clusters near the macula, more with the grade (1-3: mild, moderate,
  severe non-proliferative); G cup/disc ratio 0.7-0.9 instead of 0.2-0.4, mask = the disc;
  C blur, lowered contrast and a whitish veil, mask = the FOV; A soft yellow drusen around
  the macula; H narrowed, straightened arteries with a light (copper-wire) reflex and flame
  haemorrhages near the disc, mask = arteries + haemorrhages; M choroidal tessellation and
  a temporal peripapillary atrophy crescent, mask = the FOV (tessellation is everywhere);
  O a pigmented chorioretinal scar.

Example:

>>> image, masks = render_eye({"G", "D"}, size=128, eye="right", seed=3)
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from kfundus.labels import ODIR_LABELS

DISEASES = [label for label in ODIR_LABELS if label != "N"]
_SS = 2  # supersampling of drawn shapes (anti-aliasing)
_STEP = 0.025  # vessel walk step, in FOV radii


class Eye:
    """Pixel grid and anatomy in the canonical frame: a right eye, unrotated, FOV radius 1,
    ``u`` to the right (nasal) and ``v`` down."""

    def __init__(self, rng, size, aspect):
        self.h, self.w = size, max(size, int(round(size * aspect)))
        r = size * (rng.uniform(0.5, 0.57) if aspect > 1.05 else rng.uniform(0.44, 0.48))
        self.r = min(r, 0.48 * self.w)
        self.cx = self.w / 2 + rng.uniform(-0.02, 0.02) * size
        self.cy = self.h / 2 + rng.uniform(-0.02, 0.02) * size
        angle = np.deg2rad(rng.uniform(-12, 12))
        self.cos, self.sin = np.cos(angle), np.sin(angle)
        yy, xx = np.mgrid[0 : self.h, 0 : self.w].astype(np.float32) + 0.5
        dx, dy = (xx - self.cx) / self.r, (yy - self.cy) / self.r
        self.u, self.v = self.cos * dx + self.sin * dy, -self.sin * dx + self.cos * dy
        self.rho = np.hypot(dx, dy)
        self.fov = np.clip((1 - self.rho) * self.r + 0.5, 0, 1)
        self.disc = np.array([rng.uniform(0.33, 0.42), rng.uniform(-0.06, 0.06)])
        self.rd = rng.uniform(0.12, 0.15)  # disc radius: diameter 0.24-0.3 FOV radii
        self.disc_aspect = rng.uniform(1.0, 1.12)  # taller than wide
        self.macula = self.disc + [-5 * self.rd * rng.uniform(0.9, 1.1), rng.uniform(0.02, 0.08)]

    def to_px(self, pts):
        """Canonical points (n, 2) -> supersampled pixel coordinates (n, 2)."""
        pts = np.asarray(pts, dtype=float).reshape(-1, 2)
        x = self.cx + self.r * (self.cos * pts[:, 0] - self.sin * pts[:, 1])
        y = self.cy + self.r * (self.sin * pts[:, 0] + self.cos * pts[:, 1])
        return np.stack([x, y], 1) * _SS

    def canvas(self):
        image = Image.new("L", (self.w * _SS, self.h * _SS), 0)
        return image, ImageDraw.Draw(image)

    def alpha(self, image, blur=0.0):
        """A drawn supersampled canvas -> float alpha in [0, 1] at image size."""
        if blur > 0:
            image = image.filter(ImageFilter.GaussianBlur(blur * self.r * _SS))
        return np.asarray(image.resize((self.w, self.h), Image.BOX), dtype=np.float32) / 255.0

    def dot(self, draw, centre, radius, stretch=1.0):
        """An ellipse of ``radius`` FOV radii (at least 0.6 pixel)."""
        ((x, y),) = self.to_px(centre)
        rx = max(radius * self.r, 0.6) * _SS
        draw.ellipse([x - rx, y - rx * stretch, x + rx, y + rx * stretch], fill=255)


def _smooth_noise(rng, eye, cells=6):
    """Low-frequency noise in about [-1, 1] (the draws do not depend on the image size)."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((eye.w, eye.h), Image.BICUBIC))


def polar(rng, centre, rmin, rmax, n):
    """n points around centre at radii in [rmin, rmax] (uniform over the area)."""
    t, rr = rng.uniform(0, 2 * np.pi, n), np.sqrt(rng.uniform(rmin**2, rmax**2, n))
    return np.asarray(centre) + np.stack([rr * np.cos(t), rr * np.sin(t)], 1)


def blend(img, illum, alpha, colour, strength=1.0):
    """Paint a colour (shaded by the illumination) through an alpha map, in place."""
    a = (alpha * strength)[..., None]
    img *= 1 - a
    img += a * np.asarray(colour, np.float32) * (0.45 + 0.55 * illum)[..., None]


def _walks(rng, starts, headings, lengths, turns, wiggles, decays):
    """Vessel paths, one per row: curving random walks, cut where they leave the FOV. The
    draws depend only on the lengths, so straighter (hypertensive) arteries change nothing else."""
    k, n = len(starts), max(2, int(np.max(lengths) / _STEP))
    s = np.arange(n) * _STEP
    noise = rng.standard_normal((k, n))
    dh = turns[:, None] * np.exp(-s / decays[:, None]) * _STEP
    dh += wiggles[:, None] * np.sqrt(_STEP) * noise
    h = np.concatenate([headings[:, None], headings[:, None] + np.cumsum(dh, 1)], 1)
    steps = _STEP * np.stack([np.cos(h[:, :-1]), np.sin(h[:, :-1])], -1)
    pts = np.concatenate([starts[:, None], starts[:, None] + np.cumsum(steps, 1)], 1)
    outside = np.hypot(pts[..., 0], pts[..., 1]) > 1.02
    first_out = np.where(outside.any(1), outside.argmax(1), n + 1)
    ends = np.maximum(np.minimum(first_out, (lengths / _STEP).astype(int) + 1), 2)
    return [(pts[i, :e], h[i, :e]) for i, e in enumerate(ends)]


def _vessel_tree(rng, eye, hypertensive):
    """Veins and arteries from the disc: two temporal arcades arching around the macula, two
    nasal, one straight nasal, each with two levels of branches; arteries are thinner.
    Returns a list of ``(points (n, 2), width, is_artery)`` in canonical units."""
    hp = np.pi / 2
    # heading, turn, turn decay, length, relative width of the trunks
    trunks = np.array(
        [
            (-hp - 0.25, -2.4, 0.7, 1.8, 1.0),
            (hp + 0.25, 2.4, 0.7, 1.8, 1.0),
            (-hp + 0.3, 1.0, 1.0, 1.0, 0.8),
            (hp - 0.3, -1.0, 1.0, 1.0, 0.8),
            (0.0, 0.0, 1.0, 0.7, 0.6),
        ]
        * 2
    )
    k = len(trunks)
    artery = np.repeat([False, True], k // 2)
    straight = np.where(artery & hypertensive, 0.35, 1.0)
    starts = eye.disc + rng.uniform(-0.3, 0.3, (k, 2)) * eye.rd
    headings = trunks[:, 0] + rng.uniform(-0.15, 0.15, k)
    turns = trunks[:, 1] * rng.uniform(0.85, 1.15, k)
    paths = _walks(rng, starts, headings, trunks[:, 3], turns, 0.6 * straight, trunks[:, 2])
    widths = np.where(artery, 0.017, 0.024) * trunks[:, 4] * np.where(straight < 1, 0.55, 1.0)
    vessels = parents = list(zip(paths, widths, artery, straight))
    for depth in (0, 1):
        idx = np.repeat(np.arange(len(parents)), rng.integers(2 - depth, 4 - depth, len(parents)))
        m = len(idx)
        frac, side = rng.uniform(0.15, 0.85, m), rng.choice([-1.0, 1.0], m)
        angle, length = rng.uniform(0.4, 0.9, m), rng.uniform(0.25, 0.6, m) * (1.5 - 0.5 * depth)
        bturn, shrink = rng.uniform(0, 1.5, m), rng.uniform(0.55, 0.75, m)
        where = [(parents[j][0], int(f * (len(parents[j][0][0]) - 1))) for j, f in zip(idx, frac)]
        starts = np.array([path[0][i] for path, i in where])
        heads = np.array([path[1][i] for path, i in where]) + side * angle
        st = np.array([parents[j][3] for j in idx])
        paths = _walks(rng, starts, heads, length, side * bturn * st, 0.8 * st, np.ones(m))
        parents = [(p, parents[j][1] * f, parents[j][2], parents[j][3]) for p, j, f in zip(paths, idx, shrink)]
        vessels = vessels + parents
    return [(path[0], width, bool(art)) for path, width, art, _ in vessels]


def _draw_vessels(eye, vessels):
    """Vein and artery alpha maps (tapering polylines, drawn supersampled)."""
    px = np.split(
        eye.to_px(np.concatenate([p for p, _, _ in vessels])), np.cumsum([len(p) for p, _, _ in vessels])[:-1]
    )
    out = {}
    for artery in (False, True):
        image, draw = eye.canvas()
        for (_, width, is_artery), xy in zip(vessels, px):
            half = len(xy) // 2 + 1
            for part, taper in ((xy[:half], 1.0), (xy[half - 1 :], 0.75)):
                if is_artery == artery and len(part) > 1:
                    w = max(1, int(round(width * taper * eye.r * _SS)))
                    draw.line(part.ravel().tolist(), fill=255, width=w, joint="curve")
        out[artery] = eye.alpha(image)
    return out[False], out[True]


def _diabetic(rng, eye, grade):
    """Microaneurysms and blots (red alpha), hard exudate clusters (yellow alpha)."""
    grade = int(rng.integers(1, 4)) if grade is None else int(grade)
    n_ma, n_blot, n_cluster = [(8, 3, 1), (12, 5, 2), (18, 8, 3)][grade - 1]
    red, draw = eye.canvas()
    for centre in polar(rng, eye.macula, 0.05, 0.75, n_ma + int(rng.integers(0, 5))):
        eye.dot(draw, centre, 0.014)
    for centre in polar(rng, eye.macula, 0.05, 0.7, n_blot):
        eye.dot(draw, centre, rng.uniform(0.035, 0.06), rng.uniform(0.7, 1.3))
    yellow, draw = eye.canvas()
    for centre in polar(rng, eye.macula, 0.12, 0.4, n_cluster):
        for speck in centre + rng.normal(0, 0.045, (int(rng.integers(5, 13)), 2)):
            eye.dot(draw, speck, rng.uniform(0.018, 0.032))
    return eye.alpha(red), eye.alpha(yellow)


def _drusen(rng, eye):
    """Soft round yellow deposits clustered on the macula (alpha)."""
    image, draw = eye.canvas()
    n = int(rng.integers(12, 36))
    t, rr = rng.uniform(0, 2 * np.pi, n), np.minimum(np.abs(rng.normal(0, 0.15, n)), 0.35)
    for centre, radius in zip(eye.macula + np.stack([rr * np.cos(t), rr * np.sin(t)], 1), rng.uniform(0.015, 0.04, n)):
        eye.dot(draw, centre, radius)
    return eye.alpha(image, blur=0.008)


def _flames(rng, eye):
    """Flame haemorrhages: streaks along the nerve fibres, radial from the disc (alpha)."""
    image, draw = eye.canvas()
    s = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    for _ in range(int(rng.integers(3, 7))):
        t = rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 2.4)
        d, length, width = rng.uniform(0.2, 0.55), rng.uniform(0.07, 0.12), rng.uniform(0.02, 0.03)
        along = np.array([np.cos(t), np.sin(t)])
        pts = (
            eye.disc
            + d * along
            + np.outer(length * np.cos(s), along)
            + np.outer(width * np.sin(s), [-along[1], along[0]])
        )
        draw.polygon(eye.to_px(pts).ravel().tolist(), fill=255)
    return eye.alpha(image)


def _scar(rng, eye):
    """A chorioretinal scar away from the disc: a pale irregular patch (alpha) and dark
    pigment clumps over it (alpha)."""
    radius = rng.uniform(0.1, 0.16)
    candidates = polar(rng, (0, 0), 0.25, 0.8 - radius, 16)
    centre = candidates[np.argmax(np.hypot(*(candidates - eye.disc).T) > eye.rd + radius + 0.1)]
    s = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    rr = radius * (1 + 0.25 * rng.uniform(-1, 1, 16))
    pale, draw = eye.canvas()
    outline = centre + np.stack([rr * np.cos(s), rr * np.sin(s)], 1)
    draw.polygon(eye.to_px(outline).ravel().tolist(), fill=255)
    pigment, draw = eye.canvas()
    n = int(rng.integers(10, 18))
    t, f = rng.uniform(0, 2 * np.pi, n), np.sqrt(rng.uniform(0.0, 1.0, n))
    for clump, size in zip(
        centre + radius * np.stack([f * np.cos(t), f * np.sin(t)], 1), rng.uniform(0.2, 0.35, n) * radius
    ):
        eye.dot(draw, clump, size)
    return eye.alpha(pale, blur=0.006), eye.alpha(pigment)


def _myopia(rng, eye):
    """Tessellation (dark spaces between warped radial choroidal vessels, a 0-1 map) and a
    peripapillary atrophy crescent on the temporal side of the disc (alpha)."""
    n, warp = rng.uniform(24, 32), 3.0 * _smooth_noise(rng, eye, 8)
    du, dv = eye.u - eye.disc[0], eye.v - eye.disc[1]
    rr = np.hypot(du, dv) + 1e-6
    stripes = np.cos(n * np.arctan2(dv, du) + warp + 3 * rr)
    dark = np.clip((stripes - 0.1) * 2, 0, 1) * np.clip(rr / eye.rd - 1, 0, 1)
    towards = np.clip(-du / rr, 0, 1)  # 1 on the temporal side
    outer = eye.rd * (1 + rng.uniform(0.4, 0.8) * towards**1.5)
    crescent = np.clip((outer - rr) * eye.r, 0, 1) * (rr > 0.85 * eye.rd) * (towards > 0.1)
    return dark, crescent


def _cataract(rng, eye, img, illum):
    """Media haze: Gaussian blur, lowered contrast and an uneven whitish-yellow veil."""
    blur, contrast, veil = rng.uniform(0.008, 0.018), rng.uniform(0.6, 0.8), rng.uniform(0.2, 0.4)
    img8 = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    img = np.asarray(img8.filter(ImageFilter.GaussianBlur(blur * eye.h)), np.float32) / 255
    mean = img[eye.rho <= 1].mean(0)
    img = mean + (img - mean) * contrast
    amount = veil * (0.75 + 0.25 * _smooth_noise(rng, eye, 4)) * (1 - 0.3 * np.minimum(eye.rho, 1) ** 2)
    blend(img, illum, np.clip(amount, 0, 1), (0.9, 0.82, 0.66))
    return img


def render_eye(findings=(), *, size=128, eye="left", seed=0, aspect=1.0, dr_grade=None):
    """Render one synthetic colour fundus photograph.

    Args:
        findings: ODIR disease letters drawn in this eye (a subset of D, G, C, A, H, M, O;
            empty = a normal eye; ``"N"`` is ignored).
        size: image height in pixels.
        eye: ``"left"`` or ``"right"`` (the disc is on the image's left for a left eye).
        seed: the random seed; the same arguments always give the same image.
        aspect: width / height, >= 1. Above 1 the frame is wider than tall, like real
            cameras (4288x2848 is 1.5), and the FOV is clipped at top and bottom.
        dr_grade: 1 (mild), 2 (moderate) or 3 (severe) non-proliferative DR, used with
            ``"D"``; None draws one from the seed.

    Returns:
        ``(image, masks)``: uint8 (size, round(size * aspect), 3) and a dict with one
        boolean array of the same height and width per finding, True where it is drawn.
    """
    findings = set(findings) - {"N"}
    if findings - set(DISEASES):
        raise ValueError(f"unknown findings {sorted(findings - set(DISEASES))}: use {DISEASES}")
    if eye not in ("left", "right") or aspect < 1:
        raise ValueError(f"eye must be 'left' or 'right' (got {eye!r}), aspect >= 1 (got {aspect})")
    rngs = {k: np.random.default_rng([seed, i]) for i, k in enumerate(["base", *DISEASES, "noise"])}
    rng = rngs["base"]
    geo = Eye(rng, size, aspect)
    fov, masks = geo.rho <= 1, {}
    # background: reddish-orange, vignetting, an illumination gradient, choroidal texture
    base = np.array([rng.uniform(0.72, 0.92), rng.uniform(0.28, 0.42), rng.uniform(0.08, 0.18)], np.float32)
    g = rng.normal(0, 0.08, 2)
    illum = (1 - rng.uniform(0.25, 0.45) * geo.rho**2.2) * (1 + g[0] * geo.u + g[1] * geo.v)
    img = base * (illum * (1 + 0.05 * _smooth_noise(rng, geo, 8)))[..., None]
    cdr, vessels = rng.uniform(0.2, 0.4), _vessel_tree(rng, geo, "H" in findings)
    if "M" in findings:
        dark, crescent = _myopia(rngs["M"], geo)
        img *= 1 - 0.42 * dark[..., None] * np.array([0.45, 0.65, 0.55], np.float32)
        blend(img, illum, crescent, (0.97, 0.86, 0.68), 0.9)
        masks["M"] = fov
    macula = np.exp(-(np.hypot(geo.u - geo.macula[0], geo.v - geo.macula[1]) ** 2) / (2 * 0.14**2))
    img *= 1 - macula[..., None] * np.array([0.3, 0.45, 0.35], np.float32)
    if "A" in findings:
        alpha = _drusen(rngs["A"], geo)
        blend(img, illum, alpha, (1.0, 0.88, 0.5), 0.85)
        masks["A"] = alpha > 0.3
    if "O" in findings:
        pale, pigment = _scar(rngs["O"], geo)
        blend(img, illum, pale, (0.93, 0.82, 0.62), 0.85)
        blend(img, illum, pigment, (0.08, 0.05, 0.04), 0.95)
        masks["O"] = (pale > 0.3) | (pigment > 0.3)
    # optic disc and its cup (slightly temporal in the disc)
    du, dv = (geo.u - geo.disc[0]) / geo.rd, (geo.v - geo.disc[1]) / (geo.rd * geo.disc_aspect)
    e = np.hypot(du, dv)
    disc = np.clip((1 - e) / 0.15, 0, 1)  # a soft margin
    if "G" in findings:
        cdr, masks["G"] = rngs["G"].uniform(0.7, 0.9), e <= 1
    cup = np.clip((cdr - np.hypot(du + 0.1, dv)) / 0.12 + 0.5, 0, 1) * disc
    blend(img, illum, disc, (1.0, 0.74, 0.46))
    blend(img, np.ones_like(illum), cup, (1.0, 0.94, 0.8))
    veins, arteries = _draw_vessels(geo, vessels)
    img *= 1 - veins[..., None] * (1 - np.array([0.5, 0.3, 0.42], np.float32))
    if "H" in findings:  # narrowed arteries with a copper-wire light reflex
        blend(img, illum, arteries, (1.0, 0.62, 0.42), 0.7)
        flames = _flames(rngs["H"], geo)
        blend(img, illum, flames, (0.5, 0.07, 0.05), 0.9)
        masks["H"] = (flames > 0.3) | (arteries > 0.15)
    else:
        img *= 1 - arteries[..., None] * (1 - np.array([0.78, 0.5, 0.55], np.float32))
    if "D" in findings:
        red, yellow = _diabetic(rngs["D"], geo, dr_grade)
        blend(img, illum, red, (0.45, 0.05, 0.04), 0.95)
        blend(img, illum, yellow, (1.0, 0.95, 0.5), 0.95)
        masks["D"] = (red > 0.3) | (yellow > 0.3)
    if "C" in findings:
        img = _cataract(rngs["C"], geo, img, illum)
        masks["C"] = fov
    img += rngs["noise"].normal(0, 0.012, img.shape).astype(np.float32)
    image = (np.clip(img * geo.fov[..., None], 0, 1) * 255 + 0.5).astype(np.uint8)
    masks = {k: masks[k] & fov for k in DISEASES if k in masks}
    if eye == "left":
        image = np.ascontiguousarray(image[:, ::-1])
        masks = {k: np.ascontiguousarray(m[:, ::-1]) for k, m in masks.items()}
    return image, masks


def eye_seed(*keys) -> int:
    """An image's seed from the dataset seed and its position (independent streams)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
