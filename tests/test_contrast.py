"""Ben Graham's local colour normalisation layer (kfundus.models.contrast) and the
EfficientNet option that puts it in front of the backbone."""

import math

import keras
import numpy as np
import pytest
from scipy import ndimage

from kfundus.systems.efficientnet.contrast import LocalContrast
from kfundus.systems.efficientnet.model import build_efficientnet_b0


def disk_image(size=48, radius=20, seed=0):
    """Random colours inside a centred disk, black outside (a cropped fundus field)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= radius**2
    image = rng.uniform(20, 255, (size, size, 3)) * disk[..., None]
    return image.astype("float32"), disk


def graham_reference(image, sigma, gain=4.0):
    """The same operation written independently with scipy's Gaussian filter (zero padding,
    truncated at ceil(3 sigma))."""
    radius = int(math.ceil(3 * sigma))
    blur = image.astype(np.float64)
    for axis in (0, 1):
        blur = ndimage.gaussian_filter1d(blur, sigma, axis=axis, mode="constant", cval=0.0, radius=radius)
    return np.clip(gain * (image - blur) + 128, 0, 255)


@pytest.mark.parametrize("sigma", [0.8, 48 / 60 * 2.5])
def test_layer_matches_an_independent_scipy_computation(sigma):
    image, disk = disk_image()
    got = np.asarray(LocalContrast(sigma)(image[None]))[0]
    want = graham_reference(image, sigma)
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert want[disk].std() > 20 and ((want > 0) & (want < 255)).mean() > 0.5  # texture, mostly unclipped


def test_flat_field_becomes_neutral_grey_away_from_its_edge():
    image, disk = disk_image()
    flat = np.where(disk[..., None], np.float32([180, 90, 40]), 0).astype("float32")
    got = np.asarray(LocalContrast(1.5)(flat[None]))[0]
    # a pixel whose whole blur window (radius ceil(4.5) = 5) is inside the field, or outside it,
    # has no local contrast: exactly the neutral 128; the edge ring differs
    square = np.ones((3, 3), bool)  # the separable window is a square
    interior = ndimage.binary_erosion(disk, square, iterations=5)
    exterior = ndimage.binary_erosion(~disk, square, iterations=5, border_value=1)
    np.testing.assert_allclose(got[interior | exterior], 128, atol=1e-3)
    assert np.abs(got[~(interior | exterior)] - 128).max() > 50


def test_efficientnet_option_saves_loads_and_keeps_the_layer(tmp_path):
    model = build_efficientnet_b0(2, image_size=32, local_contrast=True)
    layer = model.get_layer("local_contrast")
    assert layer.sigma == pytest.approx(32 / 60)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    image, _ = disk_image(size=32, radius=14)
    np.testing.assert_allclose(
        np.asarray(loaded({"image": image[None]})), np.asarray(model({"image": image[None]})), atol=1e-6
    )
    # the layer changes what the backbone sees: the same weights without it give other features
    plain = build_efficientnet_b0(2, image_size=32)
    plain.set_weights(model.get_weights())
    features = [keras.Model(m.inputs, m.get_layer("avg_pool").output)(image[None]) for m in (model, plain)]
    a, b = (np.asarray(f) for f in features)  # tiny at random init (BatchNorm's initial statistics): compare relatively
    assert np.abs(a - b).max() > 0.1 * np.abs(b).max()


def test_option_exports_to_float32_and_int8_tflite(tmp_path):
    """Builtin ops only, float32 equal to Keras, and the int8 file runs. The first version of the
    layer (a field mask with GREATER / CAST / SELECT_V2) converted but made the int8 interpreter
    abort the process, so the int8 file is run in a child process here."""
    import subprocess
    import sys

    from kfundus.data.synthetic import make_arrays
    from kfundus.deploy.saved_model import export_bundle
    from kfundus.deploy.tflite import has_flex_ops, run_tflite, tflite_ops

    model = build_efficientnet_b0(2, image_size=32, local_contrast=True)
    images = make_arrays(16, size=32, labels=("D", "C"), seed=0)[0].astype("float32")
    export_bundle(
        model,
        tmp_path,
        labels=["D", "C"],
        formats=("tflite",),
        tflite_variants=("float32", "int8"),
        calibration={"image": images},
        check=False,
    )
    for name in ("model.tflite", "model_int8.tflite"):
        assert not has_flex_ops(tmp_path / name) and "DEPTHWISE_CONV_2D" in tflite_ops(tmp_path / name)
    got = run_tflite(tmp_path / "model.tflite", {"image": images})["probabilities"]
    np.testing.assert_allclose(got, np.asarray(model(images)), atol=1e-4)
    code = (
        "import sys, numpy as np; from kfundus.deploy.tflite import run_tflite; "
        "out = run_tflite(sys.argv[1], {'image': np.load(sys.argv[2])})['probabilities']; "
        "assert out.shape == (16, 2) and np.isfinite(out).all(); print('ok')"
    )
    np.save(tmp_path / "x.npy", images)
    child = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "model_int8.tflite"), str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0 and "ok" in child.stdout, child.stderr[-2000:]
