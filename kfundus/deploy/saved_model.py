"""Export a trained Keras model as a bundle: ``.keras``, SavedModel and TFLite files.

A bundle is one folder a deployment can pick up whole::

    out_dir/
      model.keras                 the Keras model as trained (custom layers need kfundus importable)
      saved_model/                standalone TF SavedModel with two signatures (below)
      model.tflite                float32 TFLite (builtin ops only), signature ``serving_default``
      model_float16.tflite        float16 weights, float32 arithmetic and I/O
      model_dynamic_int8.tflite   int8 weights, activations quantized on the fly, float32 I/O
      model_int8.tflite           full integer: int8 weights and activations, calibrated on a
                                  representative sample; uint8 pixels in, float32 out
      labels.txt                  one label per line, in the order of the output units
      model_card.json             labels, inputs/outputs, signatures, TFLite variants (size,
                                  ops, distance to Keras), parity, versions and the caller's
                                  metadata (thresholds, preprocessing, metrics, data summary)

SavedModel signatures (TensorFlow Serving):

- ``serving_default``: encoded images (JPEG/PNG/BMP/GIF bytes, a batch of strings) per
  model input, named ``<input>_bytes`` (``image_bytes``, or ``left_image_bytes`` and
  ``right_image_bytes``). Inside the graph they go through the training pipeline's own
  ``kfundus.data.images.preprocess_image`` (DCT-reduced decode, fundus crop, pad,
  resize) and the same rounding to 8 bits the training cache applies, so a served file
  meets the model exactly as in training. Returns every named model output and the
  label names (``labels``, or ``labels_<output>`` for multi-task models), one row per image.
  A JPEG's EXIF orientation is applied, as in training. Bytes that cannot be an image
  (empty, no JPEG/PNG/GIF/BMP magic bytes, a JPEG without its end-of-image marker, a PNG
  without ``IEND``) fail the request with ``InvalidArgumentError`` naming the element,
  ``image_bytes[3]: truncated JPEG (no end-of-image marker)``
  (``kfundus.data.images.encoded_image_problem``); data corrupt inside a whole file fails
  with the decoder's own message (TensorFlow cannot skip one item of a batch); ``kfundus
  predict`` finds and reports such files instead.
- ``serving_preprocessed``: float32 images in [0, 255] (already cropped and resized), by
  the Keras input names (``image`` / ``left_image``, ``right_image``) -> the named outputs.
  TFLite files are converted from this one; their signature is ``serving_default``.

A model whose inputs are not square RGB images gets only the tensor signature, also
visible as ``serving_default``.

Choices:

- Mixed-precision models (``mixed_float16`` / ``mixed_bfloat16`` policies) are rebuilt
  with a float32 policy and the same weights before the SavedModel and TFLite are
  written, so both take and return float32 and TFLite sees no float16 arithmetic. The
  ``.keras`` file keeps the model as trained. Parity is measured against the float32
  rebuild; its distance to the mixed-precision model is recorded separately.
- TFLite files are converted, run and inspected by ``kfundus.deploy.tflite`` (a fresh Python
  process per conversion; builtin ops only).
- Parity: the SavedModel and float32 TFLite must match Keras within ``atol``; the
  quantized variants are not expected to, so their distance is recorded, and their
  accuracy is measured where labels exist (``kfundus.deploy.bundle``: AUROC on validation).
"""

from __future__ import annotations

import datetime
import json
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from kfundus.deploy.signatures import SIGNATURE_KEY, TENSOR_SIGNATURE_KEY, named_inputs
from kfundus.deploy.tflite import (
    OPS_DOC,
    QUANTIZATIONS,
    TFLITE_FILES,
    check_quantization,
    convert_tflite,
    run_tflite,
    tflite_ops,
)
from kfundus.errors import ConfigError, ExportError

FORMATS = ("keras", "saved_model", "tflite")
CALIBRATION_SAMPLES = 128
PARITY_ATOL = 1e-4


# ---------------------------------------------------------------------------
# Names and signatures


def io_names(model) -> tuple[list[str], list[str]]:
    """Input and output names of a functional model, as its signatures carry them.

    Dict inputs/outputs are named by their keys; otherwise inputs by their
    ``keras.Input(name=...)`` and outputs by the layer that produced them.
    """
    mapping = isinstance(model.input, Mapping)
    inputs = list(model.input) if mapping else [t.name for t in keras.tree.flatten(model.input)]
    outputs = list(model.output) if isinstance(model.output, Mapping) else list(model.output_names)
    for kind, names in (("input", inputs), ("output", outputs)):
        if len(set(names)) != len(names):
            raise ExportError(
                f"Model {model.name!r} has duplicate {kind} names {names}; give every "
                f"keras.Input and output layer a unique name=... before exporting."
            )
    return inputs, outputs


def _named_tensors(struct, names: list[str]) -> list:
    """The symbolic tensors of ``model.input`` / ``model.output`` in ``names`` order."""
    if isinstance(struct, Mapping):
        return [struct[name] for name in names]
    return keras.tree.flatten(struct)


def _input_specs(model) -> dict[str, tf.TensorSpec]:
    """Serving specs: batch dimension free, floating inputs as float32."""
    names, _ = io_names(model)
    specs = {}
    for name, tensor in zip(names, _named_tensors(model.input, names)):
        dtype = tf.dtypes.as_dtype(tensor.dtype)
        dtype = tf.float32 if dtype.is_floating else dtype
        specs[name] = tf.TensorSpec((None, *tensor.shape[1:]), dtype, name=name)
    return specs


def _serving_fn(model):
    """``fn(inputs: dict) -> dict`` calling ``model`` in inference mode, float32 out."""
    in_names, out_names = io_names(model)

    def serve(inputs):
        if isinstance(model.input, Mapping):
            args = {name: inputs[name] for name in in_names}
        else:
            args = keras.tree.pack_sequence_as(model.input, [inputs[n] for n in in_names])
        outputs = model(args, training=False)
        return {
            name: tf.cast(t, tf.float32) if t.dtype.is_floating else t
            for name, t in zip(out_names, _named_tensors(outputs, out_names))
        }

    return serve


def float32_model(model):
    """``model`` itself, or a float32-policy rebuild with the same weights if it is mixed.

    The rebuild goes through the model's config, so custom layers must be registered
    with ``keras.saving.register_keras_serializable`` and forward ``**kwargs``.
    """
    config = keras.saving.serialize_keras_object(model)
    float32_config = _strip_mixed(config)
    if float32_config == config:
        return model
    try:
        clone = keras.saving.deserialize_keras_object(float32_config)
        clone.set_weights(model.get_weights())
    except Exception as err:
        raise ExportError(
            f"Could not rebuild mixed-precision model {model.name!r} in float32 for export "
            f"({type(err).__name__}: {err}). Register its custom layers with "
            f"@keras.saving.register_keras_serializable(package='kfundus') and make them "
            f"forward **kwargs, or rebuild the model under the float32 policy and load "
            f"its weights before exporting."
        ) from err
    return clone


def _strip_mixed(obj):
    """Replace every mixed dtype policy in a serialized Keras config by ``"float32"``."""
    if isinstance(obj, list):
        return [_strip_mixed(value) for value in obj]
    if not isinstance(obj, dict):
        return obj
    if str(obj.get("class_name", "")).endswith("DTypePolicy"):
        return "float32" if str(obj["config"].get("name")).startswith("mixed_") else obj
    mixed = lambda k, v: k == "dtype" and isinstance(v, str) and v.startswith("mixed_")
    return {k: "float32" if mixed(k, v) else _strip_mixed(v) for k, v in obj.items()}


# ---------------------------------------------------------------------------
# SavedModel


def image_input_size(model) -> int | None:
    """The side of the model's square RGB image inputs, or None if any input is not one."""
    sizes = set()
    for spec in _input_specs(model).values():
        shape = spec.shape.as_list()
        if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or shape[1] is None or not spec.dtype.is_floating:
            return None
        sizes.add(shape[1])
    return sizes.pop() if len(sizes) == 1 else None


def _label_outputs(labels, out_names) -> dict[str, list[str]]:
    """``{"labels": names}`` or ``{"labels_<output>": names}`` per labelled output."""
    if labels is None:
        return {}
    if isinstance(labels, Mapping):
        return {f"labels_{k}": [str(n) for n in v] for k, v in labels.items() if k in out_names}
    return {"labels": [str(n) for n in labels]}


def _bytes_serving_fn(model, preprocess, labels=None):
    """``fn({"<input>_bytes": string batch}) -> outputs + label names``: the training
    pipeline's preprocessing inside the graph (see the module docstring)."""
    from kfundus.data.images import encoded_image_problem, preprocess_image

    in_names, out_names = io_names(model)
    tensor_fn = _serving_fn(model)
    size = preprocess.image_size
    label_outputs = _label_outputs(labels, out_names)

    def one(name):
        def run(item):
            contents, index = item
            # a bad element fails the request with a message that names it: "image_bytes[3]: ..."
            problem = encoded_image_problem(contents)
            where = tf.strings.join([f"{name}_bytes[", tf.strings.as_string(index), "]: ", problem])
            with tf.control_dependencies([tf.debugging.Assert(tf.equal(problem, ""), [where])]):
                contents = tf.identity(contents)
            # the training cache stores round(preprocess_image(...)) as uint8: the same values
            return tf.round(preprocess_image(contents, preprocess))

        return run

    def serve(inputs):
        images = {}
        for name in in_names:
            batch = inputs[f"{name}_bytes"]
            images[name] = tf.map_fn(
                one(name),
                (batch, tf.range(tf.shape(batch)[0])),
                fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32),
            )
        outputs = dict(tensor_fn(images))
        batch = tf.shape(images[in_names[0]])[0]
        for key, names in label_outputs.items():
            outputs[key] = tf.tile(tf.constant(names)[None, :], [batch, 1])
        return outputs

    specs = {f"{n}_bytes": tf.TensorSpec((None,), tf.string, name=f"{n}_bytes") for n in in_names}
    return serve, specs


def export_saved_model(model, path, *, preprocess=None, labels=None) -> Path:
    """Write ``model`` as a SavedModel with the signatures of the module docstring.

    Args:
        model: a built functional Keras model (float32; see ``float32_model``).
        path: the SavedModel folder to write (replaced if it exists).
        preprocess: the ``kfundus.data.images.Preprocess`` the model was trained with,
            used by the bytes signature. None: ``Preprocess(image_size=<input side>)``
            (fundus crop on). Its image size must equal the model's input side.
        labels: label names returned by the bytes signature (a list, or
            ``{output: [names]}``); None: no label output.
    """
    from kfundus.data.images import Preprocess

    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    # No archive.track(model): it walks every layer for lookup tables, which image
    # models have none of, and doubles the export time; add_endpoint tracks variables.
    archive = keras.export.ExportArchive()
    size = image_input_size(model)
    if size is not None:
        preprocess = preprocess or Preprocess(image_size=size)
        if preprocess.image_size != size:
            raise ExportError(
                f"preprocess.image_size={preprocess.image_size} but model {model.name!r} takes "
                f"{size}x{size} images; export with the Preprocess the model was trained with."
            )
        serve_bytes, byte_specs = _bytes_serving_fn(model, preprocess, labels)
        archive.add_endpoint(SIGNATURE_KEY, serve_bytes, input_signature=[byte_specs])
    archive.add_endpoint(TENSOR_SIGNATURE_KEY, _serving_fn(model), input_signature=[_input_specs(model)])
    # Serving needs no gradients: skipping custom-gradient tracing saves seconds.
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    archive.write_out(str(path), options=options, verbose=False)
    return path


def run_saved_model(path, inputs, signature: str = TENSOR_SIGNATURE_KEY) -> dict[str, np.ndarray]:
    """Run a signature of a SavedModel on numpy inputs.

    Args:
        path: SavedModel folder.
        inputs: ``{input_name: array}``, or one array for a single-input model. For the
            bytes signature (``signature="serving_default"``), lists of encoded files.
        signature: ``"serving_preprocessed"`` (float32 images, the default; a SavedModel
            without it falls back to ``serving_default``) or ``"serving_default"``.

    Returns: ``{output_name: array}``.
    """
    signatures = tf.saved_model.load(str(path)).signatures
    if signature not in signatures:
        if signature != TENSOR_SIGNATURE_KEY:
            raise ExportError(f"{path} has signatures {sorted(signatures)}, not {signature!r}.")
        signature = SIGNATURE_KEY
    fn = signatures[signature]
    specs = fn.structured_input_signature[1]
    feed = named_inputs(inputs, list(specs), source=path)
    outputs = fn(**{k: tf.constant(v, dtype=specs[k].dtype) for k, v in feed.items()})
    return {name: value.numpy() for name, value in outputs.items()}


def export_bundle(
    model,
    out_dir,
    *,
    labels,
    formats=FORMATS,
    metadata=None,
    check=True,
    atol=PARITY_ATOL,
    sample_inputs=None,
    preprocess=None,
    tflite_variants=("float32",),
    calibration=None,
) -> dict[str, Path]:
    """Export ``model`` into a bundle folder and check the exports reproduce it.

    Args:
        model: a built functional Keras model with named inputs and outputs.
        out_dir: the bundle folder (created; files of the same name are replaced).
        labels: the class names of the output units, in order: a list (written to
            ``labels.txt``; at least one output must have that many units) or, for
            multi-task models, ``{output_name: [names]}`` (written to
            ``labels_<output>.txt``).
        formats: any of ``"keras"``, ``"saved_model"``, ``"tflite"``. TFLite is converted
            from a SavedModel (a temporary one if ``"saved_model"`` is not requested).
        metadata: JSON-serialisable dict merged into ``model_card.json`` at the top level
            (thresholds, preprocessing, metrics, data summary, ...); its keys must not
            clash with the card's own.
        check: run sample images through Keras and each export, record the max absolute
            differences in ``model_card.json``, and raise if the SavedModel or float32
            TFLite output differs from Keras by more than ``atol`` or a TFLite file uses
            Flex ops. Quantized variants are recorded, not checked.
        atol: parity tolerance on every output.
        sample_inputs: ``{input name: float32 array}`` of real preprocessed images for the
            parity check, instead of 3 random ones (uniform in [0, 255], fixed seed; random
            images push a trained model's sigmoid outputs to 0 or 1, where differences vanish).
        preprocess: the ``Preprocess`` the model was trained with, for the SavedModel's
            bytes signature (default: fundus crop at the model's input size).
        tflite_variants: which TFLite files to write, of ``QUANTIZATIONS`` (file names in
            ``TFLITE_FILES``).
        calibration: ``{input name: float32 images}`` from the training data, needed for
            the ``"int8"`` variant (see ``convert_tflite``).

    Returns: the files written: ``{"keras", "saved_model", "tflite" (float32),
        "tflite_<variant>", "labels" (or "labels_<output>"), "model_card"} -> Path``.

    Raises:
        ExportError: bad labels or names, Flex ops, failed conversion or failed parity
            (``model_card.json`` is written first in the last case, to inspect).
        ConfigError: unknown formats or variants, int8 without calibration.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ConfigError(f"Unknown export formats {sorted(unknown)}; choose from {FORMATS}.")
    variants = list(dict.fromkeys(tflite_variants)) if "tflite" in formats else []
    if "tflite" in formats and not variants:
        raise ConfigError(f"'tflite' is in formats but tflite_variants is empty; choose from {QUANTIZATIONS}.")
    for variant in variants:
        check_quantization(variant, calibration)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    served = float32_model(model)
    _, out_names = io_names(served)
    specs = _input_specs(served)
    out_shapes = {n: t.shape for n, t in zip(out_names, _named_tensors(served.output, out_names))}
    paths = _write_labels(out_dir, labels, out_shapes)

    if "keras" in formats:
        paths["keras"] = out_dir / "model.keras"
        model.save(paths["keras"])
    with tempfile.TemporaryDirectory() as tmp:
        saved = out_dir / "saved_model" if "saved_model" in formats else Path(tmp) / "sm"
        if "saved_model" in formats or variants:
            export_saved_model(served, saved, preprocess=preprocess, labels=labels)
        if "saved_model" in formats:
            paths["saved_model"] = saved
        for variant in variants:
            paths[_tflite_key(variant)] = convert_tflite(
                saved, out_dir / TFLITE_FILES[variant], quantization=variant, calibration=calibration
            )
        report = _report(
            model, served, specs, out_shapes, labels, metadata, paths, variants, saved if saved.exists() else None
        )
        problems = []
        if check:
            report["parity"], problems = _parity(
                model, served, specs, saved if saved.exists() else None, paths, variants, atol, sample_inputs
            )
    paths["model_card"] = out_dir / "model_card.json"
    paths["model_card"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    flex = {v: info["flex_ops"] for v, info in report.get("tflite", {}).items() if info["flex_ops"]}
    if check and flex:
        problems.append(
            f"TFLite files use TF Select (Flex) ops {flex}; rewrite the layers that need "
            f"them with builtin ops (see {OPS_DOC})."
        )
    if problems:
        raise ExportError(
            f"Export to {out_dir} does not reproduce model {model.name!r}: "
            f"{' '.join(problems)} Details in {paths['model_card']}."
        )
    return paths


def _tflite_key(variant: str) -> str:
    return "tflite" if variant == "float32" else f"tflite_{variant}"


def _write_labels(out_dir: Path, labels, out_shapes: dict) -> dict[str, Path]:
    """Write labels.txt (or labels_<output>.txt per output) after checking the widths."""
    widths = {name: shape[-1] for name, shape in out_shapes.items()}
    per_output = dict(labels) if isinstance(labels, Mapping) else {None: labels}
    paths = {}
    for output, names in per_output.items():
        names = [str(n) for n in names]
        fits = widths.get(output) == len(names) if output else len(names) in widths.values()
        if not fits:
            raise ExportError(
                f"{len(names)} labels given for output {output or 'any'!r}, but the output "
                f"widths are {widths}; pass one label per output unit, in order (a dict "
                f"keyed by output name for multi-task models)."
            )
        key = f"labels_{output}" if output else "labels"
        paths[key] = out_dir / f"{key}.txt"
        paths[key].write_text("".join(f"{n}\n" for n in names))
    return paths


def _report(model, served, specs, out_shapes, labels, metadata, paths, variants, saved) -> dict:
    import kfundus

    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_name": model.name,
        "formats": {k: Path(v).name for k, v in paths.items() if k in FORMATS or k.startswith("tflite")},
        "inputs": [{"name": n, "shape": list(s.shape), "dtype": s.dtype.name} for n, s in specs.items()],
        "outputs": [{"name": n, "shape": list(s), "dtype": "float32"} for n, s in out_shapes.items()],
        "labels": dict(labels) if isinstance(labels, Mapping) else list(labels),
        "mixed_precision": served is not model,
        "versions": {
            "kfundus": kfundus.__version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": sys.version.split()[0],
        },
    }
    if saved is not None:
        loaded = tf.saved_model.load(str(saved)).signatures
        report["signatures"] = {
            key: {
                "inputs": {
                    k: f"{v.dtype.name}{v.shape.as_list()}" for k, v in fn.structured_input_signature[1].items()
                },
                "outputs": sorted(fn.structured_outputs),
            }
            for key, fn in loaded.items()
        }
    if variants:
        float32_size = paths["tflite"].stat().st_size if "tflite" in paths else None
        report["tflite"] = {}
        for variant in variants:
            path = paths[_tflite_key(variant)]
            ops = tflite_ops(path)
            report["tflite"][variant] = {
                "file": path.name,
                "size_bytes": path.stat().st_size,
                "size_vs_float32": round(path.stat().st_size / float32_size, 4) if float32_size else None,
                "ops": ops,
                "flex_ops": [op for op in ops if op.startswith("Flex")],
            }
    clash = sorted(set(metadata or {}) & set(report))
    if clash:
        raise ExportError(f"metadata keys {clash} clash with the model card's own; rename them.")
    report.update(metadata or {})
    return report


def example_inputs(specs: Mapping[str, tf.TensorSpec], batch=3, seed=0) -> dict[str, np.ndarray]:
    """Random float32 images in [0, 255] matching ``specs`` (fixed seed)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, spec in specs.items():
        shape = spec.shape.as_list()[1:]
        if any(d is None for d in shape):
            raise ExportError(
                f"Input {name!r} has shape {spec.shape} with unknown dimensions; build the "
                f"model with a fixed size, e.g. keras.Input((224, 224, 3), name={name!r})."
            )
        inputs[name] = rng.uniform(0, 255, (batch, *shape)).astype(spec.dtype.as_numpy_dtype)
    return inputs


def _parity(model, served, specs, saved, paths, variants, atol, sample_inputs=None) -> tuple[dict, list[str]]:
    """Max |export - Keras| per output on sample (or random) images, and what exceeds ``atol``
    (the SavedModel and float32 TFLite; quantized variants are only recorded)."""
    inputs = (
        example_inputs(specs)
        if sample_inputs is None
        else {k: np.asarray(v, dtype="float32") for k, v in sample_inputs.items()}
    )
    tensors = {k: tf.constant(v) for k, v in inputs.items()}
    reference = {k: np.asarray(v) for k, v in _serving_fn(served)(tensors).items()}
    parity = {
        "num_samples": int(len(next(iter(inputs.values())))),
        "atol": atol,
        "reference": "keras",
        "inputs": "random uniform [0, 255]" if sample_inputs is None else "sample images",
    }
    problems = []
    if served is not model:
        trained = {k: np.asarray(v) for k, v in _serving_fn(model)(tensors).items()}
        parity["keras_mixed_vs_float32_max_abs_diff"] = _max_diff(trained, reference)
    runs = {}
    if saved is not None:
        runs["saved_model"] = lambda: run_saved_model(saved, inputs)
    for variant in variants:
        runs[_tflite_key(variant)] = lambda p=paths[_tflite_key(variant)]: run_tflite(p, inputs)
    for fmt, run in runs.items():
        diff = _max_diff(run(), reference)
        parity[f"{fmt}_max_abs_diff"] = diff
        worst = max(diff.values())
        if fmt in ("saved_model", "tflite") and not worst <= atol:  # also catches NaN
            problems.append(f"{fmt} differs from Keras by up to {worst:.3g} (> {atol:g}).")
    return parity, problems


def _max_diff(got: Mapping, want: Mapping) -> dict[str, float]:
    if set(got) != set(want):
        raise ExportError(f"Export outputs {sorted(got)} do not match Keras {sorted(want)}.")
    return {k: float(np.max(np.abs(got[k].astype("float64") - want[k]))) for k in want}
