"""Shadow loss: against a hand computation, the cosine triplet loss, and its memory."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfundus.errors import ConfigError
from kfundus.systems.clip_lora.shadow_loss import ShadowLoss


def shadow_by_hand(labels, embeddings, margin):
    """Literal loops over anchors, positives and negatives (the paper's formula), batch-hard."""
    labels, embeddings = np.asarray(labels, bool), np.asarray(embeddings, np.float64)
    losses = []
    for i, a in enumerate(embeddings):
        length = np.sqrt(a @ a)

        def delta(x, a=a, length=length):
            return abs(length - (a @ x) / length)  # | |a| - proj_a(x) |

        pos = [delta(embeddings[j]) for j in range(len(labels)) if j != i and (labels[i] & labels[j]).any()]
        neg = [delta(embeddings[j]) for j in range(len(labels)) if j != i and not (labels[i] & labels[j]).any()]
        if pos and neg:
            losses.append(max(max(pos) - min(neg) + margin, 0.0))
    return float(np.mean(losses)) if losses else 0.0


def cosine_triplet(labels, embeddings, margin):
    """max(cos(a, n) - cos(a, p) + m, 0) with the hardest p (lowest cos) and n (highest)."""
    labels = np.asarray(labels, bool)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    cos = unit @ unit.T
    losses = []
    for i in range(len(labels)):
        others = np.arange(len(labels)) != i
        shared = (labels & labels[i]).any(axis=1)
        pos, neg = cos[i][others & shared], cos[i][others & ~shared]
        if len(pos) and len(neg):
            losses.append(max(neg.max() - pos.min() + margin, 0.0))
    return float(np.mean(losses))


def random_batch(seed, batch=12, dim=6, labels=4):
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=(batch, labels)) < 0.3).astype("float32")
    y[np.arange(batch), rng.integers(0, labels, batch)] = 1  # every sample has a label
    e = rng.normal(size=(batch, dim)).astype("float32") * rng.uniform(0.5, 3.0, (batch, 1)).astype("float32")
    return y, e


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_equals_hand_computation(seed, margin):
    y, e = random_batch(seed)
    got = float(ShadowLoss(margin=margin)(y, e))
    assert got > 0
    np.testing.assert_allclose(got, shadow_by_hand(y, e, margin), rtol=1e-5)


def test_small_batch_by_hand_numbers():
    y = np.float32([[1, 0], [1, 1], [0, 1]])
    # anchor 1 shares a label with both others: no negative, left out of the mean.
    e = np.float32([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    # anchor 0 (|a| = 2): positive e1 (proj 1, delta 1), negative e2 (proj 0, delta 2)
    # anchor 2 (|a| = 3): positive e1 (proj 1, delta 2), negative e0 (proj 0, delta 3)
    assert float(ShadowLoss(margin=0.5)(y, e)) == pytest.approx(0.0)  # max(-0.5, 0) twice
    assert float(ShadowLoss(margin=1.75)(y, e)) == pytest.approx(0.75)  # 0.75 and 0.75
    e = np.float32([[3.0, 0.0], [1.0, 2.0], [0.0, 2.0]])
    # anchor 0 (|a| = 3): positive e1 (proj 1, delta 2), negative e2 (proj 0, delta 3): 2 - 3 + 2.5
    # anchor 2 (|a| = 2): positive e1 (proj 2, delta 0), negative e0 (proj 0, delta 2): 0 - 2 + 2.5
    assert float(ShadowLoss(margin=2.5)(y, e)) == pytest.approx((1.5 + 0.5) / 2)


@pytest.mark.parametrize("seed", [0, 3])
def test_equals_cosine_triplet_on_unit_embeddings(seed):
    y, e = random_batch(seed, batch=16, dim=8)
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    np.testing.assert_allclose(float(ShadowLoss(0.3)(y, unit)), cosine_triplet(y, unit, 0.3), rtol=1e-5)


def test_no_valid_anchor_gives_zero_and_gradients_are_finite():
    y = np.eye(4, dtype="float32")  # nobody shares a label: no positives
    e = tf.Variable(np.random.default_rng(0).normal(size=(4, 3)).astype("float32"))
    with tf.GradientTape() as tape:
        value = ShadowLoss(0.5)(y, e)
    assert float(value) == 0.0
    y, e0 = random_batch(5)
    e = tf.Variable(e0)
    with tf.GradientTape() as tape:
        value = ShadowLoss(0.5)(y, e)
    grad = tape.gradient(value, e).numpy()
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0


def test_loss_tensors_grow_quadratically_not_cubically():
    """Every intermediate tensor of the traced loss has at most max(B*B, B*D, B*L)
    elements: in-batch mining without a (B, B, B) triplet tensor. The per-anchor
    quantities (shadow lengths, hardest distances, the loss) are (B,)."""
    dim, labels = 32, 8
    for batch in (16, 64):
        loss = ShadowLoss(0.5)
        fn = tf.function(lambda y, e, loss=loss: loss(y, e)).get_concrete_function(
            tf.TensorSpec((batch, labels)), tf.TensorSpec((batch, dim))
        )
        sizes = [
            int(np.prod(t.shape))
            for op in fn.graph.get_operations()
            for t in op.outputs
            if t.shape.rank is not None and t.shape.is_fully_defined()
        ]
        assert max(sizes) <= max(batch * batch, batch * dim, batch * labels)
        assert max(sizes) >= batch * batch  # the pairwise matrix is there (the check sees it)
        cube = [
            t.shape
            for op in fn.graph.get_operations()
            for t in op.outputs
            if t.shape.rank is not None and t.shape.rank >= 3
        ]
        assert not cube


def test_serialisation_and_errors():
    loss = ShadowLoss(margin=0.7)
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(again, ShadowLoss) and again.margin == 0.7
    with pytest.raises(ConfigError, match="margin"):
        ShadowLoss(margin=-1)
