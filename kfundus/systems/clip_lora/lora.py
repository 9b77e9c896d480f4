"""LoRA (Hu et al. 2021) on the dense layers of a Keras encoder, with adapter files.

``W' = W + (alpha / r) * A @ B``: the frozen kernel ``W`` plus a trainable low-rank
update. kfundus uses Keras' own ``layer.enable_lora(rank, lora_alpha=...)`` on ``Dense``
and ``EinsumDense`` layers (keras-hub's ``Backbone.enable_lora`` does not pass alpha), and
freezes every other weight of the encoder, biases included (PEFT's ``bias="none"``).

- ``apply_lora(encoder, rank, alpha, targets)`` selects layers by name patterns matched
  against the end of their path (``query``, ``value``, ``attention_output``, ``mlp`` ...)
  and returns the paths it changed.
- ``save_adapters`` / ``load_adapters``: every trainable weight of the model (the LoRA
  factors and the head that is trained alongside them, PEFT's ``modules_to_save``) in one
  small ``.npz`` with its rank / alpha / targets, like a PEFT adapter. Loading checks the
  names, shapes and LoRA settings against the model and reproduces its outputs exactly.
- ``merge_lora(model)``: a plain copy with ``(alpha / r) A @ B`` folded into each kernel
  (what ``model.save`` writes: Keras merges LoRA on save), for export.

Keras' LoRA on an ``EinsumDense`` keeps every kernel axis but the last in its ``A``
factor. For the attention output projection (kernel ``heads x head_dim x hidden``) this is
the usual LoRA; for the query / key / value projections (kernel ``hidden x heads x
head_dim``) ``A`` would be ``hidden x heads x r`` and ``B`` ``r x head_dim``: one ``A`` per
head sharing one ``B``, ``heads`` times the parameters (and up to ``heads * r`` the rank) of
the paper's rank-``r`` update of the ``hidden x hidden`` matrix. kfundus therefore gives
such layers the paper's factorisation (``LoRAEinsumDense``: ``A`` over the kernel's input
axes, ``B`` over all its output axes, ``W' = W + (alpha / r) tensordot(A, B)``), and keeps
Keras' variable names, merge-on-save and ``lora_rank`` / ``lora_alpha`` attributes, so
adapters, merging and export are unchanged. ``per_head=True`` keeps Keras' own
factorisation. ``lora_parameter_count`` reports the count and the paper's count
(``benchmarks/lora.py``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import keras
import numpy as np
from keras import ops

from kfundus.errors import ConfigError

# Short names for the usual targets; anything else is a regular expression matched
# against the end of a layer's path ("encoder_block_3/attention/query").
TARGET_ALIASES = {
    "q": "query",
    "k": "key",
    "v": "value",
    "o": "attention_output",
    "attention": "query|key|value|attention_output",
    "mlp": r"(?:mlp/)?dense_[12]",
}
ADAPTER_FORMAT = "kfundus-lora-1"


def _pattern(targets) -> re.Pattern:
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ConfigError("lora_targets is empty: name the layers to adapt, e.g. [query, value]")
    parts = [TARGET_ALIASES.get(str(t), str(t)) for t in targets]
    return re.compile(r"(?:^|/)(?:%s)$" % "|".join(f"(?:{p})" for p in parts))


def lora_layers(encoder: keras.Layer, targets) -> list:
    """The ``Dense`` / ``EinsumDense`` layers of ``encoder`` whose path ends with one of
    ``targets`` (aliases in ``TARGET_ALIASES``, else regular expressions)."""
    pattern = _pattern(targets)
    return [
        layer
        for layer in encoder._flatten_layers(include_self=False)
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)) and pattern.search(layer.path)
    ]


def _input_axes(layer: keras.layers.EinsumDense) -> list[bool]:
    """For each axis of ``layer``'s kernel: is it contracted with the input (a fan-in axis)?"""
    inputs, kernel = layer.equation.split("->")[0].split(",")
    return [axis in inputs for axis in kernel]


def _needs_own_factorisation(layer) -> bool:
    """True for an EinsumDense whose kernel is ``fan-in axes..., output axes...`` with more
    than one output axis (query / key / value: ``hidden x heads x head_dim``): Keras'
    ``enable_lora`` would factorise it per head."""
    if type(layer) is not keras.layers.EinsumDense:
        return False
    fan_in = _input_axes(layer)
    n_in = sum(fan_in)
    return fan_in == [True] * n_in + [False] * (len(fan_in) - n_in) and len(fan_in) - n_in > 1


@keras.saving.register_keras_serializable(package="kfundus")
class LoRAEinsumDense(keras.layers.EinsumDense):
    """An ``EinsumDense`` whose LoRA update is the paper's rank-``r`` factorisation of the
    kernel seen as a ``fan_in x fan_out`` matrix (Hu et al. 2021, eq. 3).

    With kernel ``W`` of shape ``in_axes + out_axes`` (e.g. ``hidden x heads x head_dim``),
    ``A`` has shape ``in_axes + (r,)`` and ``B`` ``(r,) + out_axes``, and the layer computes
    with ``W + (alpha / r) * tensordot(A, B, 1)``. ``apply_lora`` switches a built
    ``EinsumDense`` to this class in place (its weights and config are unchanged); saving
    merges the update into ``kernel`` as Keras does, so a saved model is a plain
    ``EinsumDense`` again. Quantised kernels are not supported.
    """

    def enable_lora(self, rank, lora_alpha=None, a_initializer="he_uniform", b_initializer="zeros"):
        if not self.built:
            raise ValueError(f"{self.path}: build the layer before enabling LoRA")
        if self.lora_enabled:
            raise ValueError(f"{self.path}: LoRA is already enabled; it can be enabled once per layer")
        if self.quantization_mode is not None or self.kernel_constraint:
            raise ConfigError(
                f"{self.path}: LoRA needs a float kernel without a constraint (quantization {self.quantization_mode!r})"
            )
        shape = tuple(self._kernel.shape)
        n_in = sum(_input_axes(self))
        self._tracker.unlock()
        self.lora_kernel_a = self.add_weight(
            name="lora_kernel_a",
            shape=shape[:n_in] + (rank,),
            initializer=keras.initializers.get(a_initializer),
            dtype="float32",
            regularizer=self.kernel_regularizer,
        )
        self.lora_kernel_b = self.add_weight(
            name="lora_kernel_b",
            shape=(rank,) + shape[n_in:],
            initializer=keras.initializers.get(b_initializer),
            dtype="float32",
            regularizer=self.kernel_regularizer,
        )
        self._kernel.trainable = False
        self._tracker.lock()
        self.lora_enabled = True
        self.lora_rank = rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else rank

    @property
    def kernel(self):
        if not (self.built and self.lora_enabled):
            return keras.layers.EinsumDense.kernel.fget(self)
        update = ops.tensordot(self.lora_kernel_a, self.lora_kernel_b, axes=1)
        return ops.cast(ops.add(self._kernel, (self.lora_alpha / self.lora_rank) * update), self.compute_dtype)


def apply_lora(
    encoder: keras.Layer, rank: int, alpha: float | None = None, targets=("query", "value"), per_head: bool = False
) -> list[str]:
    """Freeze ``encoder`` and enable LoRA on the layers ``targets`` selects.

    Args:
        encoder: a built Keras layer or model (a keras-hub backbone).
        rank: LoRA rank ``r`` (> 0).
        alpha: scale numerator; the update is ``(alpha / r) A @ B`` (None: ``alpha = r``).
        targets: name patterns, e.g. ``["query", "value"]``, ``["attention", "mlp"]``.
        per_head: keep Keras' own factorisation of multi-head projections (one ``A`` per
            head, ``heads`` times the parameters); default: the paper's (``LoRAEinsumDense``).

    Returns: the paths of the adapted layers. Raises ConfigError when nothing matches.
    """
    if int(rank) <= 0:
        raise ConfigError(f"lora_rank={rank}: must be a positive integer (0 means full fine-tuning)")
    chosen = lora_layers(encoder, targets)
    if not chosen:
        names = sorted(
            {
                layer.path.rsplit("/", 1)[-1]
                for layer in encoder._flatten_layers(include_self=False)
                if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
            }
        )
        raise ConfigError(
            f"lora_targets={list(targets)} matches no Dense/EinsumDense layer of "
            f"{encoder.name}; its dense layers are named {names}"
        )
    encoder.trainable = False  # every variable frozen ...
    for layer in chosen:  # ... then the low-rank factors added as the only trainable ones
        layer.trainable = True  # (Keras makes a frozen layer's new weights non-trainable)
        if not per_head and _needs_own_factorisation(layer):
            object.__setattr__(layer, "__class__", LoRAEinsumDense)
        layer.enable_lora(int(rank), lora_alpha=float(alpha if alpha is not None else rank))
        for variable in layer.weights:  # enable_lora freezes the kernel; freeze the bias too
            variable.trainable = "lora_kernel" in variable.path
    return [layer.path for layer in chosen]


def lora_parameter_count(encoder: keras.Layer) -> dict:
    """Parameters of ``encoder``: total (frozen base), LoRA (the factors as built: the
    paper's, or Keras' per-head ones with ``per_head``) and the paper's rank-r LoRA of the
    same layers (``(fan_in + fan_out) * r`` per layer, ``textbook_*``)."""
    lora = textbook = 0
    for layer in encoder._flatten_layers(include_self=False):
        if getattr(layer, "lora_enabled", False):
            lora += int(np.prod(layer.lora_kernel_a.shape) + np.prod(layer.lora_kernel_b.shape))
            shape = tuple(layer._kernel.shape)
            if isinstance(layer, keras.layers.EinsumDense):  # kernel axes shared with the input
                inputs, kernel = layer.equation.split("->")[0].split(",")
                fan_in = int(np.prod([d for axis, d in zip(kernel, shape) if axis in inputs]))
            else:
                fan_in = shape[0]
            textbook += (fan_in + int(np.prod(shape)) // fan_in) * int(layer.lora_rank)
    base = sum(int(np.prod(v.shape)) for v in encoder.weights if "lora_kernel" not in v.path)
    return {
        "encoder_parameters": base,
        "lora_parameters": lora,
        "textbook_lora_parameters": textbook,
        "lora_share": lora / max(base, 1),
        "textbook_share": textbook / max(base, 1),
    }


def parameter_summary(model: keras.Model) -> dict:
    """Trainable and total parameter counts of ``model`` (printed by the builders)."""
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    total = sum(int(np.prod(v.shape)) for v in model.weights)
    return {"trainable": trainable, "total": total, "share": trainable / max(total, 1)}


def lora_settings(model: keras.Model) -> dict:
    """``{layer path: (rank, alpha)}`` of every LoRA-enabled layer of ``model``."""
    return {
        layer.path: (int(layer.lora_rank), float(layer.lora_alpha))
        for layer in model._flatten_layers(include_self=False)
        if getattr(layer, "lora_enabled", False)
    }


# ---------------------------------------------------------------------------
# adapter files


def save_adapters(model: keras.Model, path, metadata: dict | None = None) -> Path:
    """Write every trainable weight of ``model`` (LoRA factors + trained head) to ``path``
    (``.npz``), keyed by variable path, with the LoRA settings and ``metadata``."""
    settings = lora_settings(model)
    if not settings:
        raise ConfigError(
            f"model {model.name} has no LoRA layer: nothing to save as an adapter "
            "(save the whole model with model.save instead)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {v.path: np.asarray(keras.ops.convert_to_numpy(v)) for v in model.trainable_weights}
    meta = {
        "format": ADAPTER_FORMAT,
        "model": model.name,
        "lora": {p: {"rank": r, "alpha": a} for p, (r, a) in settings.items()},
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        **(metadata or {}),
    }
    with open(path, "wb") as f:  # np.savez would append .npz to other suffixes
        np.savez(f, __meta__=np.array(json.dumps(meta)), **arrays)
    return path


def load_adapters(model: keras.Model, path) -> dict:
    """Load an adapter file into ``model`` (built with the same encoder, LoRA rank / alpha /
    targets and head). Every trainable weight must be in the file with its shape, and the
    file's LoRA layers must be the model's, else a ConfigError names the difference.
    Returns the file's metadata."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"adapter file {path} not found")
    with np.load(path) as data:
        meta = json.loads(str(data["__meta__"]))
        arrays = {k: data[k] for k in data.files if k != "__meta__"}
    if meta.get("format") != ADAPTER_FORMAT:
        raise ConfigError(f"{path} is not a kfundus LoRA adapter file (format {meta.get('format')!r})")
    want = {p: (s["rank"], s["alpha"]) for p, s in meta["lora"].items()}
    have = lora_settings(model)
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:6]
        raise ConfigError(
            f"{path} was saved from LoRA layers {len(want)} with other rank/alpha/targets than "
            f"model {model.name} ({len(have)} LoRA layers); first differences: {diff}. Build the "
            "model with the adapter's lora_rank, lora_alpha and lora_targets"
        )
    variables = {v.path: v for v in model.trainable_weights}
    missing, extra = sorted(set(variables) - set(arrays)), sorted(set(arrays) - set(variables))
    if missing or extra:
        raise ConfigError(f"{path} does not fit model {model.name}: missing {missing[:6]}, unexpected {extra[:6]}")
    for name, variable in variables.items():
        if tuple(arrays[name].shape) != tuple(variable.shape):
            raise ConfigError(f"{path}: {name} has shape {arrays[name].shape}, the model's is {variable.shape}")
        variable.assign(arrays[name])
    return meta


def merge_lora(model: keras.Model) -> keras.Model:
    """A copy of ``model`` without LoRA: each adapted kernel becomes ``W + (alpha/r) A @ B``.

    Goes through Keras' own serialisation, which merges LoRA when saving; the copy has the
    base model's parameter count and computes the same function (up to float rounding).
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "merged.keras"
        model.save(file)
        merged = keras.saving.load_model(file, compile=False)
    left = lora_settings(merged)
    if left:  # a Dense whose config carries lora_rank comes back with zeroed factors: harmless
        for layer in merged._flatten_layers(include_self=False):
            if getattr(layer, "lora_enabled", False) and np.any(keras.ops.convert_to_numpy(layer.lora_kernel_b)):
                raise ConfigError(f"merging LoRA left non-zero factors in {layer.path}")
    return merged
