"""Same config and seed, same result: seeds and TensorFlow's op determinism.

``reproducible(seed, deterministic)`` seeds Python, NumPy, TensorFlow and Keras
(``keras.utils.set_random_seed``) and, with ``deterministic``, switches on TensorFlow's op
determinism for the block (restored afterwards). That switch is what makes kfundus runs
repeatable: Keras' random augmentation layers draw from one seed state, and inside a
parallel ``tf.data`` map the batches would otherwise take their draws in whatever order
the threads run (measured: the demo's first epoch differed between two runs of the same
command). With it, two runs of the same config on the same machine give the same weights.

What it does not cover: another number of CPU threads (the oneDNN and Eigen kernels split
their sums by thread, so ``TF_NUM_INTRAOP_THREADS=1`` and 2 give other weights: measured),
another machine, another TensorFlow / Keras version, another CPU instruction set (oneDNN
picks kernels by CPU) or a GPU instead of a CPU give other float rounding, so results
agree only to within training noise there (``tests/test_reproducibility.py`` checks the
repeatable case). The JAX and PyTorch backends get the seeds only.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def reproducible(seed: int, deterministic: bool = True):
    """Seed everything; with ``deterministic``, TensorFlow op determinism inside the block."""
    import keras

    keras.utils.set_random_seed(seed)
    if not deterministic or keras.backend.backend() != "tensorflow":
        yield
        return
    from tensorflow.python.framework import config as tf_config

    was = tf_config.is_op_determinism_enabled()
    tf_config.enable_op_determinism()
    try:
        yield
    finally:
        if not was:
            tf_config.disable_op_determinism()
