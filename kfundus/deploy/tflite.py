"""TFLite files of a kfundus SavedModel: conversion (float32, float16, dynamic-range int8,
full int8), running them, and what ops they use.

- Conversion runs in a fresh Python process per file (``kfundus.cli.tflite_worker``): the
  converter does not free its memory, and a long session that converts many models would
  grow without bound. The ``serving_preprocessed`` signature
  (float32 images) is converted; the file's signature is ``serving_default``.
- Only builtin TFLite ops are allowed: a model that needs TF Select (Flex) ops would need
  the large Flex delegate on every device, so conversion stops and names the ops.
- Full int8 takes uint8 pixels (scale 1, zero point 0 for [0, 255]) and returns float32.

``kfundus.deploy.saved_model.export_bundle`` writes a bundle's TFLite files with these
functions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tensorflow as tf

from kfundus.deploy.signatures import SIGNATURE_KEY, TENSOR_SIGNATURE_KEY, named_inputs
from kfundus.errors import ConfigError, ExportError

QUANTIZATIONS = ("float32", "float16", "dynamic_int8", "int8")
TFLITE_FILES = {
    "float32": "model.tflite",
    "float16": "model_float16.tflite",
    "dynamic_int8": "model_dynamic_int8.tflite",
    "int8": "model_int8.tflite",
}
ERROR_TAG = "KFUNDUS_EXPORT_ERROR "
OPS_DOC = "https://ai.google.dev/edge/litert/models/ops_compatibility"


def convert_tflite(saved_model_dir, out_path, *, quantization="float32", calibration=None, timeout=1800) -> Path:
    """Convert a SavedModel to TFLite in a fresh Python process (builtin ops only).

    Runs ``python -m kfundus.cli.tflite_worker SAVED_MODEL OUT Q [CALIBRATION]``: the TFLite
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
    check_quantization(quantization, calibration)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[2])  # kfundus importable without install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.getenv("PYTHONPATH"))))}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "kfundus.cli.tflite_worker", str(saved_model_dir), str(out_path), quantization]
        if quantization == "int8":
            samples = calibration if isinstance(calibration, Mapping) else {"": calibration}
            np.savez(Path(tmp) / "calibration.npz", **{k: np.asarray(v, "float32") for k, v in samples.items()})
            command.append(str(Path(tmp) / "calibration.npz"))
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise ExportError(
                f"TFLite conversion of {saved_model_dir} took over {timeout} s and was stopped; "
                f"pass a larger timeout= to convert_tflite."
            ) from err
    if proc.returncode != 0:
        for line in proc.stderr.splitlines():
            if line.startswith(ERROR_TAG):
                raise ExportError(json.loads(line[len(ERROR_TAG) :])["message"])
        raise ExportError(
            f"TFLite conversion of {saved_model_dir} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return out_path


def check_quantization(quantization: str, calibration=None) -> None:
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"Unknown TFLite quantization {quantization!r}; choose one of {QUANTIZATIONS}.")
    if quantization == "int8" and (calibration is None or len(calibration) == 0):
        raise ConfigError(
            "TFLite quantization 'int8' (full integer) needs calibration images: pass "
            "calibration={input_name: preprocessed training images} (kfundus export does, "
            "from the run's training split), or use 'float16' or 'dynamic_int8'."
        )


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
                yield {name: values[i : i + 1] for name, values in calibration.items()}

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8  # pixels: scale 1, zero point 0 for [0, 255]
        converter.inference_output_type = tf.float32


def convert_here(saved_model_dir, out_path, quantization: str, calibration_file=None) -> Path:
    """The conversion itself; runs inside the subprocess started by convert_tflite."""
    calibration = None
    if calibration_file:
        with np.load(calibration_file) as data:
            calibration = {k: data[k] for k in data.files}
    check_quantization(quantization, calibration)
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
    except Exception as err:
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
        f"layers that use them with ops TFLite supports (see {OPS_DOC}), or leave "
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


def make_interpreter(path, num_threads: int):
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
    interpreter = make_interpreter(path, num_threads)
    signatures = interpreter.get_signature_list()
    if signatures:
        key = SIGNATURE_KEY if SIGNATURE_KEY in signatures else next(iter(signatures))
        runner = interpreter.get_signature_runner(key)
        details = runner.get_input_details()
        feed = named_inputs(inputs, list(signatures[key]["inputs"]), source=path)
        feed = {k: quantize(v, details[k]) for k, v in feed.items()}
        out_details = runner.get_output_details()
        return {name: dequantize(value, out_details[name]) for name, value in runner(**feed).items()}
    details = {_tensor_name(d["name"]): d for d in interpreter.get_input_details()}
    feed = named_inputs(inputs, list(details), source=path)
    for name, value in feed.items():
        interpreter.resize_tensor_input(details[name]["index"], value.shape)
    interpreter.allocate_tensors()
    for name, value in feed.items():
        interpreter.set_tensor(details[name]["index"], quantize(value, details[name]))
    interpreter.invoke()
    return {
        _tensor_name(d["name"]): dequantize(interpreter.get_tensor(d["index"]), d)
        for d in interpreter.get_output_details()
    }


def quantize(value: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if dtype.kind in "iu" and scale and np.asarray(value).dtype.kind == "f":
        info = np.iinfo(dtype)
        value = np.clip(np.round(value / scale + zero_point), info.min, info.max)
    return np.asarray(value).astype(dtype, copy=False)


def dequantize(value, detail: dict) -> np.ndarray:
    value = np.array(value)
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if value.dtype.kind in "iu" and scale:
        return ((value.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return value


def _tensor_name(name: str) -> str:
    return name.removeprefix(f"{SIGNATURE_KEY}_").removesuffix(":0")
