import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from kfundus.data.images import Preprocess, decode, preprocess_image
from kfundus.data.manifest import Manifest
from kfundus.data.pipeline import Augment, make_dataset, prepare
from kfundus.errors import DataError


def fundus_like(height, width, radius, value=(180, 90, 40)):
    """A bright disc (the field of view) centred on a black frame."""
    yy, xx = np.mgrid[:height, :width]
    inside = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < radius**2
    image = np.zeros((height, width, 3), np.uint8)
    image[inside] = value
    return image


def write(path, array, fmt=None, **kwargs):
    Image.fromarray(array).save(path, format=fmt, **kwargs)
    return str(path)


def manifest_of(paths, labels=None, name="t"):
    labels = np.arange(len(paths)) % 2 if labels is None else labels
    frame = pd.DataFrame(
        {"image": [str(p) for p in paths], "patient_id": [f"p{i}" for i in range(len(paths))], "y": labels}
    )
    return Manifest(frame, ["y"], name=name)


# --- decoding ---------------------------------------------------------------------------


def test_decode_formats_to_rgb_uint8(tmp_path):
    grey = np.full((20, 30), 100, np.uint8)
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    cases = {
        "grey.png": write(tmp_path / "grey.png", grey),
        "grey.jpg": write(tmp_path / "grey.jpg", grey, quality=100),
        "rgba.png": write(tmp_path / "rgba.png", rgba),
        "palette.png": str(tmp_path / "palette.png"),
        "bmp.bmp": write(tmp_path / "bmp.bmp", np.dstack([grey] * 3)),
    }
    Image.fromarray(np.dstack([grey] * 3)).convert("P").save(cases["palette.png"])
    for name, path in cases.items():
        image = decode(tf.io.read_file(path), 20).numpy()  # target = short side: no reduction
        assert image.shape == (20, 30, 3) and image.dtype == np.uint8, name
        if name.startswith("rgba"):
            assert abs(int(image[..., 0].mean()) - 200) <= 1 and image[..., 1].max() == 0, name
        else:
            assert abs(float(image.mean()) - 100) < 2, name


def test_16bit_png_is_scaled_not_truncated(tmp_path):
    value = np.full((16, 16, 3), 40000, np.uint16)  # 40000/65535*255 = 155.6
    path = tmp_path / "deep.png"
    path.write_bytes(tf.io.encode_png(value).numpy())
    image = decode(tf.io.read_file(str(path)), 8).numpy()
    assert image.dtype == np.uint8
    assert int(image.min()) == int(image.max()) == round(40000 / 65535 * 255)


@pytest.mark.parametrize("target,ratio", [(128, 8), (224, 4), (500, 2), (1200, 1)])
def test_large_jpeg_decoded_at_reduced_size_in_dct_domain(tmp_path, target, ratio):
    path = write(tmp_path / "big.jpg", fundus_like(1400, 2000, 650))
    image = decode(tf.io.read_file(path), target).numpy()
    assert image.shape[:2] == (int(np.ceil(1400 / ratio)), int(np.ceil(2000 / ratio)))
    assert min(image.shape[:2]) >= target


def test_fundus_crop_removes_black_border(tmp_path):
    # a wide frame whose circular field spans the full height and 60 % of the width
    path = write(tmp_path / "wide.png", fundus_like(300, 500, 150))
    cropped = preprocess_image(tf.io.read_file(path), Preprocess(image_size=64)).numpy()
    uncropped = preprocess_image(tf.io.read_file(path), Preprocess(image_size=64, crop_fundus=False)).numpy()
    field = cropped.max(axis=-1) > 15
    # the field's bounding box fills the frame after cropping ...
    assert field[32].sum() >= 62 and field[:, 32].sum() >= 62
    # ... while without the crop the side borders are black and the field is letter-boxed
    assert (uncropped.max(axis=-1) > 15)[32].sum() < 45
    # an all-black image survives (no field to crop)
    black = write(tmp_path / "black.png", np.zeros((40, 60, 3), np.uint8))
    assert preprocess_image(tf.io.read_file(black), Preprocess(image_size=32)).numpy().max() == 0


# --- prepare / cache ----------------------------------------------------------------------


def brightness_dataset(tmp_path, n=12):
    """Images whose brightness encodes their label, so misaligned labels are detectable."""
    paths, labels = [], []
    for i in range(n):
        label = i % 2
        paths.append(write(tmp_path / f"img{i}.jpg", fundus_like(80, 100, 38, value=(60 + 150 * label,) * 3)))
        labels.append(label)
    return paths, np.array(labels)


def test_cache_reused_and_keyed_by_settings_and_files(tmp_path):
    (tmp_path / "img").mkdir()
    paths, labels = brightness_dataset(tmp_path / "img", 6)
    m = manifest_of(paths, labels)
    cache = tmp_path / "cache"
    first = prepare(m, Preprocess(image_size=32), cache_dir=cache, progress=False)
    index = Path(first.files[0]).parent / "index.json"
    stamp = index.stat().st_mtime_ns
    again = prepare(m, Preprocess(image_size=32), cache_dir=cache, progress=False)
    assert again.files == first.files and index.stat().st_mtime_ns == stamp  # reused, not rebuilt
    other_size = prepare(m, Preprocess(image_size=48), cache_dir=cache, progress=False)
    assert other_size.files != first.files
    os.utime(paths[0], ns=(1, 1))  # a changed file changes the key
    assert prepare(m, Preprocess(image_size=32), cache_dir=cache, progress=False).files != first.files


def test_dataset_yields_aligned_labels_and_named_inputs(tmp_path):
    paths, labels = brightness_dataset(tmp_path)
    prepared = prepare(manifest_of(paths, labels), Preprocess(image_size=32), cache_dir=tmp_path / "c", progress=False)
    seen = 0
    for inputs, targets in make_dataset(prepared, batch_size=5, training=True, seed=3):
        x = inputs.numpy()
        assert x.dtype == np.float32 and x.shape[1:] == (32, 32, 3) and x.min() >= 0 and x.max() <= 255
        bright = x.reshape(len(x), -1).max(axis=1) > 150
        np.testing.assert_array_equal(bright, targets.numpy()[:, 0] == 1)
        seen += len(x)
    assert seen == len(paths)


def test_unreadable_images_raise_naming_them_or_are_skipped(tmp_path):
    paths, labels = brightness_dataset(tmp_path, 8)
    good = Path(paths[0]).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    corrupt = bytearray(good)
    for i in range(len(corrupt) // 2, len(corrupt) - 10, 7):
        corrupt[i] = 0xFF if i % 2 else 0xD9  # inject bogus markers into the entropy-coded data
    (tmp_path / "corrupt.jpg").write_bytes(bytes(corrupt))
    (tmp_path / "noise.jpg").write_bytes(os.urandom(2000))
    (tmp_path / "empty.png").write_bytes(b"")
    bad = ["truncated.jpg", "corrupt.jpg", "noise.jpg", "empty.png", "missing.jpg"]
    all_paths = paths + [str(tmp_path / b) for b in bad]
    all_labels = np.concatenate([labels, [1] * len(bad)])
    m = manifest_of(all_paths, all_labels)
    with pytest.raises(DataError) as err:
        prepare(m, Preprocess(image_size=32), cache_dir=tmp_path / "c", progress=False)
    for name in bad:
        assert name in str(err.value)
    assert "skip_unreadable" in str(err.value)

    prepared = prepare(m, Preprocess(image_size=32), cache_dir=tmp_path / "c", skip_unreadable=True, progress=False)
    assert sorted(Path(p).name for p in prepared.skipped["path"]) == sorted(bad)
    reasons = dict(zip(prepared.skipped["path"].map(lambda p: Path(p).name), prepared.skipped["detail"]))
    assert reasons["missing.jpg"] == "file not found" and reasons["empty.png"] == "empty file"
    assert len(prepared.manifest) == len(paths)
    xs, ys = [], []
    for inputs, targets in make_dataset(prepared, batch_size=4):
        xs.append(inputs.numpy())
        ys.append(targets.numpy())
    x, y = np.concatenate(xs), np.concatenate(ys)
    np.testing.assert_array_equal(x.reshape(len(x), -1).max(axis=1) > 150, y[:, 0] == 1)


def test_two_eye_rows_yield_left_and_right(tmp_path):
    paths, _ = brightness_dataset(tmp_path, 4)
    frame = pd.DataFrame({"left_image": paths[0::2], "right_image": paths[1::2], "patient_id": ["a", "b"], "y": [0, 1]})
    prepared = prepare(
        Manifest(frame, ["y"], name="two"), Preprocess(image_size=32), cache_dir=tmp_path / "c", progress=False
    )
    inputs, targets = next(iter(make_dataset(prepared, batch_size=2)))
    assert set(inputs) == {"left_image", "right_image"}
    # left eyes are the dark (label 0) images, right eyes the bright ones
    assert inputs["left_image"].numpy().max() < 150 < inputs["right_image"].numpy().max()
    np.testing.assert_array_equal(targets.numpy()[:, 0], [0, 1])


def test_augmentation_switches(tmp_path):
    paths, labels = brightness_dataset(tmp_path, 4)
    prepared = prepare(manifest_of(paths, labels), Preprocess(image_size=32), cache_dir=tmp_path / "c", progress=False)
    plain = np.concatenate([x.numpy() for x, _ in make_dataset(prepared, batch_size=4)])
    # training without augmentation only reorders
    again = np.concatenate([x.numpy() for x, _ in make_dataset(prepared, batch_size=4, training=True)])
    assert sorted(plain.sum(axis=(1, 2, 3)).round(2)) == sorted(again.sum(axis=(1, 2, 3)).round(2))
    assert not Augment().enabled()  # horizontal flip (laterality!) is off unless asked for
    aug = np.concatenate(
        [
            x.numpy()
            for x, _ in make_dataset(
                prepared, batch_size=4, training=True, augment=Augment(rotation=30, zoom=0.2, brightness=0.2)
            )
        ]
    )
    assert aug.shape == plain.shape and aug.min() >= 0 and aug.max() <= 255
    assert not np.allclose(sorted(aug.sum(axis=(1, 2, 3))), sorted(plain.sum(axis=(1, 2, 3))))
    assert Augment(hflip=True).enabled()


def test_real_full_resolution_fundus(idrid_grading, tmp_path):
    """A 4288x2848 IDRiD photograph: decoded at 1/8 size, cropped to its field of view."""
    path = sorted((idrid_grading / "images" / "test").glob("*.jpg"))[0]
    contents = tf.io.read_file(str(path))
    assert decode(contents, 224).shape[0] == 2848 // 8
    image = preprocess_image(contents, Preprocess(image_size=224)).numpy()
    field = image.max(axis=-1) > 15
    # the field of view spans the width after cropping; black corners remain (it is a disc)
    assert field[112].mean() > 0.95 and not field[0, 0] and not field[-1, -1]


def test_mask_follows_the_image_geometry(tmp_path):
    """A lesion mask drawn on the original frame lands on the same pixels as the lesion
    after crop, pad and resize (what Grad-CAM localisation is measured against)."""
    from kfundus.data.images import preprocess_mask

    image = fundus_like(300, 500, 150)
    lesion = np.zeros((300, 500), bool)
    lesion[100:140, 200:260] = True
    image[lesion] = (255, 255, 0)  # a yellow patch inside the field
    path = write(tmp_path / "lesion.png", image)
    config = Preprocess(image_size=64)
    contents = tf.io.read_file(path)
    processed = preprocess_image(contents, config).numpy()
    mask = preprocess_mask(lesion, contents, config).numpy() > 0.5
    yellow = (processed[..., 2] < 100) & (processed[..., 1] > 200)
    iou = (mask & yellow).sum() / (mask | yellow).sum()
    assert iou > 0.8, iou


def _saturation(images):
    """Mean HSV saturation of float RGB images in [0, 255]."""
    hi, lo = images.max(axis=-1), images.min(axis=-1)
    return float(np.mean(np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0)))


@pytest.mark.parametrize("jitter", [dict(saturation=0.1), dict(hue=0.02), dict(brightness=0.1), dict(contrast=0.1)])
def test_colour_jitter_is_mild(tmp_path, jitter):
    """A jitter strength of 0.1 keeps images close to the originals (Keras' saturation
    factor convention once turned every image grey)."""
    rng = np.random.default_rng(0)
    paths = [
        write(tmp_path / f"c{i}.png", fundus_like(64, 64, 30, value=tuple(rng.integers(60, 240, 3)))) for i in range(8)
    ]
    prepared = prepare(
        manifest_of(paths), Preprocess(image_size=32, crop_fundus=False), cache_dir=tmp_path / "c", progress=False
    )
    plain = np.concatenate([x.numpy() for x, _ in make_dataset(prepared, batch_size=8)])
    jittered = np.concatenate(
        [x.numpy() for x, _ in make_dataset(prepared, batch_size=8, training=True, augment=Augment(**jitter))]
    )
    assert 0.8 < _saturation(jittered) / _saturation(plain) < 1.2
    assert abs(jittered.mean() - plain.mean()) < 0.15 * plain.mean()


# --- EXIF orientation -------------------------------------------------------------------------


def asymmetric(height=40, width=64):
    """An image that every one of the 8 EXIF orientations changes visibly."""
    image = np.full((height, width, 3), 20, np.uint8)
    image[: height // 4, : width // 3] = (250, 40, 40)
    image[-height // 4 :, -width // 5 :] = (40, 250, 40)
    image[height // 3 : height // 2, width // 3 : width // 2] = 140
    return image


def jpeg_with_orientation(path, array, orientation, **kwargs):
    """A JPEG written by Pillow with an EXIF orientation tag (and another tag before it)."""
    exif = Image.Exif()
    exif[0x010F] = "kfundus test camera"  # Make: the orientation is not the first entry
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, "JPEG", exif=exif, quality=95, **kwargs)
    return str(path)


ORIENTATIONS = {  # what PIL.ImageOps.exif_transpose does for each tag, for the "closest" check
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, 3),
    7: lambda a: np.rot90(a.transpose(1, 0, 2), 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(tmp_path, orientation):
    from PIL import ImageOps

    path = jpeg_with_orientation(tmp_path / "o.jpg", asymmetric(), orientation)
    with Image.open(path) as stored:
        reference = np.asarray(ImageOps.exif_transpose(stored).convert("RGB")).astype(int)
        raw = np.asarray(stored.convert("RGB"))
    image = decode(tf.io.read_file(path), 40).numpy().astype(int)
    assert image.shape == reference.shape
    assert np.abs(image - reference).mean() < 2  # two JPEG decoders: a pixel level or so apart
    # and no other orientation comes close: the tag, not chance, decides the result
    errors = {
        o: np.abs(f(raw).astype(int) - image).mean() for o, f in ORIENTATIONS.items() if f(raw).shape == image.shape
    }
    assert min(errors, key=errors.get) == orientation and sorted(errors.values())[1] > 20


def test_exif_orientation_survives_the_reduced_decode_and_prepare(tmp_path):
    """A big photo stored sideways with tag 6, decoded at 1/4 size in the DCT domain, and an
    upright copy without a tag: the cache holds the same picture for both."""
    upright = asymmetric(400, 640)
    sideways = np.rot90(upright, 1).copy()  # stored turned 90 degrees counter-clockwise ...
    tagged = jpeg_with_orientation(tmp_path / "tagged.jpg", sideways, 6)  # ... so tag 6 turns it back
    plain = write(tmp_path / "plain.jpg", upright, quality=95)
    assert decode(tf.io.read_file(tagged), 100).shape[:2] == (100, 160)  # ratio 4, upright
    m = manifest_of([tagged, plain], [1, 0])
    prepared = prepare(m, Preprocess(image_size=48, crop_fundus=False), cache_dir=tmp_path / "c", progress=False)
    x = next(iter(make_dataset(prepared, batch_size=2, with_targets=False))).numpy()
    assert np.abs(x[0] - x[1]).mean() < 3
    assert np.abs(x[0] - np.rot90(x[1], 1)[:48, :48]).mean() > 20  # without the tag they would differ


def test_jpeg_without_exif_or_with_broken_exif_is_unchanged(tmp_path):
    from kfundus.data.images import exif_orientation

    array = asymmetric()
    plain = write(tmp_path / "plain.jpg", array, quality=95)
    broken = tmp_path / "broken.jpg"  # an Exif segment whose TIFF header is garbage
    data = Path(plain).read_bytes()
    broken.write_bytes(data[:2] + b"\xff\xe1\x00\x10Exif\x00\x00XX\x00\x00\x00\x00" + data[2:])
    for path in (plain, str(broken)):
        assert int(exif_orientation(tf.io.read_file(path))) == 1
        assert decode(tf.io.read_file(path), 40).shape == (40, 64, 3)
    assert int(exif_orientation(tf.constant(b""))) == 1


# --- images far smaller than the target -------------------------------------------------------


def small_and_large(tmp_path):
    paths = [write(tmp_path / f"big{i}.png", fundus_like(64, 64, 30, value=(90 + 40 * i,) * 3)) for i in range(4)]
    paths.insert(1, write(tmp_path / "tiny.png", fundus_like(20, 24, 9)))
    return manifest_of(paths, [0, 1, 0, 1, 1])


def test_small_images_are_reported_skipped_or_refused(tmp_path, monkeypatch):
    import kfundus.data.pipeline as pipeline

    m = small_and_large(tmp_path)
    config = Preprocess(image_size=64)
    with pytest.warns(
        UserWarning,
        match=r"(?s)1 of 5 image\(s\).*far smaller than data.image_size=64.*tiny.png.*"
        r"--set data.small_images=skip",
    ):
        kept = prepare(m, config, cache_dir=tmp_path / "c", progress=False)
    assert len(kept) == 5 and kept.small["path"].map(lambda p: Path(p).name).tolist() == ["tiny.png"]
    assert "24x20 px" in kept.small["detail"].iloc[0]
    # the sizes are in the cache index: the other policies need no second decode
    monkeypatch.setattr(pipeline, "_build_cache", lambda *a: pytest.fail("the cache was rebuilt"))
    with pytest.warns(UserWarning, match="skipped"):
        skipped = prepare(m, config, cache_dir=tmp_path / "c", small_images="skip", progress=False)
    assert len(skipped) == 4 and skipped.skipped["reason"].tolist() == ["too_small"]
    assert skipped.skipped["row"].tolist() == [1]
    x = np.concatenate([b.numpy() for b in make_dataset(skipped, batch_size=3, with_targets=False)])
    assert len(x) == 4 and (x.reshape(4, -1).max(axis=1) >= 90).all()  # the big images, in order
    with pytest.raises(DataError, match=r"(?s)tiny.png.*--set data.small_images=skip"):
        prepare(m, config, cache_dir=tmp_path / "c", small_images="error", progress=False)
    # at a target the tiny image fits, nothing is reported
    monkeypatch.undo()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(prepare(m, Preprocess(image_size=32), cache_dir=tmp_path / "c", progress=False).small) == 0


# --- messages name the user's file row; nothing usable is an error ------------------------------


def test_decode_errors_name_the_row_of_the_users_file(tmp_path):
    from kfundus.data.readers import read_csv
    from kfundus.data.splits import split_patients

    rows = []
    for i in range(12):
        write(tmp_path / f"p{i}.png", fundus_like(40, 40, 18, value=(80 + 10 * i,) * 3))
        rows.append(f"p{i}.png,p{i},{i % 2}")
    (tmp_path / "p7.png").write_bytes(b"this is not a PNG")
    # a blank line before the data: file rows count it, as a spreadsheet does
    (tmp_path / "labels.csv").write_text("image,patient_id,y\n\n" + "\n".join(rows) + "\n")
    m = read_csv(tmp_path / "labels.csv")
    split = split_patients(m, val=0.25, test=0.25, seed=0)
    part = next(s for s in split.values() if "p7" in set(s.frame["patient_id"]))
    position = int(np.flatnonzero(part.frame["patient_id"] == "p7")[0])
    with pytest.raises(DataError) as err:
        prepare(part, Preprocess(image_size=32), cache_dir=tmp_path / "c", progress=False)
    message = str(err.value)
    assert f"row 10 of {tmp_path / 'labels.csv'}: {tmp_path / 'p7.png'}: not an image" in message
    assert f"row {position}:" not in message and "--set data.skip_unreadable=true" in message
    assert m.frame["source_row"].tolist() == list(range(3, 15))  # the blank line 2 is counted


def test_every_image_unreadable_with_skip_unreadable_says_so(tmp_path):
    paths = []
    for i in range(3):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(100))
        paths.append(str(tmp_path / f"bad{i}.jpg"))
    with pytest.raises(
        DataError, match=r"(?s)none of the 3 image\(s\) of dataset 't' can be used \(3 unreadable\).*bad0"
    ):
        prepare(
            manifest_of(paths),
            Preprocess(image_size=32),
            cache_dir=tmp_path / "c",
            skip_unreadable=True,
            progress=False,
        )
