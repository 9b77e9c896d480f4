"""tf.data pipelines for fundus images: decode, fundus crop, resize, cache, augment, batch.

The flow has two stages, because decoding dominates everything else:

1. ``prepare`` decodes every image of a Manifest once — in the DCT domain at a reduced
   size when the source is much larger than the target (``decode_jpeg(ratio=2|4|8)``: a
   12-megapixel IDRiD JPEG took 8 ms instead of 19 ms per core at ratio 8) — finds the circular
   field of view, crops the black border, pads to a square, resizes, and writes the
   result as uint8 into an on-disk cache keyed by the preprocessing settings and the
   files' paths, sizes and modification times. Images that cannot be decoded (missing,
   truncated, corrupt, unsupported) are listed with the reason and the row of the user's
   label file: an error by default, or skipped and reported with ``skip_unreadable=True``.
   The cache index records every image's pixel size, so images far smaller than the target
   (enlarged more than 2x) are reported without a second decode (``small_images``).
2. ``make_dataset`` streams the cache (no decoding), shuffles, batches, applies the
   random augmentations on the batch, and prefetches.

Images leave the pipeline as float32 RGB in [0, 255]: every kfundus model normalises its
input itself, so exported models take the same input and the pipeline serves every
backbone. What happens to one image (decode, EXIF orientation, crop, resize) is
:mod:`kfundus.data.images`, shared with ``kfundus predict`` and the serving signature.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from kfundus.config.schema import Augment
from kfundus.data.cache import default_cache_dir
from kfundus.data.images import Preprocess, preprocess_image, preprocess_image_and_size
from kfundus.data.manifest import SKIPPED_COLUMNS, Manifest
from kfundus.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SMALL_IMAGES = ("warn", "skip", "error")
# An image is "far smaller" than the target when the region that is resized to
# data.image_size (the field of view, or the whole image without crop_fundus) has a long
# side below image_size / SMALL_FACTOR: it would be enlarged more than 2x, into blur.
SMALL_FACTOR = 2


# ---------------------------------------------------------------------------
# Stage 1: prepare (decode once, cache on disk).


@dataclasses.dataclass
class Prepared:
    """A Manifest's images, preprocessed and cached.

    ``manifest`` holds the rows that are used (in the original order); ``skipped`` the rows
    that are not, with the columns of :data:`kfundus.data.manifest.SKIPPED_COLUMNS`
    (reason ``unreadable`` or ``too_small``) and ``row``, their position in the manifest
    given to :func:`prepare`; ``small`` the images far smaller than the target that were
    kept (``data.small_images: warn``), same columns; ``files`` the cache's record files.
    """

    manifest: Manifest
    config: Preprocess
    files: list[str]
    skipped: pd.DataFrame
    small: pd.DataFrame = dataclasses.field(default_factory=lambda: pd.DataFrame(columns=["row", *SKIPPED_COLUMNS]))

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


def _sniff_format(path: str) -> str | None:
    """A reason for a file whose first bytes say it is no image TensorFlow decodes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF, which the decoder does not read: convert it to PNG or JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP, which the decoder does not read: convert it to PNG or JPEG"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "HEIC/AVIF, which the decoder does not read: convert it to PNG or JPEG"
    return None


def _decode_error(path: str, config: Preprocess) -> str | None:
    """Why one file cannot be decoded, or None if it decodes (run eagerly, only for the
    rows the pipeline dropped)."""
    if os.path.isdir(path):
        return "a folder, not an image file"
    if not os.path.exists(path):
        return "file not found"
    if os.path.getsize(path) == 0:
        return "empty file"
    try:
        preprocess_image(tf.io.read_file(path), config)
    except tf.errors.OpError as exc:
        sniffed = _sniff_format(path)
        if sniffed:
            return sniffed
        reason = decode_error_message(exc)
        if reason.startswith("not an image"):
            with open(path, "rb") as f:
                reason += f", starts with {f.read(8)!r}"
        return reason
    return None


def decode_error_message(exc: tf.errors.OpError) -> str:
    """A short reason from a TensorFlow decode error (no op dump); the text of a failed
    assertion of the serving signature (which names the batch element) as it is."""
    message = exc.message.split("[Op:")[0].strip().rstrip(".")
    if "assertion failed" in message:  # "assertion failed: [image_bytes[3]: truncated JPEG (...)]"
        inner = message.split("assertion failed:", 1)[1].strip().splitlines()[0].strip()
        inner = inner[1:-1] if inner.startswith("[") and inner.endswith("]") else inner
        return re.sub(r"^\w+_bytes\[\d+\]: ", "", inner)
    if "Invalid JPEG data" in message or ("jpeg" in message.lower() and "corrupt" in message.lower()):
        return "corrupt or truncated JPEG"
    if "Unknown image file format" in message:
        return "not an image (unknown file format)"
    return message.splitlines()[0][:200] if message else type(exc).__name__


def _listing(table: pd.DataFrame, manifest: Manifest, show: int = 10) -> str:
    """Message lines ``row R of FILE: path: detail`` for a table of skipped rows."""
    lines = []
    for row, path, detail in table[["row", "path", "detail"]].head(show).itertuples(index=False):
        where = manifest.where(int(row))
        if where is None and not manifest.source:  # a manifest built in Python: its own row
            where = f"row {int(row)}"
        lines.append(f"  {where}: {path}: {detail}" if where else f"  {path}: {detail}")
    if len(table) > show:
        lines.append(f"  ... and {len(table) - show} more")
    return "\n".join(lines)


def _small_rows(manifest: Manifest, sizes: list, config: Preprocess, unreadable) -> pd.DataFrame:
    """The rows whose image (any eye) is far smaller than the target (see SMALL_FACTOR)."""
    found = []
    limit = config.image_size / SMALL_FACTOR
    for row, per_eye in enumerate(sizes):
        if per_eye is None or row in unreadable:
            continue
        for column, (height, width, region) in zip(manifest.image_columns, per_eye):
            if region < limit:
                found.append(
                    (
                        row,
                        manifest.frame["source_row"].iloc[row] if "source_row" in manifest.frame.columns else None,
                        str(manifest.frame[column].iloc[row]),
                        "too_small",
                        f"{width}x{height} px, resized from {region} px: enlarged {config.image_size / region:.1f}x "
                        f"to data.image_size={config.image_size}",
                    )
                )
                break
    table = pd.DataFrame(found, columns=["row", *SKIPPED_COLUMNS])
    return table.astype({"source_row": "Int64"})


def prepare(
    manifest: Manifest,
    config: Preprocess,
    *,
    cache_dir: str | Path | None = None,
    skip_unreadable: bool = False,
    small_images: str = "warn",
    progress: bool = True,
    split: str | None = None,
) -> Prepared:
    """Decode, crop and resize every image of ``manifest`` once into an on-disk cache.

    A cache built earlier with the same settings and unchanged files is reused, so later
    epochs and later runs skip decoding entirely.

    Args:
        manifest: eye-level or patient-level rows (both eyes are cached together).
        config: the preprocessing settings (part of the cache key).
        cache_dir: where caches live; default ``default_cache_dir()``.
        skip_unreadable: drop images that fail to decode and report them, instead of
            raising a DataError that lists them (``data.skip_unreadable``).
        small_images: images far smaller than ``config.image_size`` (the region that is
            resized has a long side below half of it, so it would be enlarged more than
            2x): ``"warn"`` (keep them, warn with the count and examples), ``"skip"``
            (drop and report them) or ``"error"`` (``data.small_images``).
        progress: show a progress bar while decoding.
        split: the split's name, for messages.

    Returns:
        A Prepared whose ``manifest`` keeps the rows used.

    Raises:
        DataError: unreadable images without ``skip_unreadable``; small images with
            ``small_images="error"``; no row left.
    """
    if small_images not in SMALL_IMAGES:
        raise ConfigError(
            f"data.small_images={small_images!r}: use one of {list(SMALL_IMAGES)} (e.g. --set data.small_images=warn)"
        )
    what = f"dataset '{manifest.name or 'data'}'" + (f" ({split} split)" if split else "")
    if len(manifest) == 0:
        raise DataError(f"{what} has no rows to prepare")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / f"{manifest.name or 'data'}-{config.image_size}px-{cache_key(manifest, config)}"
    index_file = folder / "index.json"
    if not index_file.exists():
        _build_cache(manifest, config, folder, progress)
    index = json.loads(index_file.read_text())
    unreadable = pd.DataFrame(index["skipped"], columns=["row", "path", "detail"])
    has_rows = "source_row" in manifest.frame.columns
    unreadable.insert(
        1, "source_row", [manifest.frame["source_row"].iloc[r] if has_rows else None for r in unreadable["row"]]
    )
    unreadable.insert(3, "reason", np.where(unreadable["detail"] == "file not found", "missing", "unreadable"))
    unreadable = unreadable.astype({"source_row": "Int64"})
    if len(unreadable) and not skip_unreadable:
        raise DataError(
            f"{len(unreadable)} image(s) of {what} cannot be read:\n{_listing(unreadable, manifest)}\n"
            "Fix or remove them, or skip them with --set data.skip_unreadable=true (they are then listed in the "
            "run's skipped.csv)."
        )
    small = _small_rows(manifest, index["sizes"], config, set(unreadable["row"]))
    if len(small):
        examples = _listing(small, manifest, 5)
        if small_images == "error":
            raise DataError(
                f"{len(small)} of {len(manifest)} image(s) of {what} are far smaller than data.image_size="
                f"{config.image_size} (enlarged more than {SMALL_FACTOR}x):\n{examples}\nSkip them with "
                "--set data.small_images=skip, keep them with --set data.small_images=warn, or lower data.image_size"
            )
        fix = (
            "" if small_images == "skip" else "\nSkip them with --set data.small_images=skip, or lower data.image_size"
        )
        warnings.warn(
            f"{len(small)} of {len(manifest)} image(s) of {what} are far smaller than data.image_size="
            f"{config.image_size}: enlarged more than {SMALL_FACTOR}x, they are blurred"
            + (" and were skipped (data.small_images=skip)" if small_images == "skip" else "")
            + f", e.g.\n{examples}{fix}",
            stacklevel=2,
        )
    skipped = unreadable if small_images != "skip" else pd.concat([unreadable, small], ignore_index=True)
    skipped = skipped.sort_values("row", kind="stable").reset_index(drop=True)
    if len(skipped):
        log.warning("skipping %d image(s) of %s", len(skipped), what)
    if len(skipped) >= len(manifest):
        counts = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in skipped["reason"].value_counts().items())
        raise DataError(
            f"none of the {len(manifest)} image(s) of {what} can be used ({counts}), e.g.\n"
            f"{_listing(skipped, manifest, 5)}\nCheck the images (and data.options.image_dir)"
            + (", or lower data.image_size" if "too_small" in set(skipped["reason"]) else "")
        )
    kept = manifest.subset(~np.isin(np.arange(len(manifest)), skipped["row"].to_numpy()))
    small_kept = small if small_images == "warn" else small.iloc[:0]
    return Prepared(kept, config, [str(folder / f) for f in index["files"]], skipped, small_kept)


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
        done = [preprocess_image_and_size(tf.io.read_file(f), config) for f in files]
        images = [tf.cast(tf.round(image), tf.uint8) for image, _ in done]
        return row, tf.concat([tf.reshape(i, [-1]) for i in images], axis=0), tf.stack([size for _, size in done])

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
    sizes: list = [None] * len(manifest)
    with tf.io.TFRecordWriter(str(tmp)) as writer:
        bar = tqdm(
            total=len(manifest),
            desc=f"decoding {manifest.name or 'images'}",
            unit="img",
            disable=not progress,
            leave=False,
        )
        for rows, pixels, row_sizes in _read_rows(manifest, config).as_numpy_iterator():
            for row, image, size in zip(rows, pixels, row_sizes):
                writer.write(struct.pack("<q", int(row)) + image.tobytes())
                sizes[int(row)] = size.tolist()
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
    index = {
        "files": [record_file],
        "rows": int(seen.sum()),
        "skipped": skipped,
        "sizes": sizes,  # per row, per eye: [height, width, long side of the resized region]; None: unreadable
        "config": dataclasses.asdict(config),
    }
    (folder / "index.json").write_text(json.dumps(index))


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

    ds = cached_records(prepared)
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


def cached_records(prepared: Prepared) -> tf.data.Dataset:
    """The cache's records of the rows ``prepared`` uses (each: the row as int64, then the
    pixels), with a known length. Rows left out after decoding (too small) are in the
    cache and are filtered out here."""
    ds = tf.data.TFRecordDataset(prepared.files)
    if len(prepared.skipped):
        used = tf.constant(cache_positions(prepared) >= 0)
        ds = ds.filter(lambda record: used[tf.io.decode_raw(tf.strings.substr(record, 0, 8), tf.int64)[0]])
    return ds.apply(tf.data.experimental.assert_cardinality(len(prepared)))  # progress bars know the length


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
