import keras
import numpy as np
import pytest

from kfundus.errors import ConfigError
from kfundus.losses import WeightedBinaryCrossentropy, make_loss, positive_weights


def test_weighted_bce_equals_hand_computation():
    y = np.array([[0, 1, 1], [1, 0, 0]], "float32")
    p = np.array([[0.2, 0.6, 0.9], [0.7, 0.1, 0.5]], "float32")
    w = np.array([1.0, 10.0, 3.0])
    expected = np.mean([np.mean(-(w * yi * np.log(pi) + (1 - yi) * np.log(1 - pi))) for yi, pi in zip(y, p)])
    got = float(WeightedBinaryCrossentropy(w)(y, p))
    assert got == pytest.approx(expected, rel=1e-5)
    # with unit weights it is Keras' BCE
    assert float(WeightedBinaryCrossentropy([1, 1, 1])(y, p)) == pytest.approx(
        float(keras.losses.BinaryCrossentropy()(y, p)), rel=1e-5)


def test_positive_weights_from_frequencies_capped():
    targets = np.zeros((100, 3))
    targets[:50, 0] = 1  # 50/50 -> 1
    targets[:4, 1] = 1  # 96/4 -> 24
    targets[:1, 2] = 1  # 99/1 -> capped
    np.testing.assert_allclose(positive_weights(targets, cap=50), [1.0, 24.0, 50.0])


def test_make_loss_choices_and_serialisation(tmp_path):
    targets = np.array([[1, 0], [0, 1], [0, 0], [0, 0]])
    assert isinstance(make_loss("focal", "multilabel", targets), keras.losses.BinaryFocalCrossentropy)
    assert isinstance(make_loss("bce", "multiclass", targets), keras.losses.CategoricalCrossentropy)
    with pytest.raises(ConfigError, match="train.loss"):
        make_loss("dice", "multilabel", targets)
    with pytest.raises(ConfigError, match="multi-class"):
        make_loss("focal", "multiclass", targets)
    # a model compiled with the custom loss saves and reloads with it
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="sigmoid")])
    model.compile("adam", make_loss("weighted_bce", "multilabel", targets))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.loss.pos_weight == [3.0, 3.0]
