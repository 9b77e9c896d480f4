import keras
import numpy as np
import pytest

from kfundus.errors import ConfigError
from kfundus.systems.efficientnet.model import (
    BACKBONE_NAME,
    IMAGENET_MEAN,
    IMAGENET_STDDEV,
    build_efficientnet_b0,
    efficientnet_b0_backbone,
    freeze_blocks,
)

SIZE = 32


def stem_input(backbone, x):
    """What the first convolution of a backbone sees for input x."""
    probe = keras.Model(backbone.input, backbone.get_layer("stem_conv_pad").input)
    return np.asarray(probe(x))


def test_local_imagenet_file_gets_the_imagenet_input_scaling(tmp_path):
    # A stand-in for Keras' efficientnetb0_notop.h5: random filters, ImageNet statistics in
    # its Normalization layer (as the real file has).
    source = efficientnet_b0_backbone(SIZE, weights=None)
    path = tmp_path / "efficientnetb0_notop.weights.h5"
    source.save_weights(path)
    x = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STDDEV)
    # What weights="imagenet" computes (keras/src/applications/efficientnet.py): the
    # Normalization layer, then an extra Rescaling(1 / sqrt(std)).
    expected = (x / 255.0 - mean) / std / np.sqrt(std)

    guarded = efficientnet_b0_backbone(SIZE, weights=str(path))
    np.testing.assert_allclose(stem_input(guarded, x), expected, rtol=1e-5, atol=1e-5)
    # Keras' own load-by-path drops that factor: the trap the guard exists for.
    naive = keras.applications.EfficientNetB0(include_top=False, weights=str(path), input_shape=(SIZE, SIZE, 3))
    assert np.abs(stem_input(naive, x) - expected).max() > 0.1
    # the filters are the file's
    np.testing.assert_array_equal(
        guarded.get_layer("stem_conv").kernel.numpy(), source.get_layer("stem_conv").kernel.numpy()
    )


def test_missing_or_wrong_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        efficientnet_b0_backbone(SIZE, weights=str(tmp_path / "absent.h5"))
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    wrong = tmp_path / "other.weights.h5"
    other.save_weights(wrong)
    with pytest.raises(ConfigError, match="efficientnetb0_notop.h5"):
        efficientnet_b0_backbone(SIZE, weights=str(wrong))


def test_freeze_blocks():
    backbone = efficientnet_b0_backbone(SIZE)
    freeze_blocks(backbone, 2)
    trainable = {layer.name for layer in backbone.layers if layer.trainable and layer.weights}
    assert trainable and all(n.startswith(("block6", "block7", "top")) for n in trainable)
    assert any(n.startswith("block6") for n in trainable)
    freeze_blocks(backbone, 0)
    assert not backbone.trainable_weights
    freeze_blocks(backbone, -1)
    assert len(backbone.trainable_weights) > 200


def test_classifier_names_roundtrip_and_two_eye_sharing(tmp_path):
    model = build_efficientnet_b0(3, image_size=SIZE, trainable_blocks=1)
    assert [t.name for t in model.inputs] == ["image"] and model.output_names == ["probabilities"]
    x = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    y = np.asarray(model(x))
    assert y.shape == (2, 3) and ((y > 0) & (y < 1)).all()
    model.save(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(keras.saving.load_model(tmp_path / "m.keras")(x)), y, atol=1e-6)

    two = build_efficientnet_b0(8, image_size=SIZE, two_eye=True)
    assert sorted(t.name for t in two.inputs) == ["left_image", "right_image"]
    assert len([layer for layer in two.layers if layer.name == BACKBONE_NAME]) == 1  # one shared backbone
    features = keras.Model(two.inputs, two.get_layer("patient_features").output)
    left, right = x, x[::-1]
    fused = np.asarray(features({"left_image": left, "right_image": right}))
    backbone = keras.Sequential([two.get_layer(BACKBONE_NAME), keras.layers.GlobalAveragePooling2D()])
    # laterality is kept: [left features ; right features], not a symmetric sum
    np.testing.assert_allclose(fused[:, :1280], np.asarray(backbone(left)), atol=1e-5)
    np.testing.assert_allclose(fused[:, 1280:], np.asarray(backbone(right)), atol=1e-5)
    softmax = build_efficientnet_b0(5, image_size=SIZE, activation="softmax")
    np.testing.assert_allclose(np.asarray(softmax(x)).sum(axis=1), 1.0, rtol=1e-5)
