"""Data-parallel training (kfundus.distribute): config checks, the scaling rule, and the
loss trajectory on two logical CPU devices against one device.

Logical devices must be configured before TensorFlow initialises its devices, which the
test session has long done, so the two-device runs happen in a fresh subprocess
(``python tests/test_distribute.py trajectory|train``) that prints JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from kfundus.engine.distribute import (
    check_distribution,
    linear_scaled_lr,
    make_strategy,
    per_replica_batch,
    shard_dataset,
    strategy_scope,
)
from kfundus.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = dict(patch_size=8, hidden_dim=32, num_layers=2, num_heads=2, mlp_dim=64)
SIZE, GLOBAL_BATCH, STEPS = 32, 16, 8
# float32 summation order differs (two half-batch means averaged vs one mean): observed
# differences are ~1e-7; 1e-4 leaves room for other CPUs and still catches a wrong
# batch split (which changes the loss in the first or second decimal)
TOLERANCE = 1e-4


def _run(mode: str, *args: str) -> dict:
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, __file__, mode, *args], capture_output=True, text=True, env=env, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_config_values_are_checked():
    from kfundus.config import load_config

    assert load_config(None, ["distribution=mirrored"]).distribution == "mirrored"
    assert load_config().distribution == "none"
    with pytest.raises(ConfigError, match="distribution='mirror'.*mirrored"):
        load_config(None, ["distribution=mirror"])
    with pytest.raises(ConfigError, match="distribution"):
        check_distribution("horovod")


def test_multi_worker_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
    with pytest.raises(ConfigError, match="cluster.worker"):
        make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        make_strategy("multi_worker")


def test_a_strategy_with_one_replica_says_so():
    """Regression (issue 18): ``distribution: mirrored`` on a machine with one device ran on
    one replica without a word. The test process has one logical device (the two-device
    runs happen in subprocesses)."""
    import tensorflow as tf

    if len(tf.config.list_logical_devices("GPU")) > 1 or len(tf.config.list_logical_devices("CPU")) > 1:
        pytest.skip("this process has more than one device: mirrored gets several replicas")
    expected = r"distribution=mirrored found a single device .* 1 replica"
    with pytest.warns(UserWarning, match=expected) as caught, strategy_scope("mirrored") as strategy:
        assert strategy.num_replicas_in_sync == 1
    assert "--set distribution=none" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none: nothing to say
        with strategy_scope("none") as strategy:
            assert strategy.num_replicas_in_sync == 1


def test_scaling_rule_and_batch_split():
    assert linear_scaled_lr(1e-3, 16, 32) == pytest.approx(2e-3)
    assert linear_scaled_lr(3e-5, 256, 64) == pytest.approx(3e-5 / 4)
    assert per_replica_batch(16, 2) == 8
    with pytest.raises(ConfigError, match="multiple of 4"):
        per_replica_batch(18, 4)


def test_shards_partition_the_rows():
    import tensorflow as tf

    rows = tf.data.Dataset.range(10)
    parts = [sorted(int(v) for v in shard_dataset(rows, 3, i)) for i in range(3)]
    assert sorted(v for part in parts for v in part) == list(range(10)) and all(parts)
    assert not set(parts[0]) & set(parts[1])
    with pytest.raises(ConfigError, match="outside"):
        shard_dataset(rows, 2, 2)


def test_two_devices_follow_the_one_device_loss_trajectory():
    """A tiny kfundus ViT-LoRA classifier (LayerNorm only, dropout 0: the per-replica split
    of the global batch is then exactly one global step), same initial weights, same
    batches, Adam: per-step losses on MirroredStrategy over two logical CPUs match one
    device, and training does lower the loss."""
    result = _run("trajectory")
    one, two = np.array(result["one"]), np.array(result["two"])
    assert result["replicas"] == 2
    assert len(one) == len(two) == STEPS
    diff = float(np.max(np.abs(one - two)))
    print(f"max |loss_1dev - loss_2dev| over {STEPS} steps: {diff:.2e}")
    assert diff < TOLERANCE, (one, two)
    assert one[-1] < one[0] - 0.05  # it trained (so equal trajectories are not two flat lines)
    # and the comparison can fail: a run with a different global batch does not match
    assert float(np.max(np.abs(np.array(result["half_batch"]) - one))) > 10 * TOLERANCE


def test_kfundus_train_runs_mirrored(tmp_path):
    """``kfundus train --set distribution=mirrored`` end to end on two logical CPUs."""
    result = _run("train", str(tmp_path))
    assert result["replicas"] == 2
    assert Path(result["model"]).exists()
    assert np.isfinite(result["losses"]).all() and len(result["losses"]) == 2


# ---------------------------------------------------------------------------
# subprocess side


def _two_cpus():
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


def _trajectory() -> dict:
    _two_cpus()
    import keras
    import tensorflow as tf

    from kfundus.config import ModelConfig
    from kfundus.engine.distribute import strategy_scope
    from kfundus.losses import make_loss
    from kfundus.systems import build_model

    rng = np.random.default_rng(0)
    n = GLOBAL_BATCH * STEPS
    y = rng.integers(0, 2, (n, 2)).astype("float32")
    x = rng.uniform(0, 80, (n, SIZE, SIZE, 3)).astype("float32")
    x[..., 0] += 150 * y[:, :1, None, None][..., 0]  # label 0 is a red tint: learnable
    config = ModelConfig(name="vit", dropout=0.0, options={"encoder_config": TINY_VIT, "lora_rank": 2})

    def run(distribution, weights=None, batch=GLOBAL_BATCH):
        keras.utils.set_random_seed(0)
        with strategy_scope(distribution) as strategy:
            model = build_model(config, num_outputs=2, image_size=SIZE, task="multilabel")
            if weights is not None:
                model.set_weights(weights)
            start = model.get_weights()
            # BCE on the label output (the in-batch Shadow loss on the embedding sees only
            # each replica's half of the batch, so it is left out of the equivalence test)
            model.compile(
                optimizer=keras.optimizers.Adam(3e-3), loss={"probabilities": make_loss("bce", "multilabel", y)}
            )
        ds = tf.data.Dataset.from_tensor_slices((x, {"probabilities": y})).batch(batch).repeat()
        history = model.fit(ds, epochs=STEPS, steps_per_epoch=1, verbose=0)  # one batch per "epoch"
        return history.history["loss"], start, strategy.num_replicas_in_sync

    one, start, _ = run("none")
    two, _, replicas = run("mirrored", start)
    half, _, _ = run("none", start, batch=GLOBAL_BATCH // 2)
    return {"one": one, "two": two, "half_batch": half, "replicas": replicas}


def _train(tmp: str) -> dict:
    _two_cpus()
    import pandas as pd

    from kfundus.config import load_config
    from kfundus.data.synthetic import make_odir
    from kfundus.engine.distribute import make_strategy
    from kfundus.workflows.supervised import train

    tmp = Path(tmp)
    data = make_odir(tmp / "data", n_patients=60, size=64, seed=1, write_masks=False)
    tiny = json.dumps(TINY_VIT).replace('"', "")
    config = load_config(
        "odir_clip_lora_shadow",
        [
            "distribution=mirrored",
            "model.name=vit",
            "model.weights=null",
            f"model.options.encoder_config={tiny}",
            f"data.image_size={SIZE}",
            "train.epochs=2",
            "train.batch_size=8",
            f"data.cache_dir={tmp / 'cache'}",
            "data.split.test=0.2",
            "export.formats=[]",
        ],
    )
    run_dir = train(config, data, tmp / "run")
    history = pd.read_csv(run_dir / "history.csv")
    return {
        "replicas": make_strategy("mirrored").num_replicas_in_sync,
        "model": str(run_dir / "model.keras"),
        "losses": history["loss"].tolist(),
    }


if __name__ == "__main__":
    mode = sys.argv[1]
    out = _trajectory() if mode == "trajectory" else _train(sys.argv[2])
    print(json.dumps(out))
