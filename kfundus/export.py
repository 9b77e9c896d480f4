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
  ``kfundus.data.pipeline.preprocess_image`` (DCT-reduced decode, fundus crop, pad,
  resize) and the same rounding to 8 bits the training cache applies, so a served file
  meets the model exactly as in training. Returns every named model output and the
  label names (``labels``, or ``labels_<output>`` for multi-task models), one row per image.
  A file that does not decode fails the request (TensorFlow cannot skip one item of a
  batch); ``kfundus predict`` finds and reports such files instead.
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
- TFLite conversion runs in a fresh Python process per file
  (``python -m kfundus.export tflite SAVED_MODEL OUT``): the converter does not free its
  memory, and a long session that converts many models would grow without bound.
- Only builtin TFLite ops are allowed. A model that needs TF Select (Flex) ops would need
  the large Flex delegate on every device, so conversion stops and names the ops.
- Parity: the SavedModel and float32 TFLite must match Keras within ``atol``; the
  quantized variants are not expected to, so their distance is recorded, and their
  accuracy is measured where labels exist (``kfundus.bundle``: AUROC on validation).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from kfundus.errors import ConfigError, ExportError, KfundusError

FORMATS = ("keras", "saved_model", "tflite")
QUANTIZATIONS = ("float32", "float16", "dynamic_int8", "int8")
TFLITE_FILES = {"float32": "model.tflite", "float16": "model_float16.tflite",
                "dynamic_int8": "model_dynamic_int8.tflite", "int8": "model_int8.tflite"}
SIGNATURE_KEY = "serving_default"
TENSOR_SIGNATURE_KEY = "serving_preprocessed"
CALIBRATION_SAMPLES = 128
PARITY_ATOL = 1e-4
_ERROR_TAG = "KFUNDUS_EXPORT_ERROR "
_OPS_DOC = "https://ai.google.dev/edge/litert/models/ops_compatibility"


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
    except Exception as err:  # noqa: BLE001 - re-raised with the fix
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
    mixed = lambda k, v: k == "dtype" and isinstance(v, str) and v.startswith("mixed_")  # noqa: E731
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
    from kfundus.data.pipeline import preprocess_image

    in_names, out_names = io_names(model)
    tensor_fn = _serving_fn(model)
    size = preprocess.image_size
    label_outputs = _label_outputs(labels, out_names)

    def one(contents):
        # the training cache stores round(preprocess_image(...)) as uint8: the same values
        return tf.round(preprocess_image(contents, preprocess))

    def serve(inputs):
        images = {name: tf.map_fn(one, inputs[f"{name}_bytes"],
                                  fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32))
                  for name in in_names}
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
        preprocess: the ``kfundus.data.pipeline.Preprocess`` the model was trained with,
            used by the bytes signature. None: ``Preprocess(image_size=<input side>)``
            (fundus crop on). Its image size must equal the model's input side.
        labels: label names returned by the bytes signature (a list, or
            ``{output: [names]}``); None: no label output.
    """
    from kfundus.data.pipeline import Preprocess

    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    # No archive.track(model): it walks every layer for lookup tables, which image
    # models have none of, and doubles the export time; add_endpoint tracks variables.
    archive = keras.export.ExportArchive()
    size = image_input_size(model)
    if size is not None:
        preprocess = preprocess or Preprocess(image_size=size)
        if preprocess.image_size != size:
            raise ExportError(f"preprocess.image_size={preprocess.image_size} but model {model.name!r} takes "
                              f"{size}x{size} images; export with the Preprocess the model was trained with.")
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
    feed = _named_inputs(inputs, list(specs), source=path)
    outputs = fn(**{k: tf.constant(v, dtype=specs[k].dtype) for k, v in feed.items()})
    return {name: value.numpy() for name, value in outputs.items()}


def _named_inputs(inputs, names: list[str], source) -> dict[str, np.ndarray]:
    if not isinstance(inputs, Mapping):
        if len(names) != 1:
            raise ExportError(
                f"{source} takes {len(names)} inputs {names}; pass a dict keyed by them."
            )
        inputs = {names[0]: inputs}
    if set(inputs) != set(names):
        raise ExportError(
            f"{source} takes inputs {sorted(names)} but got {sorted(inputs)}; "
            f"pass a dict with exactly those keys."
        )
    return {name: _array(inputs[name]) for name in names}


def _array(value) -> np.ndarray:
    """numpy array of ``value``; encoded files (bytes) as an object array, since numpy's
    fixed-width bytes would drop trailing NUL bytes."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], bytes):
        return np.array(value, dtype=object)
    return np.asarray(value)


# ---------------------------------------------------------------------------
# TFLite


def convert_tflite(saved_model_dir, out_path, *, quantization="float32", calibration=None,
                   timeout=1800) -> Path:
    """Convert a SavedModel to TFLite in a fresh Python process (builtin ops only).

    Runs ``python -m kfundus.export tflite SAVED_MODEL OUT --quantization Q``: the TFLite
    converter keeps its memory until the process ends. The ``serving_preprocessed``
    signature (float32 images) is converted; the file's signature is ``serving_default``.

    Args:
        saved_model_dir: SavedModel folder written by ``export_saved_model``.
        out_path: the ``.tflite`` file to write.
        quantization: ``"float32"`` (no quantization), ``"float16"`` (float16 weights,
            float32 arithmetic and I/O), ``"dynamic_int8"`` (int8 weights, activations
            quantized on the fly, float32 I/O) or ``"int8"`` (full integer: int8 weights
            and activations with ranges calibrated on ``calibration``; uint8 pixel input,
            float32 output; runs on integer-only accelerators).
        calibration: for ``"int8"``: ``{input_name: float32 array (N, ...)}`` of real
            preprocessed training images (the representative dataset; a few hundred at
            most), or one array for a single-input model.
        timeout: seconds before the conversion process is stopped.

    Returns: ``out_path`` as a ``Path``.

    Raises:
        ExportError: the model needs TF Select (Flex) ops, or conversion failed.
        ConfigError: unknown ``quantization``, or ``"int8"`` without calibration images.
    """
    _check_quantization(quantization, calibration)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[1])  # kfundus importable without install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.getenv("PYTHONPATH"))))}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "kfundus.export", "tflite", str(saved_model_dir),
                   str(out_path), "--quantization", quantization]
        if quantization == "int8":
            samples = calibration if isinstance(calibration, Mapping) else {"": calibration}
            np.savez(Path(tmp) / "calibration.npz", **{k: np.asarray(v, "float32") for k, v in samples.items()})
            command += ["--calibration", str(Path(tmp) / "calibration.npz")]
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise ExportError(
                f"TFLite conversion of {saved_model_dir} took over {timeout} s and was stopped; "
                f"pass a larger timeout= to convert_tflite."
            ) from err
    if proc.returncode != 0:
        for line in proc.stderr.splitlines():
            if line.startswith(_ERROR_TAG):
                raise ExportError(json.loads(line[len(_ERROR_TAG):])["message"])
        raise ExportError(
            f"TFLite conversion of {saved_model_dir} failed (exit {proc.returncode}):\n"
            f"{proc.stderr[-3000:]}"
        )
    return out_path


def _check_quantization(quantization: str, calibration=None) -> None:
    if quantization not in QUANTIZATIONS:
        raise ConfigError(
            f"Unknown TFLite quantization {quantization!r}; choose one of {QUANTIZATIONS}."
        )
    if quantization == "int8" and (calibration is None or len(calibration) == 0):
        raise ConfigError("TFLite quantization 'int8' (full integer) needs calibration images: pass "
                          "calibration={input_name: preprocessed training images} (kfundus export does, "
                          "from the run's training split), or use 'float16' or 'dynamic_int8'.")


def _configure_quantization(converter, quantization: str, calibration=None) -> None:
    """Set converter options for ``quantization`` (``calibration``: {input: array} for int8)."""
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "dynamic_int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantization == "int8":
        count = len(next(iter(calibration.values())))

        def representative():
            for i in range(count):
                yield {name: values[i:i + 1] for name, values in calibration.items()}

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8  # pixels: scale 1, zero point 0 for [0, 255]
        converter.inference_output_type = tf.float32


def _convert_here(saved_model_dir, out_path, quantization: str, calibration_file=None) -> Path:
    """The conversion itself; runs inside the subprocess started by convert_tflite."""
    calibration = None
    if calibration_file:
        with np.load(calibration_file) as data:
            calibration = {k: data[k] for k in data.files}
    _check_quantization(quantization, calibration)
    loaded = tf.saved_model.load(str(saved_model_dir))
    key = TENSOR_SIGNATURE_KEY if TENSOR_SIGNATURE_KEY in loaded.signatures else SIGNATURE_KEY
    function = loaded.signatures[key]
    if calibration is not None and "" in calibration:  # one unnamed array: the single input
        (name,) = function.structured_input_signature[1]
        calibration = {name: calibration[""]}
    # from a concrete function: the file's signature is serving_default, with the input names
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], loaded)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    _configure_quantization(converter, quantization, calibration)
    try:
        flatbuffer = converter.convert()
    except Exception as err:  # noqa: BLE001 - ConverterError lives in a private module
        raise ExportError(_conversion_message(saved_model_dir, str(err))) from err
    Path(out_path).write_bytes(flatbuffer)
    return Path(out_path)


def _conversion_message(saved_model_dir, text: str) -> str:
    """A short, actionable message from the converter's MLIR error dump."""
    found = re.search(r"TF Select ops: ([^\n]+)", text)
    if not found:
        return f"TFLite conversion of {saved_model_dir} failed:\n{text[-3000:]}"
    ops = [op.strip() for op in found.group(1).split(",")]
    places = sorted(set(re.findall(r'fused\["(?:%s):", "([^"@]+)' % "|".join(ops), text)))
    where = f" (at {', '.join(places[:6])}{', ...' if len(places) > 6 else ''})" if places else ""
    return (
        f"TFLite conversion of {saved_model_dir} needs TensorFlow ops that the builtin "
        f"TFLite runtime lacks (TF Select / Flex ops): {', '.join(ops)}{where}. Rewrite the "
        f"layers that use them with ops TFLite supports (see {_OPS_DOC}), or leave "
        f"'tflite' out of formats and deploy the SavedModel."
    )


def tflite_ops(path) -> list[str]:
    """The operator codes of a ``.tflite`` flatbuffer, sorted.

    Builtin ops by their ``BuiltinOperator`` name (``CONV_2D``); custom ops by their custom
    code, so TF Select ops read ``Flex<TfOpName>`` (``FlexMatrixInverse``). Reads the
    flatbuffer directly, so it works for models no interpreter could load.
    """
    from tensorflow.lite.python import schema_py_generated as schema  # flatbuffer schema

    builtin = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAs(Path(path).read_bytes(), 0)
    names = set()
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        number = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if number == schema.BuiltinOperator.CUSTOM:
            names.add(code.CustomCode().decode())
        else:
            names.add(builtin.get(number, f"BUILTIN_{number}"))
    return sorted(names)


def has_flex_ops(path) -> bool:
    """Whether a ``.tflite`` file uses TF Select (Flex) ops."""
    return any(op.startswith("Flex") for op in tflite_ops(path))


def _interpreter(path, num_threads: int):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():  # tf.lite.Interpreter warns that LiteRT replaces it
        warnings.simplefilter("ignore")
        return Interpreter(model_path=str(path), num_threads=num_threads)


def run_tflite(path, inputs, num_threads: int = 1) -> dict[str, np.ndarray]:
    """Run a ``.tflite`` model on numpy inputs, any batch size.

    Uses ``ai_edge_litert`` when installed, else ``tf.lite.Interpreter``. Tensors are
    matched by signature name; files without signatures fall back to tensor names with
    the converter's ``serving_default_`` prefix and ``:0`` suffix removed. Integer
    (quantized) inputs are fed ``round(x / scale + zero_point)`` from float values and
    integer outputs are returned dequantized, so every variant takes and gives floats.

    Args:
        path: the ``.tflite`` file.
        inputs: ``{input_name: array}``, or one array for a single-input model.
        num_threads: interpreter threads.

    Returns: ``{output_name: array}``.
    """
    interpreter = _interpreter(path, num_threads)
    signatures = interpreter.get_signature_list()
    if signatures:
        key = SIGNATURE_KEY if SIGNATURE_KEY in signatures else next(iter(signatures))
        runner = interpreter.get_signature_runner(key)
        details = runner.get_input_details()
        feed = _named_inputs(inputs, list(signatures[key]["inputs"]), source=path)
        feed = {k: _quantize(v, details[k]) for k, v in feed.items()}
        out_details = runner.get_output_details()
        return {name: _dequantize(value, out_details[name]) for name, value in runner(**feed).items()}
    details = {_tensor_name(d["name"]): d for d in interpreter.get_input_details()}
    feed = _named_inputs(inputs, list(details), source=path)
    for name, value in feed.items():
        interpreter.resize_tensor_input(details[name]["index"], value.shape)
    interpreter.allocate_tensors()
    for name, value in feed.items():
        interpreter.set_tensor(details[name]["index"], _quantize(value, details[name]))
    interpreter.invoke()
    return {
        _tensor_name(d["name"]): _dequantize(interpreter.get_tensor(d["index"]), d)
        for d in interpreter.get_output_details()
    }


def _quantize(value: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if dtype.kind in "iu" and scale and np.asarray(value).dtype.kind == "f":
        info = np.iinfo(dtype)
        value = np.clip(np.round(value / scale + zero_point), info.min, info.max)
    return np.asarray(value).astype(dtype, copy=False)


def _dequantize(value, detail: dict) -> np.ndarray:
    value = np.array(value)
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if value.dtype.kind in "iu" and scale:
        return ((value.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return value


def _tensor_name(name: str) -> str:
    return name.removeprefix(f"{SIGNATURE_KEY}_").removesuffix(":0")


# ---------------------------------------------------------------------------
# Bundle


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
        _check_quantization(variant, calibration)
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
                saved, out_dir / TFLITE_FILES[variant], quantization=variant, calibration=calibration)
        report = _report(model, served, specs, out_shapes, labels, metadata, paths, variants,
                         saved if saved.exists() else None)
        problems = []
        if check:
            report["parity"], problems = _parity(model, served, specs, saved if saved.exists() else None,
                                                 paths, variants, atol, sample_inputs)
    paths["model_card"] = out_dir / "model_card.json"
    paths["model_card"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    flex = {v: info["flex_ops"] for v, info in report.get("tflite", {}).items() if info["flex_ops"]}
    if check and flex:
        problems.append(f"TFLite files use TF Select (Flex) ops {flex}; rewrite the layers that need "
                        f"them with builtin ops (see {_OPS_DOC}).")
    if problems:
        raise ExportError(f"Export to {out_dir} does not reproduce model {model.name!r}: "
                          f"{' '.join(problems)} Details in {paths['model_card']}.")
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
        "inputs": [
            {"name": n, "shape": list(s.shape), "dtype": s.dtype.name} for n, s in specs.items()
        ],
        "outputs": [{"name": n, "shape": list(s), "dtype": "float32"}
                    for n, s in out_shapes.items()],
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
            key: {"inputs": {k: f"{v.dtype.name}{v.shape.as_list()}" for k, v in fn.structured_input_signature[1].items()},
                  "outputs": sorted(fn.structured_outputs)}
            for key, fn in loaded.items()}
    if variants:
        float32_size = paths["tflite"].stat().st_size if "tflite" in paths else None
        report["tflite"] = {}
        for variant in variants:
            path = paths[_tflite_key(variant)]
            ops = tflite_ops(path)
            report["tflite"][variant] = {
                "file": path.name, "size_bytes": path.stat().st_size,
                "size_vs_float32": round(path.stat().st_size / float32_size, 4) if float32_size else None,
                "ops": ops, "flex_ops": [op for op in ops if op.startswith("Flex")]}
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
    inputs = example_inputs(specs) if sample_inputs is None else {
        k: np.asarray(v, dtype="float32") for k, v in sample_inputs.items()}
    tensors = {k: tf.constant(v) for k, v in inputs.items()}
    reference = {k: np.asarray(v) for k, v in _serving_fn(served)(tensors).items()}
    parity = {"num_samples": int(len(next(iter(inputs.values())))), "atol": atol, "reference": "keras",
              "inputs": "random uniform [0, 255]" if sample_inputs is None else "sample images"}
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


# ---------------------------------------------------------------------------
# Command line (the subprocess entry point)


def main(argv=None) -> int:
    """``python -m kfundus.export tflite SAVED_MODEL OUT [--quantization Q]``."""
    parser = argparse.ArgumentParser(
        prog="python -m kfundus.export", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    tflite = commands.add_parser("tflite", help="convert a SavedModel to TFLite (builtin ops)")
    tflite.add_argument("saved_model", help="SavedModel folder (signature serving_default)")
    tflite.add_argument("out", help="the .tflite file to write")
    tflite.add_argument("--quantization", default="float32", choices=QUANTIZATIONS)
    tflite.add_argument("--calibration", help=".npz of preprocessed images by input name (int8)")
    args = parser.parse_args(argv)
    try:
        out = _convert_here(args.saved_model, args.out, args.quantization, args.calibration)
    except KfundusError as err:
        print(_ERROR_TAG + json.dumps({"message": str(err)}), file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
