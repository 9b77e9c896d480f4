"""Export bundles: each format must reproduce the Keras model it came from.

References are computed here, independently of kfundus.export: Keras outputs from
``model(x)``, SavedModel outputs from ``tf.saved_model.load(...).signatures``.
TFLite conversions are subprocesses (seconds each), so the tests share a few bundles.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfundus.deploy import saved_model as export
from kfundus.deploy import tflite
from kfundus.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")

ODIR = ["N", "D", "G"]
GRADES = ["0", "1", "2", "3", "4"]


@keras.saving.register_keras_serializable(package="kfundus_tests")
class ScaleToUnit(keras.layers.Layer):
    """[0, 255] -> [-1, 1]: normalisation inside the model, as kfundus models do."""

    def call(self, x):
        return x / 127.5 - 1.0


@keras.saving.register_keras_serializable(package="kfundus_tests")
class MatrixInverse(keras.layers.Layer):
    """Needs tf.MatrixInverse, which TFLite has only as a TF Select (Flex) op."""

    def call(self, x):
        return keras.ops.linalg.inv(x)


def small_net():
    image = keras.Input((32, 32, 3), name="image")
    x = ScaleToUnit()(image)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(128, activation="relu")(x)  # >= 1024 weights: int8 quantizes it
    out = keras.layers.Dense(len(ODIR), activation="sigmoid", name="probabilities")(x)
    return keras.Model(image, out, name="small_net")


def two_eye_net():
    """Shared encoder over both eyes, two named heads (multi-task)."""
    encoder = keras.Sequential(
        [ScaleToUnit(), keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.GlobalAveragePooling2D()],
        name="encoder",
    )
    left = keras.Input((32, 32, 3), name="left_image")
    right = keras.Input((32, 32, 3), name="right_image")
    x = keras.layers.Concatenate()([encoder(left), encoder(right)])
    probs = keras.layers.Dense(len(ODIR), activation="sigmoid", name="probabilities")(x)
    grade = keras.layers.Dense(len(GRADES), activation="softmax", name="grade")(x)
    return keras.Model(
        {"left_image": left, "right_image": right}, {"probabilities": probs, "grade": grade}, name="two_eye"
    )


def images(batch, seed, names=("image",)):
    rng = np.random.default_rng(seed)
    return {n: rng.uniform(0, 255, (batch, 32, 32, 3)).astype("float32") for n in names}


def keras_outputs(model, inputs, name="probabilities"):
    x = inputs if len(inputs) > 1 else next(iter(inputs.values()))
    out = model(x, training=False)
    out = out if isinstance(out, dict) else {name: out}
    return {k: np.asarray(v, dtype="float32") for k, v in out.items()}


def saved_model_outputs(path, inputs):
    signature = tf.saved_model.load(str(path)).signatures["serving_preprocessed"]
    return {k: v.numpy() for k, v in signature(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


def assert_close(got, want, atol):
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    model = small_net()
    out = tmp_path_factory.mktemp("small")
    paths = export.export_bundle(model, out, labels=ODIR, metadata={"dataset": "synthetic"})
    return model, out, paths


def test_small_net_bundle_matches_keras(small_bundle):
    model, out, paths = small_bundle
    assert {p.name for p in out.iterdir()} >= {
        "model.keras",
        "saved_model",
        "model.tflite",
        "labels.txt",
        "model_card.json",
    }
    for batch, seed in ((1, 1), (5, 2)):  # the TFLite input is resized to each batch
        inputs = images(batch, seed)
        want = keras_outputs(model, inputs)
        assert want["probabilities"].std() > 1e-3  # not saturated: the comparison has teeth
        assert_close(tflite.run_tflite(paths["tflite"], inputs), want, atol=1e-4)
        assert_close(tflite.run_tflite(paths["tflite"], inputs["image"]), want, atol=1e-4)
        assert_close(saved_model_outputs(paths["saved_model"], inputs), want, atol=1e-5)
        assert_close(export.run_saved_model(paths["saved_model"], inputs), want, atol=1e-5)
    assert not tflite.has_flex_ops(paths["tflite"])


def test_keras_file_reloads_identically(small_bundle):
    model, _, paths = small_bundle
    reloaded = keras.saving.load_model(paths["keras"])
    x = images(4, 3)["image"]
    np.testing.assert_array_equal(np.asarray(reloaded(x)), np.asarray(model(x)))
    assert any(isinstance(layer, ScaleToUnit) for layer in reloaded.layers)


def test_labels_and_model_card(small_bundle):
    model, out, paths = small_bundle
    assert paths["labels"].read_text().splitlines() == ODIR
    report = json.loads((out / "model_card.json").read_text())
    assert report["inputs"] == [{"name": "image", "shape": [None, 32, 32, 3], "dtype": "float32"}]
    assert report["outputs"] == [{"name": "probabilities", "shape": [None, 3], "dtype": "float32"}]
    assert report["formats"] == {"keras": "model.keras", "saved_model": "saved_model", "tflite": "model.tflite"}
    assert report["signatures"]["serving_default"]["inputs"] == {"image_bytes": "string[None]"}
    assert report["signatures"]["serving_default"]["outputs"] == ["labels", "probabilities"]
    assert report["signatures"]["serving_preprocessed"]["inputs"] == {"image": "float32[None, 32, 32, 3]"}
    assert report["versions"]["tensorflow"] == tf.__version__
    assert report["versions"]["keras"] == keras.__version__
    assert report["dataset"] == "synthetic"  # the caller's metadata, at the top level
    assert {"CONV_2D", "MEAN", "FULLY_CONNECTED", "LOGISTIC"} <= set(report["tflite"]["float32"]["ops"])
    assert report["tflite"]["float32"]["flex_ops"] == []
    parity = report["parity"]
    assert 0 <= parity["tflite_max_abs_diff"]["probabilities"] <= 1e-4
    assert 0 <= parity["saved_model_max_abs_diff"]["probabilities"] <= 1e-4


def test_interpreter_sees_the_keras_names(small_bundle):
    _, _, paths = small_bundle
    interpreter = tf.lite.Interpreter(model_path=str(paths["tflite"]))
    assert interpreter.get_signature_list() == {"serving_default": {"inputs": ["image"], "outputs": ["probabilities"]}}


def test_two_eye_mixed_precision_model(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = two_eye_net()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.output["grade"].dtype == "float16"
    paths = export.export_bundle(model, tmp_path, labels={"probabilities": ODIR, "grade": GRADES})
    assert paths["labels_grade"].read_text().splitlines() == GRADES
    assert paths["labels_probabilities"].read_text().splitlines() == ODIR

    # Reference: the same weights in a float32 build, computed here.
    reference = two_eye_net()
    reference.set_weights(model.get_weights())
    inputs = images(3, 4, names=("left_image", "right_image"))
    want = keras_outputs(reference, inputs)
    assert want["probabilities"].std() > 1e-3
    got = tflite.run_tflite(paths["tflite"], inputs)
    assert {k: v.dtype for k, v in got.items()} == {"probabilities": np.float32, "grade": np.float32}
    assert_close(got, want, atol=1e-4)
    assert_close(saved_model_outputs(paths["saved_model"], inputs), want, atol=1e-5)
    # float16 arithmetic is what the trained model does; it stays close but not exact.
    assert_close(keras_outputs(model, inputs), want, atol=1e-2)
    interpreter = tf.lite.Interpreter(model_path=str(paths["tflite"]))
    assert all(d["dtype"] == np.float32 for d in interpreter.get_input_details())
    report = json.loads(paths["model_card"].read_text())
    assert report["mixed_precision"] is True
    assert [i["name"] for i in report["inputs"]] == ["left_image", "right_image"]
    assert [o["name"] for o in report["outputs"]] == ["probabilities", "grade"]


def test_efficientnet_b0_has_only_builtin_ops(tmp_path):
    backbone = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    image = keras.Input((32, 32, 3), name="image")
    features = keras.layers.GlobalAveragePooling2D(name="features")(backbone(image))
    probs = keras.layers.Dense(4, activation="sigmoid", name="probabilities")(features)
    model = keras.Model(image, {"probabilities": probs, "features": features})
    paths = export.export_bundle(model, tmp_path, labels=list("ABCD"), formats=("tflite",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.txt", "model.tflite", "model_card.json"]
    ops = tflite.tflite_ops(paths["tflite"])
    assert "DEPTHWISE_CONV_2D" in ops and not tflite.has_flex_ops(paths["tflite"])
    inputs = images(2, 5)
    want = keras_outputs(model, inputs)
    got = tflite.run_tflite(paths["tflite"], inputs)
    assert_close(got, want, atol=1e-4)
    # An untrained EfficientNet's features are tiny (~1e-6), so 1e-4 alone proves little:
    # also ask for agreement relative to their scale.
    scale = np.abs(want["features"]).max()
    assert scale > 0 and np.abs(got["features"] - want["features"]).max() <= 1e-3 * scale


def test_flex_only_op_raises_clear_error(tmp_path):
    matrix = keras.Input((3, 3), name="image")
    out = keras.layers.Flatten(name="probabilities")(MatrixInverse()(matrix))
    model = keras.Model(matrix, out)
    with pytest.raises(export.ExportError, match=r"MatrixInverse.*ops TFLite supports"):
        export.export_bundle(
            model, tmp_path, labels=[str(i) for i in range(9)], formats=("saved_model", "tflite"), check=False
        )
    assert not (tmp_path / "model.tflite").exists()


def test_has_flex_ops_on_select_tf_ops_model(tmp_path):
    # Converted in-process with TF Select allowed: the one way to get a Flex op file.
    matrix = keras.Input((3, 3), name="image")
    model = keras.Model(matrix, MatrixInverse()(matrix))
    saved = export.export_saved_model(model, tmp_path / "sm")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    path = tmp_path / "flex.tflite"
    path.write_bytes(converter.convert())
    assert "FlexMatrixInverse" in tflite.tflite_ops(path)
    assert tflite.has_flex_ops(path)


def test_dynamic_int8_is_smaller_and_close(small_bundle, tmp_path):
    model, _, paths = small_bundle
    quantized = tflite.convert_tflite(paths["saved_model"], tmp_path / "q.tflite", quantization="dynamic_int8")
    assert quantized.stat().st_size < paths["tflite"].stat().st_size
    interpreter = tf.lite.Interpreter(model_path=str(quantized))
    assert np.int8 in {d["dtype"] for d in interpreter.get_tensor_details()}  # int8 weights
    assert all(d["dtype"] == np.float32 for d in interpreter.get_input_details())
    inputs = images(4, 6)
    got = tflite.run_tflite(quantized, inputs)["probabilities"]
    want = keras_outputs(model, inputs)["probabilities"]
    assert np.abs(got - want).max() < 0.05


def test_bad_options_raise_before_work(tmp_path):
    model = small_net()
    with pytest.raises(ConfigError, match="int8.*calibration"):
        tflite.convert_tflite(tmp_path, tmp_path / "m.tflite", quantization="int8")
    with pytest.raises(ConfigError, match="int8.*calibration"):
        export.export_bundle(model, tmp_path, labels=ODIR, tflite_variants=("float32", "int8"))
    with pytest.raises(ConfigError, match="bfloat"):
        tflite.convert_tflite(tmp_path, tmp_path / "m.tflite", quantization="bfloat")
    with pytest.raises(ConfigError, match="onnx"):
        export.export_bundle(model, tmp_path, labels=ODIR, formats=("onnx",))
    with pytest.raises(export.ExportError, match="4 labels"):
        export.export_bundle(model, tmp_path, labels=ODIR + ["X"])
    assert not any(tmp_path.glob("*.keras"))


def test_run_tflite_without_signatures_uses_tensor_names(small_bundle, monkeypatch):
    model, _, paths = small_bundle
    real = tflite.make_interpreter

    def without_signatures(path, num_threads):
        interpreter = real(path, num_threads)
        interpreter.get_signature_list = lambda: {}
        return interpreter

    monkeypatch.setattr(tflite, "make_interpreter", without_signatures)
    inputs = images(2, 8)
    got = tflite.run_tflite(paths["tflite"], inputs)  # "serving_default_image:0" -> "image"
    assert len(got) == 1
    np.testing.assert_allclose(
        next(iter(got.values())), keras_outputs(model, inputs)["probabilities"], rtol=0, atol=1e-4
    )


def test_wrong_input_names_are_named(small_bundle):
    _, _, paths = small_bundle
    x = images(1, 7)["image"]
    for run, path in ((tflite.run_tflite, paths["tflite"]), (export.run_saved_model, paths["saved_model"])):
        with pytest.raises(export.ExportError, match=r"\['image'\].*\['left_image'\]"):
            run(path, {"left_image": x})
