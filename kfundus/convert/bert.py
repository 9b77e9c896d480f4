"""BERT checkpoints into keras-hub's ``BertBackbone``: the text towers of FLAIR
(Bio_ClinicalBERT) and of the released RET-CLIP (Chinese RoBERTa-wwm-ext-base, a BERT).

Both are BERT encoders in the Hugging Face key layout (``embeddings.word_embeddings``,
``encoder.layer.N.attention.self.query`` ...), under a prefix: ``text_model.model.`` in a
FLAIR file, ``bert.`` in a RET-CLIP file (Chinese-CLIP's own BERT, the same keys without the
pooler), ``bert.`` or nothing in a Hugging Face folder. The facts, carried over from
keras-hub's own Hugging Face converter and checked against ``transformers.BertModel``:

- PyTorch ``Linear`` weights are ``(out, in)``; Keras ``Dense`` kernels ``(in, out)``; the
  attention projections of keras-hub's ``TransformerEncoder`` are einsum kernels
  ``(hidden, heads, head_dim)`` (query/key/value) and ``(heads, head_dim, hidden)`` (output);
- LayerNorm weights are ``weight``/``bias`` (or ``gamma``/``beta`` in files converted from
  Google's TensorFlow checkpoints); epsilon 1e-12 on both sides;
- the segment (token type) embedding is ``token_type_embeddings``; FLAIR and RET-CLIP feed
  segment 0 everywhere; positions are ``0..L-1``;
- padding tokens are masked as attention keys only (their own hidden states are computed and
  returned, which matters for FLAIR's mean over all tokens).

One difference is not a matter of keys: keras-hub's ``BertBackbone`` uses the tanh
approximation of GELU, while BERT (Google's original, ``transformers``, Chinese-CLIP) uses the
exact erf form. Measured on a BERT-base with random weights, the stock backbone's last hidden
state differs from ``transformers.BertModel``'s by 1.0e-3 (2.8e-4 after the first layer), far
beyond a 1e-4 parity budget, against 3.5e-6 with the exact GELU; the converted encoder is
therefore :class:`ExactGeluBertBackbone`,
keras-hub's backbone with the exact GELU (a registered subclass: it saves and loads as a
keras-hub preset folder).

The number of attention heads is not in the weights: it is read from the checkpoint's
``config.json`` where there is one (a Hugging Face folder), else it is ``hidden / 64`` (every
BERT-base/large, Bio_ClinicalBERT and RoBERTa-wwm-ext use 64-wide heads).
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import keras_hub
import numpy as np

from kfundus.errors import ConfigError, DataError

HEAD_WIDTH = 64


@keras.saving.register_keras_serializable(package="kfundus")
def exact_gelu(x):
    """GELU with the error function, BERT's ``gelu`` (``keras.activations.gelu`` exact)."""
    return keras.activations.gelu(x, approximate=False)


@keras.saving.register_keras_serializable(package="kfundus")
class ZeroSegments(keras.layers.Layer):
    """``token_ids`` -> int32 zeros of the same shape: the ``segment_ids`` of one-sentence input."""

    def call(self, token_ids):
        return keras.ops.zeros_like(token_ids, dtype="int32")

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="kfundus")
class ExactGeluBertBackbone(keras_hub.models.BertBackbone):
    """keras-hub's ``BertBackbone`` with BERT's exact (erf) GELU in every feed-forward block.

    Same arguments, inputs (``token_ids``, ``segment_ids``, ``padding_mask``) and outputs
    (``sequence_output``, ``pooled_output``) as ``keras_hub.models.BertBackbone``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for layer in self.transformer_layers:
            layer.activation = exact_gelu
            layer._feedforward_intermediate_dense.activation = exact_gelu


# ---------------------------------------------------------------------------
# keys and sizes


def bert_keys(num_layers: int, prefix: str = "", *, pooler: bool = True, layer_norm=("weight", "bias")) -> list[str]:
    """The state-dict keys a BERT encoder of ``num_layers`` layers has, under ``prefix``."""
    g, b = layer_norm
    keys = [
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        f"embeddings.LayerNorm.{g}",
        f"embeddings.LayerNorm.{b}",
    ]
    for i in range(num_layers):
        layer = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            keys += [f"{layer}{name}.weight", f"{layer}{name}.bias"]
        keys += [f"{layer}attention.output.LayerNorm.{g}", f"{layer}attention.output.LayerNorm.{b}"]
        for name in ("intermediate.dense", "output.dense"):
            keys += [f"{layer}{name}.weight", f"{layer}{name}.bias"]
        keys += [f"{layer}output.LayerNorm.{g}", f"{layer}output.LayerNorm.{b}"]
    if pooler:
        keys += ["pooler.dense.weight", "pooler.dense.bias"]
    return [prefix + k for k in keys]


def count_layers(state_dict: dict, prefix: str = "") -> int:
    """Number of ``encoder.layer.N`` blocks under ``prefix``."""
    start = f"{prefix}encoder.layer."
    numbers = {int(k[len(start) :].split(".", 1)[0]) for k in state_dict if k.startswith(start)}
    return max(numbers) + 1 if numbers else 0


def layer_norm_names(state_dict: dict, prefix: str = "") -> tuple[str, str]:
    """``("weight", "bias")`` or ``("gamma", "beta")``: how the file names LayerNorm weights."""
    return ("gamma", "beta") if f"{prefix}embeddings.LayerNorm.gamma" in state_dict else ("weight", "bias")


def bert_config(state_dict: dict, prefix: str = "", *, num_heads: int | None = None, config_file=None) -> dict:
    """``BertBackbone`` arguments from the weights' shapes (and ``config_file``, a Hugging
    Face ``config.json``, for the number of heads), under ``prefix``.

    Raises:
        DataError: no BERT word embedding under ``prefix``.
    """
    key = f"{prefix}embeddings.word_embeddings.weight"
    if key not in state_dict:
        raise DataError(f"no BERT text encoder in the checkpoint: the key {key!r} is missing")
    vocabulary, hidden = state_dict[key].shape
    if num_heads is None and config_file is not None and Path(config_file).is_file():
        num_heads = json.loads(Path(config_file).read_text()).get("num_attention_heads")
    if num_heads is None:
        num_heads = max(1, int(hidden) // HEAD_WIDTH)
    layers = count_layers(state_dict, prefix)
    intermediate = state_dict[f"{prefix}encoder.layer.0.intermediate.dense.weight"].shape[0] if layers else 4 * hidden
    return {
        "vocabulary_size": int(vocabulary),
        "num_layers": int(layers),
        "num_heads": int(num_heads),
        "hidden_dim": int(hidden),
        "intermediate_dim": int(intermediate),
        "max_sequence_length": int(state_dict[f"{prefix}embeddings.position_embeddings.weight"].shape[0]),
        "num_segments": int(state_dict[f"{prefix}embeddings.token_type_embeddings.weight"].shape[0]),
    }


# ---------------------------------------------------------------------------
# weights


def _assign(variable, value: np.ndarray, key: str) -> None:
    value = np.asarray(value, dtype=np.float32)
    if tuple(value.shape) != tuple(variable.shape):
        raise DataError(
            f"{key}: shape {tuple(value.shape)} in the checkpoint, the Keras layer needs {tuple(variable.shape)}"
        )
    variable.assign(value)


def _linear(dense, state_dict, key: str, used: set) -> None:
    """A PyTorch Linear ``key`` (``.weight`` (out, in), ``.bias``) into a Keras Dense or
    einsum layer (kernel and bias reshaped to the layer's shapes)."""
    weight = np.asarray(state_dict[f"{key}.weight"], dtype=np.float32)
    _assign(dense.kernel, np.reshape(weight.T, dense.kernel.shape), f"{key}.weight")
    bias = np.asarray(state_dict[f"{key}.bias"], dtype=np.float32)
    _assign(dense.bias, np.reshape(bias, dense.bias.shape), f"{key}.bias")
    used.update((f"{key}.weight", f"{key}.bias"))


def _layer_norm(layer, state_dict, key: str, names, used: set) -> None:
    g, b = names
    _assign(layer.gamma, state_dict[f"{key}.{g}"], f"{key}.{g}")
    _assign(layer.beta, state_dict[f"{key}.{b}"], f"{key}.{b}")
    used.update((f"{key}.{g}", f"{key}.{b}"))


def load_bert_weights(backbone, state_dict: dict, prefix: str = "") -> set[str]:
    """Copy a BERT state dict (Hugging Face layout under ``prefix``) into ``backbone`` (a
    ``BertBackbone`` of the matching sizes, see :func:`bert_config`). Returns the keys used.
    A checkpoint without the pooler (Chinese-CLIP, RET-CLIP) leaves ``pooled_dense`` as built
    (kfundus never reads it).

    Raises:
        DataError: a missing key or a shape that does not match (naming the key).
    """
    used: set[str] = set()
    names = layer_norm_names(state_dict, prefix)
    missing = [k for k in bert_keys(backbone.num_layers, prefix, pooler=False, layer_norm=names) if k not in state_dict]
    if missing:
        raise DataError(f"the BERT text encoder is incomplete: missing {missing[:5]} ({len(missing)} keys)")
    p = prefix
    _assign(
        backbone.get_layer("token_embedding").embeddings,
        state_dict[f"{p}embeddings.word_embeddings.weight"],
        f"{p}embeddings.word_embeddings.weight",
    )
    _assign(
        backbone.get_layer("position_embedding").position_embeddings,
        state_dict[f"{p}embeddings.position_embeddings.weight"],
        f"{p}embeddings.position_embeddings.weight",
    )
    _assign(
        backbone.get_layer("segment_embedding").embeddings,
        state_dict[f"{p}embeddings.token_type_embeddings.weight"],
        f"{p}embeddings.token_type_embeddings.weight",
    )
    used.update(
        f"{p}embeddings.{n}.weight" for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    )
    _layer_norm(backbone.get_layer("embeddings_layer_norm"), state_dict, f"{p}embeddings.LayerNorm", names, used)
    for i in range(backbone.num_layers):
        block = backbone.get_layer(f"transformer_layer_{i}")
        attention = block._self_attention_layer
        key = f"{p}encoder.layer.{i}."
        _linear(attention.query_dense, state_dict, f"{key}attention.self.query", used)
        _linear(attention.key_dense, state_dict, f"{key}attention.self.key", used)
        _linear(attention.value_dense, state_dict, f"{key}attention.self.value", used)
        _linear(attention.output_dense, state_dict, f"{key}attention.output.dense", used)
        _layer_norm(block._self_attention_layer_norm, state_dict, f"{key}attention.output.LayerNorm", names, used)
        _linear(block._feedforward_intermediate_dense, state_dict, f"{key}intermediate.dense", used)
        _linear(block._feedforward_output_dense, state_dict, f"{key}output.dense", used)
        _layer_norm(block._feedforward_layer_norm, state_dict, f"{key}output.LayerNorm", names, used)
    if f"{p}pooler.dense.weight" in state_dict:
        _linear(backbone.get_layer("pooled_dense"), state_dict, f"{p}pooler.dense", used)
    return used


def build_bert(state_dict: dict, prefix: str = "", *, num_heads: int | None = None, config_file=None):
    """An :class:`ExactGeluBertBackbone` of the checkpoint's sizes with its weights; returns
    ``(backbone, keys used)``."""
    config = bert_config(state_dict, prefix, num_heads=num_heads, config_file=config_file)
    backbone = ExactGeluBertBackbone(**config, dropout=0.1)
    return backbone, load_bert_weights(backbone, state_dict, prefix)


# ---------------------------------------------------------------------------
# using it


def hidden_states_model(backbone) -> keras.Model:
    """``{token_ids, segment_ids, padding_mask}`` -> ``[embeddings, layer 1, ..., layer n]``,
    the list ``transformers`` returns as ``hidden_states`` (``output_hidden_states=True``),
    sharing the backbone's layers."""
    outputs = [backbone.get_layer("embeddings_dropout").output]
    outputs += [backbone.get_layer(f"transformer_layer_{i}").output for i in range(backbone.num_layers)]
    return keras.Model(backbone.input, outputs, name=f"{backbone.name}_hidden_states")


@keras.saving.register_keras_serializable(package="kfundus")
class BertVocabTokenizer(keras_hub.tokenizers.BertTokenizer):
    """keras-hub's ``BertTokenizer`` lower-casing as BERT does.

    BERT's tokenizer (Google's, ``transformers``', Chinese-CLIP's) lower-cases with Python's
    ``str.lower`` and strips accents; keras-hub's ``lowercase=True`` applies Unicode NFKC case
    folding instead, which also turns full-width punctuation (``：``, ``，``, common in
    Chinese reports) into ASCII characters that a Chinese vocabulary does not have (they become
    ``[UNK]``). This tokenizer lower-cases with ``tf.strings.lower`` and leaves the rest (accent
    stripping, CJK and punctuation splitting, WordPiece) to keras-hub.

    Args:
        vocabulary: the ``vocab.txt`` path or a list of tokens.
        bert_lowercase: lower-case the text first (BERT's ``do_lower_case``).
        **kwargs: ``keras_hub.tokenizers.BertTokenizer`` arguments (``lowercase`` is ignored).
    """

    def __init__(self, vocabulary=None, bert_lowercase: bool = True, **kwargs):
        kwargs.pop("lowercase", None)
        super().__init__(vocabulary=vocabulary, lowercase=False, **kwargs)
        self.bert_lowercase = bool(bert_lowercase)

    def tokenize(self, inputs):
        import tensorflow as tf

        if self.bert_lowercase:
            inputs = tf.strings.lower(tf.convert_to_tensor(inputs), encoding="utf-8")
        return super().tokenize(inputs)

    def get_config(self):
        return {**super().get_config(), "bert_lowercase": self.bert_lowercase}


def find_vocabulary(vocab, checkpoint_path: Path, expected: str) -> Path | None:
    """The ``vocab.txt`` of a text encoder: ``vocab`` (a file, or a folder holding one), else
    one beside the checkpoint (in its folder), else None. ``expected`` says which file to give
    when ``vocab`` names none (e.g. ``"Bio_ClinicalBERT's vocab.txt"``)."""
    if vocab:
        path = Path(vocab).expanduser()
        path = path / "vocab.txt" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"--set vocab={vocab}: no vocab.txt there; give {expected} or the folder that holds it")
        return path
    folder = checkpoint_path if checkpoint_path.is_dir() else checkpoint_path.parent
    return folder / "vocab.txt" if (folder / "vocab.txt").is_file() else None


def save_vocabulary(
    vocabulary: Path, folder: Path, *, lowercase: bool, vocabulary_size: int, checkpoint, expected: str
):
    """The tokenizer of ``vocabulary`` (a BERT ``vocab.txt``), checked against the text
    encoder's ``vocabulary_size`` and saved as a keras-hub preset folder ``folder`` with the
    ``vocab.txt`` beside it (what ``kfundus.text.make_tokenizer(folder)`` reloads).
    ``checkpoint`` and ``expected`` (the file to give instead) name the mismatch."""
    import shutil

    from kfundus.text import save_tokenizer

    tokenizer = bert_tokenizer(vocabulary, lowercase=lowercase)
    if int(tokenizer.vocabulary_size()) != vocabulary_size:
        raise ConfigError(
            f"{vocabulary} has {tokenizer.vocabulary_size()} tokens, the text encoder of {checkpoint} "
            f"{vocabulary_size}: give {expected}"
        )
    save_tokenizer(tokenizer, folder)
    shutil.copyfile(vocabulary, Path(folder) / "vocab.txt")
    return tokenizer


def bert_tokenizer(vocabulary_file, *, lowercase: bool = True) -> BertVocabTokenizer:
    """A :class:`BertVocabTokenizer` on a checkpoint's ``vocab.txt`` (no download). BERT
    lower-cases unless the checkpoint's ``tokenizer_config.json`` says ``do_lower_case: false``
    (:func:`lowercase_of`).

    Raises:
        ConfigError: the vocabulary file does not exist, has repeated tokens, or has no
            ``[CLS]``/``[SEP]``/``[PAD]``/``[UNK]``.
    """
    path = Path(vocabulary_file)
    if not path.is_file():
        raise ConfigError(
            f"vocabulary file {path} not found: give the vocab.txt the text encoder was trained with "
            "(e.g. --set vocab=/models/Bio_ClinicalBERT/vocab.txt)"
        )
    tokens = path.read_text(encoding="utf-8").splitlines()
    absent = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]") if t not in tokens]
    if absent:
        raise ConfigError(f"{path} is not a BERT vocabulary: it has no {absent}")
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"{path}: some tokens appear twice; a BERT vocabulary lists each token once")
    return BertVocabTokenizer(vocabulary=str(path), bert_lowercase=lowercase)


def lowercase_of(folder) -> bool:
    """``do_lower_case`` of a Hugging Face tokenizer folder (True, BERT's default, if not said)."""
    config = Path(folder) / "tokenizer_config.json"
    if config.is_file():
        return bool(json.loads(config.read_text()).get("do_lower_case", True))
    return True
