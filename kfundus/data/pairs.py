"""The tf.data pipeline of image-report pairs (RET-CLIP pre-training).

A pairs dataset is a patient-level Manifest with a ``text`` column (the report), read by
``kfundus.data.readers.load_pairs``. :func:`kfundus.data.pipeline.prepare` decodes both
eyes of every row once into the shared uint8 cache, exactly as for two-eye
classification; :func:`make_pair_dataset` streams that cache with the tokenised reports.
"""

from __future__ import annotations

import re

import tensorflow as tf

from kfundus.data.pipeline import Prepared, augmenter, cache_positions, cached_records
from kfundus.errors import ConfigError, DataError

_SIDE_WORDS = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b|(左)|(右)")
_SWAP = {
    "left": "right",
    "right": "left",
    "Left": "Right",
    "Right": "Left",
    "LEFT": "RIGHT",
    "RIGHT": "LEFT",
    "左": "右",
    "右": "左",
}


def swap_sides(text: str) -> str:
    """The report with its sides exchanged ("left" <-> "right", also capitalised, and the
    Chinese 左 <-> 右): the text of the mirrored, swapped pair ``flip=True`` makes."""
    return _SIDE_WORDS.sub(lambda m: _SWAP[m.group(0)], text)


def make_pair_dataset(
    prepared: Prepared,
    packer,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    flip: bool = False,
    repeat: bool = False,
    with_index: bool = False,
    drop_remainder: bool = False,
    augment=None,
) -> tf.data.Dataset:
    """Stream prepared pairs as batches of dicts.

    Yields ``{"left_image": float32 (B, H, W, 3) in [0, 255], "right_image": ...,
    "token_ids": int32 (B, L), "padding_mask": bool (B, L)}`` and, with ``with_index``,
    ``"index"`` (int64 (B,): the row of ``prepared.manifest``, for retrieval evaluation).

    Args:
        prepared: a patient-level Manifest with ``text``, through ``prepare``.
        packer: a :class:`kfundus.text.TextPacker` (tokenises inside the pipeline).
        batch_size: pairs per batch.
        shuffle: shuffle the rows, again every epoch (seeded by ``seed``).
        flip: with probability 1/2 per pair, mirror both images horizontally AND swap
            them, and swap "left"/"right" in the report (:func:`swap_sides`). Off by
            default: a mirrored left fundus looks like a right one (optic disc on the
            other side), so flipping in place would feed the left projection right-eye
            anatomy and teach it the wrong laterality. Mirror + swap keeps every input
            anatomically consistent with its slot and the text true to the images.
        repeat: repeat forever (then give ``steps_per_epoch`` to ``fit``).
        with_index: also yield ``index``.
        drop_remainder: drop a last, smaller batch (a contrastive loss on a tiny last
            batch has few negatives).
        augment: a :class:`kfundus.config.Augment` applied to each eye on its own
            (training only; its ``hflip`` is refused for the reason above: use ``flip``).
    """
    manifest = prepared.manifest
    if manifest.level != "patient" or "text" not in manifest.frame:
        raise DataError(
            "image-report pairs need patient rows (left_image, right_image) with a text column: read "
            "them with kfundus.data.readers.load_pairs"
        )
    if augment is not None and augment.hflip:
        raise ConfigError(
            "data.augment.hflip would mirror one eye in place and teach the wrong laterality; "
            "use --set data.flip=true (mirrors both eyes, swaps them and the report's sides)"
        )
    aug = augmenter(augment, seed) if augment is not None else None
    size = prepared.config.image_size
    reports = manifest.frame["text"].astype(str).tolist()
    report_table = tf.constant(reports, dtype=tf.string)
    swapped_table = tf.constant([swap_sides(r) for r in reports], dtype=tf.string) if flip else None
    position_table = tf.constant(cache_positions(prepared))
    record_bytes = 8 + 2 * size * size * 3

    ds = cached_records(prepared)
    if repeat:
        ds = ds.repeat()
    if flip:  # one random integer per record, new ones every epoch
        coins = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, coins))
    else:
        ds = ds.map(lambda record: (record, tf.constant(0, tf.int64)))
    if shuffle:
        buffer = max(256, min(len(prepared), (512 << 20) // record_bytes))
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)

    def parse(records, coins):
        flat = tf.io.decode_raw(records, tf.uint8, fixed_length=record_bytes)
        index = tf.gather(position_table, tf.bitcast(flat[:, :8], tf.int64))
        images = tf.cast(tf.reshape(flat[:, 8:], [-1, 2, size, size, 3]), tf.float32)
        left, right = images[:, 0], images[:, 1]
        text = tf.gather(report_table, index)
        if flip:
            flipped = tf.equal(coins % 2, 1)
            pick = lambda a, b: tf.where(flipped[:, None, None, None], a, b)
            left, right = pick(tf.reverse(right, axis=[2]), left), pick(tf.reverse(left, axis=[2]), right)
            text = tf.where(flipped, tf.gather(swapped_table, index), text)
        if aug is not None:
            left = tf.clip_by_value(aug(left, training=True), 0.0, 255.0)
            right = tf.clip_by_value(aug(right, training=True), 0.0, 255.0)
        left.set_shape([None, size, size, 3])
        right.set_shape([None, size, size, 3])
        out = {"left_image": left, "right_image": right, **packer(text)}
        if with_index:
            out["index"] = index
        return out

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
