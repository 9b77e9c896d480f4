"""Data-parallel training: one ``tf.distribute`` strategy per run, picked by the config.

Every kfundus training command (``train``, ``pretrain``, ``transfer``, ``sweep``) reads a
top-level ``distribution`` key (``--set distribution=mirrored``):

``none`` (default)
    the default strategy: one device, exactly the code path of a plain ``model.fit``.
``mirrored``
    ``tf.distribute.MirroredStrategy`` over every GPU of this machine (or every logical
    CPU device when there is no GPU): model, optimizer and metrics are built in its scope,
    each step splits the batch across the replicas and all-reduces the gradients. On a
    machine with one device that is one replica: the run says so (a ``UserWarning``), trains
    exactly as ``none`` would, and ``run.json`` records ``replicas: 1``.
``multi_worker``
    ``tf.distribute.MultiWorkerMirroredStrategy`` over several machines, described by the
    ``TF_CONFIG`` environment variable (same command on every host, each with its own
    ``task.index``; worker 0 is the chief and writes the checkpoints). See
    ``benchmarks/multiworker.py`` for a two-process run on localhost.

Batch size and learning rate (the choice made here, since no paper says): ``batch_size``
in the config is the **global** batch, i.e. the number of images per optimizer step over
all replicas; each replica gets ``batch_size / replicas`` of it. Keeping the config as it
is therefore keeps the optimisation the same (same loss trajectory up to float summation
order; tested on two logical CPU devices) and only spreads the work. To use the extra
devices for a larger batch, raise ``train.batch_size`` and scale ``train.learning_rate``
linearly with it (``linear_scaled_lr``; Goyal et al. 2017), with a warm-up
(``train.warmup_epochs`` >= 1) when the factor is large. Batch normalisation statistics
stay per replica (Keras' default), so the BN batch is ``batch_size / replicas``.

The strategy only applies on the TensorFlow backend; on JAX use
``keras.distribution.DataParallel`` (``benchmarks/multiworker.py --backend jax``).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings

from kfundus.errors import ConfigError

DISTRIBUTIONS = ("none", "mirrored", "multi_worker")


def check_distribution(value, where: str = "distribution") -> str:
    """The config value, checked (ConfigError naming the key and the choices)."""
    if value not in DISTRIBUTIONS:
        raise ConfigError(f"{where}={value!r}: use one of {list(DISTRIBUTIONS)} (e.g. --set distribution=mirrored)")
    return value


def tf_config() -> dict | None:
    """The parsed ``TF_CONFIG`` environment variable (None when unset)."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"TF_CONFIG is not valid JSON ({exc}); expected "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}'
        ) from exc
    workers = (value.get("cluster") or {}).get("worker") if isinstance(value, dict) else None
    task = value.get("task") if isinstance(value, dict) else None
    if not workers or not isinstance(task, dict) or "index" not in task:
        raise ConfigError(
            "TF_CONFIG needs cluster.worker (a list of host:port) and task.index (this "
            f"worker's position in it); got {raw}"
        )
    return value


def make_strategy(distribution: str = "none", where: str = "distribution"):
    """The ``tf.distribute.Strategy`` for the config value (the default strategy for none).

    Raises ConfigError for an unknown value, for ``multi_worker`` without ``TF_CONFIG``,
    and for a distributed run on a backend other than TensorFlow.
    """
    check_distribution(distribution, where)
    import tensorflow as tf

    if distribution == "none":
        return tf.distribute.get_strategy()
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ConfigError(
            f"{where}={distribution!r} uses tf.distribute, which needs KERAS_BACKEND=tensorflow "
            f"(this process runs {keras.backend.backend()}); on JAX use keras.distribution."
            "DataParallel, see benchmarks/multiworker.py --backend jax"
        )
    if distribution == "mirrored":
        # every GPU; without one, every logical CPU device (MirroredStrategy alone would take
        # just CPU:0; several logical CPUs exist only when configured, e.g. in the tests)
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.MirroredStrategy(None if gpus else [d.name for d in tf.config.list_logical_devices("CPU")])
    if tf_config() is None:
        raise ConfigError(
            f"{where}=multi_worker needs the TF_CONFIG environment variable on every host, e.g. "
            'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}\' (index 1 on the second host)'
        )
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    _patch_keras_symbolic_build()
    return strategy


def _patch_keras_symbolic_build() -> None:
    """Work around keras-team/keras#20585 (open; both seen on Keras 3.15 + TF 2.21), where
    ``model.fit`` under MultiWorkerMirroredStrategy fails twice:

    1. it builds the model from a first batch that it averages over replicas with
       ``strategy.reduce("MEAN", batch, axis=None)``, which the strategy cannot do for a
       nested batch ("Attempt to convert a value (PerReplica:{...}) ... to a Tensor").
       Only the batch's shapes and dtypes are needed, so this worker's local part is used;
    2. each step averages the (scalar) loss and metric values over workers with
       ``strategy.reduce("MEAN", v, axis=0)``: "Invalid reduction dimension 0 for input
       with 0 dimensions". Scalars are reduced with ``axis=None`` instead.

    Patched when a multi_worker strategy is made; other strategies take Keras' own code."""
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    if getattr(TensorFlowTrainer, "_kfundus_patched", False):
        return
    original = TensorFlowTrainer._maybe_symbolic_build

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return original(self, iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            batch = next(it)
            data_batch = tree.map_structure(
                lambda v: (
                    strategy.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v
                ),
                batch,
            )
            break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    original_reduce = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return original_reduce(values, strategy, reduction)

        def mean(v):
            local = strategy.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v
            return strategy.reduce("MEAN", v, axis=0 if local.shape.rank else None)

        return tree.map_structure(mean, values)

    tf_trainer.reduce_per_replica = reduce_per_replica
    TensorFlowTrainer._kfundus_patched = True


@contextlib.contextmanager
def strategy_scope(distribution: str = "none", where: str = "distribution"):
    """``with strategy_scope(config.distribution) as strategy:`` build and compile there.

    For ``none`` this is the default strategy's scope, a no-op."""
    strategy = make_strategy(distribution, where)
    if strategy.num_replicas_in_sync > 1:
        print(
            f"{where}={distribution}: {strategy.num_replicas_in_sync} replicas "
            f"({type(strategy).__name__}); batch_size is the global batch"
        )
    elif distribution != "none":
        warnings.warn(one_replica_message(distribution, strategy, where), stacklevel=3)
    with strategy.scope():
        yield strategy


def one_replica_message(distribution: str, strategy, where: str = "distribution") -> str:
    """What a distributed strategy that ended up with a single replica says: the run is not
    data-parallel, and how to get devices (or drop the setting)."""
    devices = list(getattr(strategy.extended, "worker_devices", ()) or ())
    found = ", ".join(devices) or "one device"
    hint = (
        "more GPUs on this machine (CUDA_VISIBLE_DEVICES lists them)"
        if distribution == "mirrored"
        else "more workers in TF_CONFIG's cluster.worker, or GPUs on this one"
    )
    return (
        f"{where}={distribution} found a single device ({found}): training runs on 1 replica, the same "
        f"computation as {where}=none, not data-parallel. Give it {hint}, or --set {where}=none"
    )


def per_replica_batch(global_batch: int, replicas: int, where: str = "train.batch_size") -> int:
    """``global_batch / replicas``; ConfigError unless it divides evenly (an uneven split
    gives the replicas different batch sizes and per-replica BN statistics of unequal size)."""
    if replicas < 1 or global_batch % replicas:
        raise ConfigError(
            f"{where}={global_batch} does not split evenly over {replicas} replicas: use a multiple of {replicas}"
        )
    return global_batch // replicas


def linear_scaled_lr(base_lr: float, base_batch: int, global_batch: int) -> float:
    """The linear scaling rule: a learning rate tuned at ``base_batch`` images per step,
    scaled for ``global_batch`` (e.g. 1e-3 at 16 -> 2e-3 at 32 on two GPUs)."""
    if base_batch <= 0 or global_batch <= 0:
        raise ConfigError(f"batch sizes must be > 0 (got {base_batch} and {global_batch})")
    return base_lr * global_batch / base_batch


def shard_dataset(dataset, num_shards: int, index: int):
    """Rows ``index, index + num_shards, ...`` of an *unbatched* dataset, with tf.distribute's
    own auto-sharding switched off: each worker then reads only its own part of the input
    (use inside ``strategy.distribute_datasets_from_function``; see ``worker_dataset``)."""
    import tensorflow as tf

    if not 0 <= index < num_shards:
        raise ConfigError(f"shard index {index} is outside 0..{num_shards - 1}")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.shard(num_shards, index).with_options(options)


def worker_dataset(strategy, make_rows, global_batch: int, *, drop_remainder: bool = True):
    """A distributed dataset in which each input pipeline (one per worker) reads its own
    shard of the rows and batches ``global_batch / replicas`` per replica.

    ``make_rows()`` returns the unbatched dataset (e.g. the rows of a prepared cache);
    the result goes straight to ``model.fit``. With the default strategy this is simply
    ``make_rows().batch(global_batch)``."""
    replicas = strategy.num_replicas_in_sync
    per_replica_batch(global_batch, replicas)

    def dataset_fn(context):
        rows = shard_dataset(make_rows(), context.num_input_pipelines, context.input_pipeline_id)
        return rows.batch(context.get_per_replica_batch_size(global_batch), drop_remainder=drop_remainder)

    import tensorflow as tf

    if strategy is tf.distribute.get_strategy() and replicas == 1:
        return make_rows().batch(global_batch, drop_remainder=drop_remainder)
    return strategy.distribute_datasets_from_function(dataset_fn)


def drop_short_batch(dataset, rows: int, batch_size: int, replicas: int):
    """Drop a last batch that has fewer rows than there are replicas (none when ``replicas``
    is 1). tf.distribute would give some replica an empty batch, which keras-hub's ViT/CLIP
    patch embedding cannot take (its ``reshape(x, [0, -1, d])`` is ambiguous: "Incompatible
    shapes: [0,97,32] vs. [1,17,32]"). At most ``replicas - 1`` rows of an epoch are left out.
    Apply before ``repeat()``; the dataset keeps a known length."""
    if replicas > 1 and 0 < rows % batch_size < replicas:
        return dataset.take(rows // batch_size)
    return dataset
