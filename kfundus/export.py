"""Export a trained Keras model as a bundle: ``.keras``, SavedModel and TFLite.

A bundle is one folder a deployment can pick up whole::

    out_dir/
      model.keras       the Keras model as trained (custom layers need kfundus importable)
      saved_model/      standalone TF SavedModel, signature ``serving_default``
      model.tflite      float32 TFLite (builtin ops only), signature ``serving_default``
      labels.txt        one label per line, in the order of the output units
      export.json       formats, input/output names and shapes, TFLite ops, parity errors,
                        TensorFlow / Keras versions and the caller's metadata

Signatures carry the Keras names (inputs ``left_image``/``right_image``, output
``probabilities`` -> ``fn(left_image=..., right_image=...) -> {"probabilities": ...}``) in
the SavedModel and the TFLite signature runner alike. Inputs: float32 RGB in [0, 255].

Choices:

- Mixed-precision models (``mixed_float16`` / ``mixed_bfloat16`` policies) are rebuilt
  with a float32 policy and the same weights before the SavedModel and TFLite are
  written, so both take and return float32 and TFLite sees no float16 arithmetic. The
  ``.keras`` file keeps the model as trained. Parity is measured against the float32
  rebuild; its distance to the mixed-precision model is recorded separately.
- TFLite conversion runs in a fresh Python process per model
  (``python -m kfundus.export tflite SAVED_MODEL OUT``): the converter does not free its
  memory, and a long session that converts many models would grow without bound.
- Only builtin TFLite ops are allowed. A model that needs TF Select (Flex) ops would need
  the large Flex delegate on every device, so conversion stops and names the ops.
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
SIGNATURE_KEY = "serving_default"
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


def export_saved_model(model, path) -> Path:
    """Write ``model`` as a SavedModel whose ``serving_default`` signature uses its names.

    Args:
        model: a built functional Keras model (float32; see ``float32_model``).
        path: the SavedModel folder to write (replaced if it exists).
    """
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    # No archive.track(model): it walks every layer for lookup tables, which image
    # models have none of, and doubles the export time; add_endpoint tracks variables.
    archive = keras.export.ExportArchive()
    archive.add_endpoint("serve", _serving_fn(model), input_signature=[_input_specs(model)])
    # Serving needs no gradients: skipping custom-gradient tracing saves seconds.
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    archive.write_out(str(path), options=options, verbose=False)
    return path


def run_saved_model(path, inputs) -> dict[str, np.ndarray]:
    """Run the ``serving_default`` signature of a SavedModel on numpy inputs.

    Args:
        path: SavedModel folder.
        inputs: ``{input_name: array}``, or one array for a single-input model.

    Returns: ``{output_name: array}``.
    """
    signature = tf.saved_model.load(str(path)).signatures[SIGNATURE_KEY]
    specs = signature.structured_input_signature[1]
    feed = _named_inputs(inputs, list(specs), source=path)
    outputs = signature(**{k: tf.constant(v, dtype=specs[k].dtype) for k, v in feed.items()})
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
    return {name: np.asarray(inputs[name]) for name in names}


# ---------------------------------------------------------------------------
# TFLite


def convert_tflite(saved_model_dir, out_path, *, quantization="float32", timeout=1800) -> Path:
    """Convert a SavedModel to TFLite in a fresh Python process (builtin ops only).

    Runs ``python -m kfundus.export tflite SAVED_MODEL OUT --quantization Q``: the TFLite
    converter keeps its memory until the process ends.

    Args:
        saved_model_dir: SavedModel folder with a ``serving_default`` signature.
        out_path: the ``.tflite`` file to write.
        quantization: ``"float32"`` (no quantization), ``"float16"`` (float16 weights,
            float32 arithmetic and I/O) or ``"dynamic_int8"`` (int8 weights, activations
            quantized on the fly, float32 I/O). ``"int8"`` (full integer, needs a
            representative dataset) is reserved and not implemented yet.
        timeout: seconds before the conversion process is stopped.

    Returns: ``out_path`` as a ``Path``.

    Raises:
        ExportError: the model needs TF Select (Flex) ops, or conversion failed.
        ConfigError: unknown or unsupported ``quantization``.
    """
    _check_quantization(quantization)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[1])  # kfundus importable without install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.getenv("PYTHONPATH"))))}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, "-m", "kfundus.export", "tflite", str(saved_model_dir),
               str(out_path), "--quantization", quantization]
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


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ConfigError(
            f"Unknown TFLite quantization {quantization!r}; choose one of {QUANTIZATIONS}."
        )
    if quantization == "int8":
        raise ConfigError("TFLite quantization 'int8' (full integer) needs a representative "
                          "dataset and is not implemented yet; use 'float16' or 'dynamic_int8'.")


def _configure_quantization(converter, quantization: str, representative_dataset=None) -> None:
    """Set converter options for ``quantization``.

    The hook for full-integer int8: it will set ``converter.representative_dataset``
    from ``representative_dataset`` (a generator of input dicts) and the int8 op set.
    """
    del representative_dataset  # used by full int8, not implemented yet
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "dynamic_int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]


def _convert_here(saved_model_dir, out_path, quantization: str) -> Path:
    """The conversion itself; runs inside the subprocess started by convert_tflite."""
    _check_quantization(quantization)
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model_dir), signature_keys=[SIGNATURE_KEY]
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    _configure_quantization(converter, quantization)
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
    the converter's ``serving_default_`` prefix and ``:0`` suffix removed.

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
        feed = {k: v.astype(details[k]["dtype"], copy=False) for k, v in feed.items()}
        return {name: np.array(value) for name, value in runner(**feed).items()}
    details = {_tensor_name(d["name"]): d for d in interpreter.get_input_details()}
    feed = _named_inputs(inputs, list(details), source=path)
    for name, value in feed.items():
        interpreter.resize_tensor_input(details[name]["index"], value.shape)
    interpreter.allocate_tensors()
    for name, value in feed.items():
        interpreter.set_tensor(details[name]["index"], value.astype(details[name]["dtype"]))
    interpreter.invoke()
    return {
        _tensor_name(d["name"]): interpreter.get_tensor(d["index"])
        for d in interpreter.get_output_details()
    }


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
        metadata: JSON-serialisable dict stored under ``"metadata"`` in ``export.json``
            (dataset, config, metrics, image size, ...).
        check: run 3 random images (uniform in [0, 255], fixed seed) through Keras and
            each export, record the max absolute differences in ``export.json``, and
            raise if the SavedModel or TFLite output differs from Keras by more than
            ``atol`` or the TFLite file uses Flex ops.
        atol: parity tolerance on every output.
        sample_inputs: ``{input name: float32 array}`` of real preprocessed images for the
            parity check, instead of random ones (random images push a trained model's
            sigmoid outputs to 0 or 1, where differences vanish).

    Returns: the files written: ``{"keras", "saved_model", "tflite", "labels" (or
        "labels_<output>"), "export_json"} -> Path``.

    Raises:
        ExportError: bad labels or names, Flex ops, failed conversion or failed parity
            (``export.json`` is written first in the last case, to inspect).
    """
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ConfigError(f"Unknown export formats {sorted(unknown)}; choose from {FORMATS}.")
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
        if "saved_model" in formats or "tflite" in formats:
            export_saved_model(served, saved)
        if "saved_model" in formats:
            paths["saved_model"] = saved
        if "tflite" in formats:
            paths["tflite"] = convert_tflite(saved, out_dir / "model.tflite")
        report = _report(model, served, specs, out_shapes, labels, metadata, paths)
        problems = []
        if check:
            saved = saved if saved.exists() else None
            report["parity"], problems = _parity(model, served, specs, saved, paths, atol, sample_inputs)
    paths["export_json"] = out_dir / "export.json"
    paths["export_json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    if "tflite" in paths and check and report["tflite"]["flex_ops"]:
        problems.append(f"{paths['tflite']} uses TF Select (Flex) ops {report['tflite']['flex_ops']}; "
                        f"rewrite the layers that need them with builtin ops (see {_OPS_DOC}).")
    if problems:
        raise ExportError(f"Export to {out_dir} does not reproduce model {model.name!r}: "
                          f"{' '.join(problems)} Details in {paths['export_json']}.")
    return paths


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


def _report(model, served, specs, out_shapes, labels, metadata, paths) -> dict:
    import kfundus

    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_name": model.name,
        "formats": {k: Path(v).name for k, v in paths.items() if k in FORMATS},
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
        "metadata": dict(metadata or {}),
    }
    if "tflite" in paths:
        ops = tflite_ops(paths["tflite"])
        report["tflite"] = {
            "quantization": "float32",
            "ops": ops,
            "flex_ops": [op for op in ops if op.startswith("Flex")],
            "size_bytes": paths["tflite"].stat().st_size,
        }
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


def _parity(model, served, specs, saved, paths, atol, sample_inputs=None) -> tuple[dict, list[str]]:
    """Max |export - Keras| per output on sample (or random) images, and what exceeds ``atol``."""
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
    if "tflite" in paths:
        runs["tflite"] = lambda: run_tflite(paths["tflite"], inputs)
    for fmt, run in runs.items():
        diff = _max_diff(run(), reference)
        parity[f"{fmt}_max_abs_diff"] = diff
        worst = max(diff.values())
        if not worst <= atol:  # also catches NaN
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
    args = parser.parse_args(argv)
    try:
        out = _convert_here(args.saved_model, args.out, args.quantization)
    except KfundusError as err:
        print(_ERROR_TAG + json.dumps({"message": str(err)}), file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
