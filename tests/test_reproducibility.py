"""Same config and seed, same weights (train.deterministic, the default)."""

import hashlib

import keras
import numpy as np

from kfundus.config import load_config
from kfundus.data.synthetic import make_odir
from kfundus.workflows.supervised import train


def _weights_digest(run) -> str:
    weights = keras.saving.load_model(run / "model.keras").get_weights()
    return hashlib.sha1(b"".join(np.ascontiguousarray(w).tobytes() for w in weights)).hexdigest()


def test_two_runs_of_one_config_give_identical_weights(tmp_path):
    """Augmentation (rotation, flips, zoom, colour: the demo config's) runs in a parallel
    tf.data map; without op determinism its random draws reach the batches in thread order
    and two runs differ (measured, see docs/training.md)."""
    data = make_odir(tmp_path / "data", n_patients=16, size=48, seed=2, write_masks=False)
    overrides = [
        "data.image_size=32",
        "train.epochs=2",
        "export.formats=[]",
        f"output_dir={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    config = load_config("demo_synthetic", overrides)
    assert config.train.deterministic and config.data.augment.enabled()
    first = train(config, str(data), tmp_path / "a")
    second = train(config, str(data), tmp_path / "b")
    assert _weights_digest(first) == _weights_digest(second)
    assert (first / "history.csv").read_text() == (second / "history.csv").read_text()
    other_seed = train(load_config("demo_synthetic", [*overrides, "train.seed=1"]), str(data), tmp_path / "c")
    assert _weights_digest(other_seed) != _weights_digest(first)  # the seed does reach the weights
