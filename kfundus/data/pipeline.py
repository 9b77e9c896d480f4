"""tf.data pipelines for fundus images: decode, fundus crop, resize, cache, augment, batch.

The flow has two stages, because decoding dominates everything else:

1. ``prepare`` decodes every image of a Manifest once — in the DCT domain at a reduced
   size when the source is much larger than the target (``decode_jpeg(ratio=2|4|8)``: a
   12-megapixel IDRiD JPEG took 8 ms instead of 19 ms per core at ratio 8) — finds the circular
   field of view, crops the black border, pads to a square, resizes, and writes the
   result as uint8 into an on-disk cache keyed by the preprocessing settings and the
   files' paths, sizes and modification times. Images that cannot be decoded (missing,
   truncated, corrupt, unsupported) are listed with the reason: an error by default, or
   skipped and reported with ``skip_unreadable=True``.
2. ``make_dataset`` streams the cache (no decoding), shuffles, batches, applies the
   random augmentations on the batch, and prefetches.

Images leave the pipeline as float32 RGB in [0, 255]: every kfundus model normalises its
input itself, so exported models take the same input and the pipeline serves every
backbone. Greyscale inputs are replicated to RGB, an alpha channel is dropped, and 16-bit
PNGs are scaled to 8 bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from kfundus.config.schema import Augment
from kfundus.data.cache import default_cache_dir
from kfundus.data.manifest import Manifest
from kfundus.errors import DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: pad_and_resize replaced tf.image.resize_with_pad
JPEG_RATIOS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Deterministic preprocessing, applied once and cached.

    Args:
        image_size: side of the square output image in pixels.
        crop_fundus: find the circular field of view and drop the black border (fundus
            photographs); False keeps the whole frame (OCT B-scans, pre-cropped images).
        fov_threshold: a pixel belongs to the field of view when its brightest channel is
            above this value (0-255 scale). Fundus borders are black up to JPEG noise.
    """

    image_size: int = 224
    crop_fundus: bool = True
    fov_threshold: float = 15.0

    @classmethod
    def from_config(cls, data) -> Preprocess:
        """The preprocessing a ``data`` config section describes."""
        return cls(image_size=data.image_size, crop_fundus=data.crop_fundus)

    def key(self) -> str:
        text = json.dumps({**dataclasses.asdict(self), "version": CACHE_VERSION}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------
# Graph functions: one encoded image (scalar string) -> float32 image.


def _jpeg_ratio_index(contents: tf.Tensor, target: int) -> tf.Tensor:
    """Index into JPEG_RATIOS of the largest DCT scale-down that keeps the short side >= target."""
    shape = tf.io.extract_jpeg_shape(contents)
    short = tf.cast(tf.minimum(shape[0], shape[1]), tf.int32)
    index = tf.constant(0)
    for i, ratio in enumerate(JPEG_RATIOS[1:], start=1):
        index = tf.where(short // ratio >= target, i, index)
    return index


def decode(contents: tf.Tensor, target: int) -> tf.Tensor:
    """Decode JPEG/PNG/BMP/GIF bytes to uint8 RGB.

    JPEGs much larger than ``target`` are decoded at 1/2, 1/4 or 1/8 size in the DCT
    domain, never below ``target`` on the short side. Other formats are read at 16 bits
    so that 16-bit PNGs are scaled to 8 bits instead of truncated; greyscale is
    replicated to RGB and alpha dropped.
    """
    is_jpeg = tf.equal(tf.strings.substr(contents, 0, 3), b"\xff\xd8\xff")

    def jpeg():
        index = _jpeg_ratio_index(contents, target)
        branches = [(lambda r=r: tf.io.decode_jpeg(contents, channels=3, ratio=r)) for r in JPEG_RATIOS]
        return tf.switch_case(index, branches)

    def other():
        image = tf.io.decode_image(contents, channels=3, dtype=tf.uint16, expand_animations=False)
        return tf.cast(tf.round(tf.cast(image, tf.float32) * (255.0 / 65535.0)), tf.uint8)

    image = tf.cond(is_jpeg, jpeg, other)
    image.set_shape([None, None, 3])
    return image


def fov_box(image: tf.Tensor, threshold: float = 15.0) -> tf.Tensor:
    """Bounding box ``[top, bottom, left, right]`` (int32, end-exclusive) of the field of
    view: pixels whose brightest channel exceeds ``threshold``.

    The box is found on a 4x subsampled copy (exact to 4 pixels, 16x cheaper). A row or
    column belongs to it when more than 1 % of it is inside the field, so scattered
    bright noise in the border does not widen it. An image with no field at all
    (entirely dark) gets the whole frame.
    """
    step = 4
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    small = image[::step, ::step]
    inside = tf.cast(tf.reduce_max(small, axis=-1) > tf.cast(threshold, small.dtype), tf.float32)
    rows = tf.cast(tf.where(tf.reduce_mean(inside, axis=1) > 0.01)[:, 0], tf.int32)
    cols = tf.cast(tf.where(tf.reduce_mean(inside, axis=0) > 0.01)[:, 0], tf.int32)

    def box():
        return tf.stack(
            [
                tf.reduce_min(rows) * step,
                tf.minimum((tf.reduce_max(rows) + 1) * step, height),
                tf.reduce_min(cols) * step,
                tf.minimum((tf.reduce_max(cols) + 1) * step, width),
            ]
        )

    has_field = tf.logical_and(tf.size(rows) > 0, tf.size(cols) > 0)
    return tf.cond(has_field, box, lambda: tf.stack([0, height, 0, width]))


def fundus_crop(image: tf.Tensor, threshold: float = 15.0) -> tf.Tensor:
    """Crop an image to its field of view (see ``fov_box``)."""
    box = fov_box(image, threshold)
    return image[box[0] : box[1], box[2] : box[3]]


def pad_and_resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resize ``image`` (H, W, C, float) to fit ``size`` x ``size`` keeping its aspect ratio
    (bilinear), then pad it with zeros to the square, centred.

    The same role as ``tf.image.resize_with_pad``, computed in integers: that one derives
    the resized side from a float ratio that rounds differently in eager mode and inside a
    ``tf.function`` (a 50x50 image becomes 48 rows in one and 47 + 1 black row in the
    other), so a serving graph and the training pipeline would disagree.
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    longest = tf.maximum(height, width)
    # round(side * size / longest), at least 1 pixel
    new_h = tf.maximum(1, (height * size + longest // 2) // longest)
    new_w = tf.maximum(1, (width * size + longest // 2) // longest)
    resized = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear")
    return tf.image.pad_to_bounding_box(resized, (size - new_h) // 2, (size - new_w) // 2, size, size)


def preprocess_image(contents: tf.Tensor, config: Preprocess) -> tf.Tensor:
    """Encoded bytes -> square float32 image of ``config.image_size``, in [0, 255].

    Decode (reduced in the DCT domain when possible), crop the field of view, pad to a
    square with black (keeping the aspect ratio) and resize bilinearly.
    """
    image = decode(contents, config.image_size)
    if config.crop_fundus:
        image = fundus_crop(image, config.fov_threshold)
    size = config.image_size
    image = pad_and_resize(tf.cast(image, tf.float32), size)
    return tf.clip_by_value(image, 0.0, 255.0)


def preprocess_mask(mask, contents: tf.Tensor, config: Preprocess) -> tf.Tensor:
    """Carry a mask drawn on the original image (H, W) through the same geometry as
    ``preprocess_image(contents, config)``: scale to the decoded size, crop to the image's
    field of view, pad and resize. Returns float32 (size, size) in [0, 1] (fractional at
    the edges), aligned pixel for pixel with the preprocessed image."""
    image = decode(contents, config.image_size)
    mask = tf.cast(tf.convert_to_tensor(mask), tf.float32)[..., None]
    mask = tf.image.resize(mask, tf.shape(image)[:2], method="area")
    if config.crop_fundus:
        box = fov_box(image, config.fov_threshold)
        mask = mask[box[0] : box[1], box[2] : box[3]]
    size = config.image_size
    return tf.clip_by_value(pad_and_resize(mask, size)[..., 0], 0.0, 1.0)


# ---------------------------------------------------------------------------
# Stage 1: prepare (decode once, cache on disk).


@dataclasses.dataclass
class Prepared:
    """A Manifest's images, preprocessed and cached.

    ``manifest`` holds the rows that decoded (in the original order); ``skipped`` the
    rows that did not, with the reason; ``files`` the cache's record files.
    """

    manifest: Manifest
    config: Preprocess
    files: list[str]
    skipped: pd.DataFrame

    def __len__(self) -> int:
        return len(self.manifest)


def _file_signature(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{path}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return f"{path}|missing"


def cache_key(manifest: Manifest, config: Preprocess) -> str:
    """Key of a cache: preprocessing settings + every image's path, size and mtime."""
    h = hashlib.sha1(config.key().encode())
    for column in manifest.image_columns:
        for path in manifest.frame[column]:
            h.update(_file_signature(str(path)).encode())
    return h.hexdigest()[:20]


def _decode_error(path: str, config: Preprocess) -> str | None:
    """Why one file cannot be decoded, or None if it decodes (run eagerly, only for the
    rows the pipeline dropped)."""
    if not os.path.exists(path):
        return "file not found"
    if os.path.getsize(path) == 0:
        return "empty file"
    try:
        preprocess_image(tf.io.read_file(path), config)
    except tf.errors.OpError as exc:
        return decode_error_message(exc)
    return None


def decode_error_message(exc: tf.errors.OpError) -> str:
    """A short reason from a TensorFlow decode error (no op dump)."""
    message = exc.message.split("[Op:")[0].strip().rstrip(".")
    if "Invalid JPEG data" in message or ("jpeg" in message.lower() and "corrupt" in message.lower()):
        return "corrupt or truncated JPEG"
    if "Unknown image file format" in message:
        return "not an image (unknown file format)"
    return message.splitlines()[0][:200] if message else type(exc).__name__


def prepare(
    manifest: Manifest,
    config: Preprocess,
    *,
    cache_dir: str | Path | None = None,
    skip_unreadable: bool = False,
    progress: bool = True,
) -> Prepared:
    """Decode, crop and resize every image of ``manifest`` once into an on-disk cache.

    A cache built earlier with the same settings and unchanged files is reused, so later
    epochs and later runs skip decoding entirely.

    Args:
        manifest: eye-level or patient-level rows (both eyes are cached together).
        config: the preprocessing settings (part of the cache key).
        cache_dir: where caches live; default ``default_cache_dir()``.
        skip_unreadable: drop images that fail to decode and report them, instead of
            raising a DataError that lists them.
        progress: show a progress bar while decoding.

    Returns:
        A Prepared whose ``manifest`` keeps the readable rows.
    """
    if len(manifest) == 0:
        raise DataError(f"dataset {manifest.name or ''!s} has no rows to prepare")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / f"{manifest.name or 'data'}-{config.image_size}px-{cache_key(manifest, config)}"
    index_file = folder / "index.json"
    if not index_file.exists():
        _build_cache(manifest, config, folder, progress)
    index = json.loads(index_file.read_text())
    skipped = pd.DataFrame(index["skipped"], columns=["row", "path", "reason"])
    if len(skipped) and not skip_unreadable:
        listing = "\n".join(f"  row {r}: {p}: {why}" for r, p, why in skipped.head(10).itertuples(index=False))
        more = f"\n  ... and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        raise DataError(
            f"{len(skipped)} image(s) of dataset '{manifest.name}' cannot be read:\n{listing}{more}\n"
            "Fix or remove them, or set data.skip_unreadable=true to skip them (they are then "
            "listed in the run's skipped.csv)."
        )
    if len(skipped):
        log.warning("skipping %d unreadable image(s) of '%s'", len(skipped), manifest.name)
    kept = manifest.subset(~np.isin(np.arange(len(manifest)), skipped["row"].to_numpy()))
    return Prepared(kept, config, [str(folder / f) for f in index["files"]], skipped)


def decode_threads() -> int:
    """Cores this process may use (``KFUNDUS_DECODE_THREADS`` overrides)."""
    if os.environ.get("KFUNDUS_DECODE_THREADS"):
        return int(os.environ["KFUNDUS_DECODE_THREADS"])
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _read_rows(manifest: Manifest, config: Preprocess) -> tf.data.Dataset:
    columns = manifest.image_columns
    paths = tuple(manifest.frame[c].astype(str).to_numpy() for c in columns)
    rows = np.arange(len(manifest), dtype=np.int64)

    def load(row, *files):
        images = [tf.cast(tf.round(preprocess_image(tf.io.read_file(f), config)), tf.uint8) for f in files]
        return row, tf.concat([tf.reshape(i, [-1]) for i in images], axis=0)

    ds = tf.data.Dataset.from_tensor_slices((rows, *paths))
    # One decode per core, explicitly: AUTOTUNE was seen to settle on one thread for
    # this CPU-bound map, halving the throughput on some runs.
    ds = ds.map(load, num_parallel_calls=decode_threads(), deterministic=True)
    return ds.ignore_errors().batch(16).prefetch(2)  # batches: less Python per image


def _build_cache(manifest: Manifest, config: Preprocess, folder: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    record_file = "images.tfrecord"
    tmp = folder / (record_file + ".partial")
    seen = np.zeros(len(manifest), dtype=bool)
    with tf.io.TFRecordWriter(str(tmp)) as writer:
        bar = tqdm(
            total=len(manifest),
            desc=f"decoding {manifest.name or 'images'}",
            unit="img",
            disable=not progress,
            leave=False,
        )
        for rows, pixels in _read_rows(manifest, config).as_numpy_iterator():
            for row, image in zip(rows, pixels):
                writer.write(struct.pack("<q", int(row)) + image.tobytes())
            seen[rows] = True
            bar.update(len(rows))
        bar.close()
    os.replace(tmp, folder / record_file)
    skipped = []
    for row in np.flatnonzero(~seen):
        paths = [str(manifest.frame[column].iloc[row]) for column in manifest.image_columns]
        reasons = [(path, _decode_error(path, config)) for path in paths]
        path, reason = next(((p, r) for p, r in reasons if r), (paths[-1], "decoding failed inside the pipeline"))
        skipped.append((int(row), path, reason))
    index = {"files": [record_file], "rows": int(seen.sum()), "skipped": skipped, "config": dataclasses.asdict(config)}
    (folder / "index.json").write_text(json.dumps(index, indent=1))


# ---------------------------------------------------------------------------
# Stage 2: stream the cache.


def augmenter(augment: Augment, seed: int | None = None):
    """A Keras Sequential of random layers for ``augment`` (None when nothing is on)."""
    import keras

    if not augment.enabled():
        return None
    layers = []
    modes = [m for m, on in (("horizontal", augment.hflip), ("vertical", augment.vflip)) if on]
    if modes:
        layers.append(keras.layers.RandomFlip("_and_".join(modes), seed=seed))
    if augment.rotation:
        layers.append(keras.layers.RandomRotation(augment.rotation / 360.0, fill_mode="constant", seed=seed))
    if augment.zoom:
        layers.append(keras.layers.RandomZoom(augment.zoom, fill_mode="constant", seed=seed))
    jitter = dict(brightness_factor=augment.brightness, contrast_factor=augment.contrast, hue_factor=augment.hue)
    jitter = {k: v for k, v in jitter.items() if v}
    if augment.saturation:
        # Keras' saturation factor f means a multiplier f / (1 - f) (0.5 = identity), and a
        # single float f means the range [0, f]: saturation=0.1 would turn every image grey.
        # A multiplier in [1 - s, 1 + s] is the range below.
        s = augment.saturation
        jitter["saturation_factor"] = ((1 - s) / (2 - s), (1 + s) / (2 + s))
    if jitter:
        layers.append(keras.layers.RandomColorJitter(value_range=(0, 255), seed=seed, **jitter))
    return keras.Sequential(layers, name="augment")


def make_dataset(
    prepared: Prepared,
    *,
    batch_size: int = 32,
    training: bool = False,
    augment: Augment | None = None,
    seed: int = 0,
    with_targets: bool = True,
) -> tf.data.Dataset:
    """Stream a prepared cache as batches of ``(inputs, targets)``.

    ``inputs`` is the image batch for eye-level rows (the models' single input is named
    ``image``) and ``{"left_image": l, "right_image": r}`` for patient rows, each float32
    of shape (batch, size, size, 3) in [0, 255]. ``targets`` is float32 of shape
    (batch, len(labels)). Order follows ``prepared.manifest`` unless ``training``
    (then shuffled every epoch and augmented).
    """
    manifest = prepared.manifest
    size = prepared.config.image_size
    columns = manifest.image_columns
    # the cache stores each record's position in the manifest it was built from
    label_table = tf.constant(_targets_by_original_row(prepared))
    record_bytes = 8 + len(columns) * size * size * 3

    def parse(records):
        """A batch of records -> (rows, uint8 images of shape (batch, eyes, size, size, 3))."""
        flat = tf.io.decode_raw(records, tf.uint8, fixed_length=record_bytes)
        rows = tf.bitcast(flat[:, :8], tf.int64)
        return rows, tf.reshape(flat[:, 8:], [-1, len(columns), size, size, 3])

    ds = tf.data.TFRecordDataset(prepared.files)
    ds = ds.apply(tf.data.experimental.assert_cardinality(len(prepared)))  # progress bars know the length
    if training:  # shuffle the raw records, at most ~512 MB of them in the buffer
        buffer = max(256, min(len(prepared), (512 << 20) // record_bytes))
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    aug = augmenter(augment, seed) if (training and augment is not None) else None
    names = ["image"] if len(columns) == 1 else ["left_image", "right_image"]

    def to_inputs(rows, images):
        images = tf.cast(images, tf.float32)
        inputs = {}
        for i, name in enumerate(names):
            x = images[:, i]
            if aug is not None:
                x = tf.clip_by_value(aug(x, training=True), 0.0, 255.0)
            x.set_shape([None, size, size, 3])
            inputs[name] = x
        if len(names) == 1:
            inputs = inputs["image"]
        if not with_targets:
            return inputs
        return inputs, tf.gather(label_table, rows)

    ds = ds.map(to_inputs, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def cache_positions(prepared: Prepared) -> np.ndarray:
    """For each row of the cache (a position in the manifest it was built from), its row in
    ``prepared.manifest`` (the readable rows), -1 for a skipped row."""
    n_original = len(prepared.manifest) + len(prepared.skipped)
    kept = np.setdiff1d(np.arange(n_original), prepared.skipped["row"].to_numpy())
    position = np.full(n_original, -1, dtype=np.int64)
    position[kept] = np.arange(len(kept))
    return position


def _targets_by_original_row(prepared: Prepared) -> np.ndarray:
    """Label rows indexed by the cache's row numbers (positions in the unfiltered manifest)."""
    position = cache_positions(prepared)
    table = np.zeros((len(position), len(prepared.manifest.labels)), dtype=np.float32)
    table[position >= 0] = prepared.manifest.targets()
    return table
