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
        float(keras.losses.BinaryCrossentropy()(y, p)), rel=1e-5
    )


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


# --- weighted label smoothing (WLSRL) -------------------------------------------------


def test_wlsr_categorical_equals_hand_computation_with_a_class_absent_from_the_batch():
    from kfundus.losses import class_weights
    from kfundus.systems.dual_stream.wlsr import WeightedLabelSmoothingLoss

    # training frequencies of 4 classes: 50, 30, 15, 5 -> w_k = 100 / (4 n_k)
    weights = class_weights([50, 30, 15, 5])
    np.testing.assert_allclose(weights, [0.5, 100 / 120, 100 / 60, 5.0], rtol=1e-6)
    y = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], "float32")  # class 3 absent, class 2 too
    p = np.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]], "float32")
    eps = 0.2
    expected = []
    for yi, pi in zip(y, p):  # by hand: sum_k w_k ((1 - eps) y_k + eps / K) (-log p_k)
        expected.append(sum(weights[k] * ((1 - eps) * yi[k] + eps / 4) * -np.log(pi[k]) for k in range(4)))
    got = float(WeightedLabelSmoothingLoss(weights, epsilon=eps, weight_by="class")(y, p))
    assert got == pytest.approx(np.mean(expected), rel=1e-5)
    # the absent classes still pull: their smoothed target eps / K times their weight
    absent_part = np.mean([weights[3] * eps / 4 * -np.log(pi[3]) for pi in p])
    assert absent_part > 0.05 * got
    # weight_by="sample" (default): w_{true class} * sum_k ((1 - eps) y_k + eps / K) (-log p_k)
    by_sample = [
        weights[int(np.argmax(yi))] * sum(((1 - eps) * yi[k] + eps / 4) * -np.log(pi[k]) for k in range(4))
        for yi, pi in zip(y, p)
    ]
    assert float(WeightedLabelSmoothingLoss(weights, epsilon=eps)(y, p)) == pytest.approx(np.mean(by_sample), rel=1e-5)
    # unit weights: Keras' own label smoothing; eps = 0 as well: plain cross-entropy
    assert float(WeightedLabelSmoothingLoss([1] * 4, epsilon=eps)(y, p)) == pytest.approx(
        float(keras.losses.CategoricalCrossentropy(label_smoothing=eps)(y, p)), rel=1e-5
    )
    assert float(WeightedLabelSmoothingLoss([1] * 4, epsilon=0.0)(y, p)) == pytest.approx(
        float(keras.losses.CategoricalCrossentropy()(y, p)), rel=1e-5
    )


def test_wlsr_binary_equals_hand_computation():
    from kfundus.losses import class_weights
    from kfundus.systems.dual_stream.wlsr import WeightedLabelSmoothingLoss

    w0, w1 = class_weights([80, 20])  # 100 / (2 * 80), 100 / (2 * 20)
    assert (w0, w1) == pytest.approx((0.625, 2.5))
    y = np.array([[1.0], [0.0], [0.0]], "float32")
    p = np.array([[0.6], [0.3], [0.9]], "float32")
    eps = 0.1
    s = (1 - eps) * y[:, 0] + eps / 2
    expected = np.mean(-(w1 * s * np.log(p[:, 0]) + w0 * (1 - s) * np.log(1 - p[:, 0])))
    assert float(
        WeightedLabelSmoothingLoss([w0, w1], epsilon=eps, mode="binary", weight_by="class")(y, p)
    ) == pytest.approx(expected, rel=1e-5)
    ce = -(s * np.log(p[:, 0]) + (1 - s) * np.log(1 - p[:, 0]))
    by_sample = np.mean(np.where(y[:, 0] == 1, w1, w0) * ce)
    assert float(WeightedLabelSmoothingLoss([w0, w1], epsilon=eps, mode="binary")(y, p)) == pytest.approx(
        by_sample, rel=1e-5
    )
    assert float(WeightedLabelSmoothingLoss([1, 1], epsilon=eps, mode="binary")(y, p)) == pytest.approx(
        float(keras.losses.BinaryCrossentropy(label_smoothing=eps)(y, p)), rel=1e-5
    )


def test_wlsr_weights_cap_absent_class_serialisation_and_errors():
    from kfundus.losses import class_weights
    from kfundus.systems.dual_stream.wlsr import WeightedLabelSmoothingLoss

    np.testing.assert_allclose(class_weights([90, 10, 0], cap=10.0), [100 / 270, 100 / 30, 10.0], rtol=1e-6)
    np.testing.assert_allclose(class_weights([90, 10], "sqrt_inverse"), np.sqrt([100 / 180, 5.0]), rtol=1e-6)
    np.testing.assert_allclose(class_weights([90, 10], "none"), [1, 1])
    with pytest.raises(ConfigError, match="weighting"):
        class_weights([1, 2], "balanced")
    loss = WeightedLabelSmoothingLoss([[0.5, 2.0], [1.0, 1.0]], epsilon=0.05, mode="binary", weight_by="class")
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(clone, WeightedLabelSmoothingLoss) and clone.get_config() == loss.get_config()
    for kwargs, match in [
        ({"class_weights": [1, 1], "epsilon": 1.0}, "epsilon"),
        ({"class_weights": [1, -1]}, "class_weights"),
        ({"class_weights": [1, 1, 1], "mode": "binary"}, "class_weights"),
        ({"class_weights": [1, 1], "mode": "ordinal"}, "mode"),
        ({"class_weights": [1, 1], "weight_by": "batch"}, "weight_by"),
    ]:
        with pytest.raises(ConfigError, match=match):
            WeightedLabelSmoothingLoss(**kwargs)
