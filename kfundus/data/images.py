"""One encoded image -> the model's input: what training, evaluation, ``kfundus predict``
and the exported serving signature all run, as TensorFlow graph functions.

``decode`` reads JPEG (in the DCT domain at a reduced size when the file is much larger
than the target), PNG (16-bit scaled to 8), BMP and GIF; greyscale becomes RGB, alpha is
dropped, and a JPEG's EXIF orientation tag is applied. ``fundus_crop`` finds the circular
field of view and drops the black border, ``pad_and_resize`` pads to a square and resizes;
``preprocess_image`` is the whole chain for one :class:`Preprocess`.
``encoded_image_problem`` says why bytes cannot be an image (the serving signature's
per-element message). Images leave as float32 RGB in [0, 255].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import tensorflow as tf

CACHE_VERSION = 3  # 2: pad_and_resize replaced tf.image.resize_with_pad; 3: EXIF orientation, sizes in the index
JPEG_RATIOS = (1, 2, 4, 8)
EXIF_SCAN_BYTES = 1 << 17  # the Exif segment is looked for in a JPEG's first 128 KB
EXIF_IFD_BYTES = 1 << 12  # its first IFD (the orientation) is read from its first 4 KB (it is at offset 8)


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
