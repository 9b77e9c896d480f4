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
backbone. Greyscale inputs are replicated to RGB, an alpha channel is dropped, and 16-bit
PNGs are scaled to 8 bits. A JPEG's EXIF orientation tag is applied (a photo stored
sideways with a tag is seen upright), in the one ``decode`` that training, evaluation,
``kfundus predict`` and the exported serving signature share.
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
from kfundus.data.manifest import SKIPPED_COLUMNS, Manifest
from kfundus.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 2: pad_and_resize replaced tf.image.resize_with_pad; 3: EXIF orientation, sizes in the index
JPEG_RATIOS = (1, 2, 4, 8)
EXIF_SCAN_BYTES = 1 << 17  # the Exif segment is looked for in a JPEG's first 128 KB
EXIF_IFD_BYTES = 1 << 12  # its first IFD (the orientation) is read from its first 4 KB (it is at offset 8)
SMALL_IMAGES = ("warn", "skip", "error")
# An image is "far smaller" than the target when the region that is resized to
# data.image_size (the field of view, or the whole image without crop_fundus) has a long
# side below image_size / SMALL_FACTOR: it would be enlarged more than 2x, into blur.
SMALL_FACTOR = 2


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


def exif_orientation(contents: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (int32 1-8) of JPEG bytes; 1 (upright) when there is none.

    Graph ops only, so it runs inside ``tf.data`` and an exported SavedModel: find the
    APP1 ``Exif`` segment (``FF E1``, the length, ``Exif\\0\\0``) in the first
    :data:`EXIF_SCAN_BYTES` bytes (the first match: a thumbnail inside it comes later),
    read its TIFF header (byte order ``II`` or ``MM``, then 42 and the offset of IFD0) and
    IFD0's entries for tag 0x0112, within the segment's first :data:`EXIF_IFD_BYTES`
    bytes (cameras put IFD0 right after the header). Anything malformed gives 1.
    """
    head = tf.strings.substr(contents, 0, EXIF_SCAN_BYTES)
    parts = tf.strings.split(head, sep="Exif\x00\x00", maxsplit=1)
    found_exif = tf.size(parts) > 1

    def parse():
        start = tf.strings.length(parts[0])  # where "Exif" starts
        window = tf.strings.substr(head, tf.maximum(start - 4, 0), EXIF_IFD_BYTES)
        data = tf.concat([tf.io.decode_raw(window, tf.uint8), tf.zeros([16], tf.uint8)], axis=0)  # past the end: 0
        n = tf.strings.length(window)

        def byte(i):
            return tf.cast(tf.gather(data, tf.clip_by_value(i, 0, n + 15)), tf.int32)

        marker = tf.equal(byte(0), 0xFF) & tf.equal(byte(1), 0xE1) & (start >= 4)
        little = tf.equal(byte(10), 0x49) & tf.equal(byte(11), 0x49)  # "II" (else "MM")

        def u16(offsets):  # 2-byte values at offsets from the TIFF header (which starts at byte 10)
            pairs = byte(10 + offsets[..., None] + tf.constant([0, 1]))
            return tf.where(little, pairs[..., 0] + 256 * pairs[..., 1], 256 * pairs[..., 0] + pairs[..., 1])

        header = u16(tf.constant([2, 4, 6]))  # 42, then IFD0's offset as two 16-bit halves
        ifd = tf.where(little, header[2] * 65536 + header[1], header[1] * 65536 + header[2])
        entries = ifd + 2 + 12 * tf.range(tf.clip_by_value(u16(ifd), 0, 256))
        values = u16(tf.stack([entries, entries + 8], axis=1))  # (entries, [tag, first value])
        found = tf.equal(values[:, 0], 0x0112) & (10 + entries + 12 <= n)
        value = tf.reduce_max(tf.concat([tf.where(found, values[:, 1], 0), [0]], axis=0))
        valid = marker & tf.equal(header[0], 42) & (ifd >= 8) & (value >= 1) & (value <= 8)
        return tf.where(valid, value, 1)

    return tf.cond(found_exif, parse, lambda: tf.constant(1))  # most files have no Exif: skip the parsing


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Turn an image stored with EXIF ``orientation`` (1-8) upright, as
    ``PIL.ImageOps.exif_transpose`` does.

    Every orientation is a transpose (5-8) followed by flips: left-right for 2, 3, 6, 7
    and top-bottom for 3, 4, 7, 8 (6: turned 90 degrees, 8: turned 270). One ``tf.cond``
    leaves upright images untouched; a ``switch_case`` over eight branches cost 1 ms per
    image more in ``tf.data``.
    """

    def turn():
        turned = tf.transpose(image, tf.where(orientation >= 5, [1, 0, 2], [0, 1, 2]))
        left_right = tf.reduce_any(tf.equal(orientation, [2, 3, 6, 7]))
        top_bottom = tf.reduce_any(tf.equal(orientation, [3, 4, 7, 8]))
        return tf.reverse(turned, tf.boolean_mask([1, 0], tf.stack([left_right, top_bottom])))

    return tf.cond(orientation > 1, turn, lambda: image)


def decode_with_size(contents: tf.Tensor, target: int) -> tuple[tf.Tensor, tf.Tensor]:
    """:func:`decode`, and the image's full pixel size ``[height, width]`` (int32, upright)
    before any DCT reduction."""
    is_jpeg = tf.equal(tf.strings.substr(contents, 0, 3), b"\xff\xd8\xff")

    def jpeg():
        index = _jpeg_ratio_index(contents, target)
        branches = [(lambda r=r: tf.io.decode_jpeg(contents, channels=3, ratio=r)) for r in JPEG_RATIOS]
        orientation = exif_orientation(contents)
        image = apply_orientation(tf.switch_case(index, branches), orientation)
        shape = tf.cast(tf.io.extract_jpeg_shape(contents)[:2], tf.int32)
        return image, tf.where(orientation >= 5, tf.reverse(shape, [0]), shape)

    def other():
        image = tf.io.decode_image(contents, channels=3, dtype=tf.uint16, expand_animations=False)
        image = tf.cast(tf.round(tf.cast(image, tf.float32) * (255.0 / 65535.0)), tf.uint8)
        return image, tf.shape(image)[:2]

    image, size = tf.cond(is_jpeg, jpeg, other)
    image.set_shape([None, None, 3])
    return image, size


def decode(contents: tf.Tensor, target: int) -> tf.Tensor:
    """Decode JPEG/PNG/BMP/GIF bytes to uint8 RGB, upright.

    JPEGs much larger than ``target`` are decoded at 1/2, 1/4 or 1/8 size in the DCT
    domain, never below ``target`` on the short side, and turned upright by their EXIF
    orientation tag (:func:`exif_orientation`). Other formats are read at 16 bits so that
    16-bit PNGs are scaled to 8 bits instead of truncated; greyscale is replicated to RGB
    and alpha dropped.
    """
    return decode_with_size(contents, target)[0]


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


def preprocess_image_and_size(contents: tf.Tensor, config: Preprocess) -> tuple[tf.Tensor, tf.Tensor]:
    """:func:`preprocess_image`, and ``[height, width, resized_from]`` (int32): the image's
    pixel size and the long side of the region resized to ``config.image_size`` (the field
    of view, or the whole image), in decoded pixels. The cache index keeps it, so images
    far smaller than the target are found without a second decode."""
    image, size = decode_with_size(contents, config.image_size)
    if config.crop_fundus:
        image = fundus_crop(image, config.fov_threshold)
    region = tf.reduce_max(tf.shape(image)[:2])
    image = pad_and_resize(tf.cast(image, tf.float32), config.image_size)
    return tf.clip_by_value(image, 0.0, 255.0), tf.concat([size, region[None]], axis=0)


def preprocess_image(contents: tf.Tensor, config: Preprocess) -> tf.Tensor:
    """Encoded bytes -> square float32 image of ``config.image_size``, in [0, 255].

    Decode (reduced in the DCT domain when possible, upright by the EXIF orientation),
    crop the field of view, pad to a square with black (keeping the aspect ratio) and
    resize bilinearly.
    """
    return preprocess_image_and_size(contents, config)[0]


def encoded_image_problem(contents: tf.Tensor) -> tf.Tensor:
    """Why encoded bytes cannot be an image the decoder reads, as a scalar string (empty
    when they look fine). Graph ops, for the SavedModel's bytes signature, which must
    name the bad element of a batch before the decoder fails without saying which.

    Checked: empty bytes; the magic bytes of JPEG, PNG, GIF and BMP (TIFF, WebP and
    anything else are refused); a JPEG must end with its end-of-image marker ``FF D9``
    (within its last 64 bytes: entropy-coded data never holds ``FF D9``), a PNG with its
    ``IEND`` chunk. Corrupt data inside an otherwise whole file is left to the decoder.
    """
    length = tf.strings.length(contents)
    head = tf.strings.substr(contents, 0, 8)
    tail = tf.strings.substr(contents, tf.maximum(length - 64, 0), 64)
    end = tf.strings.substr(contents, tf.maximum(length - 20, 0), 20)

    def has(text, part):
        return tf.size(tf.strings.split(text, sep=part, maxsplit=1)) > 1

    is_jpeg = tf.equal(tf.strings.substr(head, 0, 3), b"\xff\xd8\xff")
    is_png = tf.equal(head, b"\x89PNG\r\n\x1a\n")
    is_gif = tf.equal(tf.strings.substr(head, 0, 4), b"GIF8")
    is_bmp = tf.equal(tf.strings.substr(head, 0, 2), b"BM")
    is_tiff = tf.logical_or(
        tf.equal(tf.strings.substr(head, 0, 4), b"II*\x00"), tf.equal(tf.strings.substr(head, 0, 4), b"MM\x00*")
    )
    problem = tf.constant("")
    problem = tf.where(is_png & ~has(end, "IEND"), "truncated PNG (no IEND chunk)", problem)
    problem = tf.where(is_jpeg & ~has(tail, b"\xff\xd9"), "truncated JPEG (no end-of-image marker)", problem)
    unknown = ~(is_jpeg | is_png | is_gif | is_bmp)
    problem = tf.where(unknown, "not a JPEG, PNG, GIF or BMP image (unknown format)", problem)
    problem = tf.where(is_tiff, "TIFF, which the decoder does not read: send PNG or JPEG", problem)
    return tf.where(tf.equal(length, 0), "empty (0 bytes)", problem)


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
