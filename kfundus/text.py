"""Tokenizers and the text packer for image-report pre-training (RET-CLIP).

Three ways to get a tokenizer (:func:`make_tokenizer`):

- ``None`` / ``"wordpiece"`` (default): a WordPiece vocabulary computed offline from the
  training reports (``keras_hub.tokenizers.compute_word_piece_vocabulary``), lower-cased,
  split on whitespace and punctuation, with the reserved tokens ``[PAD]`` (id 0),
  ``[UNK]``, ``[START]`` and ``[END]``. Works without network access; a few thousand
  word pieces cover report text such as ODIR's keywords. RET-CLIP itself uses the
  RoBERTa-wwm-ext-base-chinese tokenizer of its (Chinese) BERT text encoder; a keras-hub
  preset gives the corresponding choice where a network exists.
- a keras-hub preset name (``"clip_vit_base_patch16"``, ``"bert_base_en"``,
  ``"hf://..."``): ``keras_hub.tokenizers.Tokenizer.from_preset`` - downloads, so it
  needs a network (or a filled keras-hub cache); offline it fails with a ConfigError that
  says what to do instead.
- a local preset folder: one written by :func:`save_tokenizer` (a pre-training run saves
  its tokenizer so that evaluation reloads exactly the same ids), or a downloaded preset.

:class:`TextPacker` turns report strings into fixed-length ``token_ids`` and
``padding_mask``: start token, tokens, end token, padding. Text encoders pool the hidden
state at the end token (position ``sum(padding_mask) - 1``), so truncation drops report
tokens, never the end token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tensorflow as tf

from kfundus.errors import ConfigError

RESERVED_TOKENS = ("[PAD]", "[UNK]", "[START]", "[END]")
# (start, end) token strings tried in order when a tokenizer has no start/end ids itself.
_START_END = (("[START]", "[END]"), ("<|startoftext|>", "<|endoftext|>"), ("[CLS]", "[SEP]"), ("<s>", "</s>"))
_PAD = ("[PAD]", "<pad>", "<|padding|>")


def _keras_hub():
    import keras_hub  # deferred: importing keras-hub costs seconds

    return keras_hub


def _is_path(spec: str) -> bool:
    """Whether ``spec`` names a local folder rather than a preset name or handle."""
    if "://" in spec:
        return False
    return os.path.exists(os.path.expanduser(spec)) or spec.startswith((".", "~", "/")) or os.sep in spec


def make_tokenizer(spec=None, corpus=None, *, vocabulary_size: int = 2000, lowercase: bool = True):
    """A keras-hub tokenizer for report text.

    Args:
        spec: ``None`` or ``"wordpiece"`` (a WordPiece vocabulary computed from
            ``corpus``), a keras-hub preset name or handle, or a local preset folder
            (see the module docstring).
        corpus: the report strings the WordPiece vocabulary is computed from (the
            training split's reports: computing it on test reports would leak them).
        vocabulary_size: the WordPiece vocabulary's maximum size, reserved tokens
            included; a small corpus gives fewer pieces.
        lowercase: lower-case text before the WordPiece split (reports rarely need case).

    Raises:
        ConfigError: no corpus for ``"wordpiece"``; a folder that does not exist or holds
            no tokenizer; a preset that cannot be loaded (unknown name, or no network).
    """
    keras_hub = _keras_hub()
    if spec is None or str(spec).lower() == "wordpiece":
        texts = [] if corpus is None else [str(t) for t in corpus]
        if not any(t.strip() for t in texts):
            raise ConfigError(
                "the 'wordpiece' tokenizer computes its vocabulary from the reports: pass "
                "corpus= (the training reports), or a tokenizer folder saved by a run"
            )
        data = tf.data.Dataset.from_tensor_slices(texts).batch(1024)
        vocabulary = keras_hub.tokenizers.compute_word_piece_vocabulary(
            data, vocabulary_size, lowercase=lowercase, reserved_tokens=list(RESERVED_TOKENS)
        )
        return keras_hub.tokenizers.WordPieceTokenizer(
            vocabulary=vocabulary, lowercase=lowercase, oov_token="[UNK]", special_tokens=["[START]", "[END]"]
        )
    spec = str(spec)
    if _is_path(spec):
        return _load_folder(Path(spec).expanduser())
    try:
        return keras_hub.tokenizers.Tokenizer.from_preset(spec)
    except Exception as error:
        reason = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        raise ConfigError(
            f"cannot load the tokenizer preset {spec!r} ({type(error).__name__}: {reason}). A keras-hub preset "
            "name downloads its files, which needs network access. Offline, pass a local preset folder "
            "(written by kfundus.text.save_tokenizer or a pre-training run, or a downloaded keras-hub preset), "
            "or use the default 'wordpiece' tokenizer, whose vocabulary is computed from the reports."
        ) from error


def _load_folder(folder: Path):
    """A tokenizer from a local preset folder (``tokenizer.json`` + ``assets/``)."""
    import keras

    keras_hub = _keras_hub()
    if not folder.is_dir():
        raise ConfigError(
            f"tokenizer folder {folder} does not exist: give a folder written by save_tokenizer "
            "(or a pre-training run), a keras-hub preset name, or 'wordpiece'"
        )
    config_file = folder / "tokenizer.json"
    if config_file.is_file():
        # Read directly rather than through Tokenizer.from_preset: that one needs a
        # backbone config.json, which a tokenizer-only folder does not have.
        try:
            tokenizer = keras.saving.deserialize_keras_object(json.loads(config_file.read_text()))
            tokenizer.load_preset_assets(str(folder))
        except Exception as error:
            raise ConfigError(f"cannot load the tokenizer saved in {folder}: {error}") from error
        return tokenizer
    if (folder / "config.json").is_file():  # e.g. a Hugging Face folder keras-hub converts
        try:
            return keras_hub.tokenizers.Tokenizer.from_preset(str(folder))
        except Exception as error:
            raise ConfigError(f"cannot load a tokenizer from the preset folder {folder}: {error}") from error
    raise ConfigError(
        f"{folder} holds no tokenizer (no tokenizer.json): give a folder written by "
        "kfundus.text.save_tokenizer or a keras-hub preset folder"
    )


def save_tokenizer(tokenizer, folder) -> Path:
    """Save ``tokenizer`` as a keras-hub preset folder (``tokenizer.json`` and its
    vocabulary under ``assets/``) that ``make_tokenizer(folder)`` reloads with identical
    ids. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_to_preset(str(folder))
    return folder


def _token_id(tokenizer, token: str):
    try:
        value = tokenizer.token_to_id(token)
    except (KeyError, ValueError, IndexError, TypeError, tf.errors.OpError):
        return None
    if value is None:
        return None
    value = int(value)
    # Some tokenizers map unknown strings to their [UNK] id instead of failing.
    if value < 0 or tokenizer.id_to_token(value) != token:
        return None
    return value


def special_ids(tokenizer) -> tuple[int, int, int]:
    """``(start, end, pad)`` token ids of ``tokenizer``: its own ``start_token_id`` /
    ``end_token_id`` / ``pad_token_id`` when it has them (CLIP: ``<|startoftext|>``,
    ``<|endoftext|>``), else the first present of ``[START]``/``[END]``,
    ``<|startoftext|>``/``<|endoftext|>``, ``[CLS]``/``[SEP]``, ``<s>``/``</s>``; pad:
    ``[PAD]``/``<pad>``, else 0."""
    start, end = getattr(tokenizer, "start_token_id", None), getattr(tokenizer, "end_token_id", None)
    if start is None or end is None:
        for a, b in _START_END:
            start, end = _token_id(tokenizer, a), _token_id(tokenizer, b)
            if start is not None and end is not None:
                break
        else:
            raise ConfigError(
                f"tokenizer {type(tokenizer).__name__} has no start/end tokens (looked for "
                f"{[p for pair in _START_END for p in pair]}): the text encoder pools at the end "
                "token, so use a tokenizer that has one (the default 'wordpiece' does)"
            )
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = next((i for i in (_token_id(tokenizer, t) for t in _PAD) if i is not None), 0)
    return int(start), int(end), int(pad)


class TextPacker:
    """Tokenise report strings and pack them to a fixed length.

    ``packer(text)`` with a tf string tensor (scalar or batch, also inside a
    ``tf.data`` map) returns ``{"token_ids": int32 (..., L), "padding_mask": bool (..., L)}``:
    start token, tokens, end token, then the pad id. Reports longer than ``L - 2`` tokens
    lose their last tokens; the end token is always kept, so the end position is
    ``sum(padding_mask) - 1``.

    Args:
        tokenizer: a keras-hub tokenizer (see :func:`make_tokenizer`).
        sequence_length: ``L``; 77 as in CLIP.
    """

    def __init__(self, tokenizer, sequence_length: int = 77):
        if int(sequence_length) < 2:
            raise ConfigError(f"sequence_length={sequence_length}: need at least 2 (start and end tokens)")
        self.tokenizer = tokenizer
        self.sequence_length = int(sequence_length)
        self.start_id, self.end_id, self.pad_id = special_ids(tokenizer)
        self._packer = _keras_hub().layers.StartEndPacker(
            sequence_length=self.sequence_length,
            start_value=self.start_id,
            end_value=self.end_id,
            pad_value=self.pad_id,
            return_padding_mask=True,
        )

    def __call__(self, text) -> dict:
        text = tf.convert_to_tensor(text, dtype=tf.string)
        token_ids, mask = self._packer(self.tokenizer(text))
        token_ids = tf.cast(tf.convert_to_tensor(token_ids), tf.int32)
        mask = tf.cast(tf.convert_to_tensor(mask), tf.bool)
        shape = [self.sequence_length] if text.shape.rank == 0 else [None, self.sequence_length]
        token_ids.set_shape(shape)
        mask.set_shape(shape)
        return {"token_ids": token_ids, "padding_mask": mask}

    @property
    def vocabulary_size(self) -> int:
        return int(self.tokenizer.vocabulary_size())
