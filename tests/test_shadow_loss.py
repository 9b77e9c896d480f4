"""Shadow loss: against a hand computation, the cosine triplet loss the docs state (on
embeddings of any norm: the loss L2-normalises them), and its memory."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfundus.errors import ConfigError
from kfundus.systems.clip_lora.shadow_loss import ShadowLoss


def shadow_by_hand(labels, embeddings, margin):
    """Literal loops over anchors, positives and negatives (the paper's formula on the
    L2-normalised embeddings), batch-hard."""
    labels, embeddings = np.asarray(labels, bool), np.asarray(embeddings, np.float64)
    embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
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
    # cos(e0, e1) = cos(e2, e1) = 1/sqrt(2), cos(e0, e2) = 0
    # anchor 0: positive e1 (delta 1 - 0.7071), negative e2 (delta 1): 0.2929 - 1 + m
    # anchor 2: the same by symmetry
    assert float(ShadowLoss(margin=0.5)(y, e)) == pytest.approx(0.0)  # max(-0.2071, 0) twice
    assert float(ShadowLoss(margin=1.0)(y, e)) == pytest.approx(1 - 1 / np.sqrt(2), rel=1e-5)  # 0.2929 twice
    e = np.float32([[3.0, 0.0], [1.0, 2.0], [0.0, 2.0]])
    # cos(e0, e1) = 1/sqrt(5), cos(e2, e1) = 2/sqrt(5), cos(e0, e2) = 0
    # anchor 0: negative cosine 0, positive 0.4472: 0 - 0.4472 + 1.5 = 1.0528
    # anchor 2: negative cosine 0, positive 0.8944: 0 - 0.8944 + 1.5 = 0.6056
    expected = (1.5 - 1 / np.sqrt(5) + 1.5 - 2 / np.sqrt(5)) / 2
    assert float(ShadowLoss(margin=1.5)(y, e)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("scale", [1.0, 16.0, 300.0])
def test_is_the_cosine_triplet_loss_at_any_embedding_norm(scale):
    """The docs' formula, max(cos(a, n) - cos(a, p) + m, 0), on embeddings of the norm the
    model outputs (concatenated class tokens: about sqrt(d) per eye, here 16-300), against
    a NumPy cosine computation. Fails if the loss stops normalising (the unnormalised
    shadow of a norm-300 vector is a distance in hundreds, not a cosine)."""
    y, e = random_batch(7, batch=16, dim=64)
    e = e * np.float32(scale) / np.sqrt(64)  # row norms about scale * [0.5, 3]
    for margin in (0.2, 0.5):
        np.testing.assert_allclose(float(ShadowLoss(margin)(y, e)), cosine_triplet(y, e, margin), rtol=1e-5)
    # and so it does not depend on each embedding's norm
    rescale = np.random.default_rng(1).uniform(0.1, 50.0, (len(e), 1)).astype("float32")
    np.testing.assert_allclose(float(ShadowLoss(0.5)(y, e * rescale)), float(ShadowLoss(0.5)(y, e)), rtol=1e-5)


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
