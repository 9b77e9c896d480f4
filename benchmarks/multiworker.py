"""One training over several processes (hosts), proven with two workers on localhost.

    python benchmarks/multiworker.py                      # TF: MultiWorkerMirroredStrategy + TF_CONFIG
    python benchmarks/multiworker.py --backend jax        # Keras 3 on JAX: jax.distributed + DataParallel
                                                          # (run with the backends venv: .cache/venv-jax)

The launcher starts ``--workers`` processes of this script (``--role worker``), each with
its own ``TF_CONFIG`` (TF) or ``--process-id`` (JAX) and a free localhost port for the
coordinator, waits for them and compares their per-step losses with a one-process run on
the same global batch. Every worker reads only its own shard of the input rows
(``kfundus.engine.distribute.shard_dataset``: rows ``i, i + n, ...``; the global batch of 16
is 8 rows from each worker), builds a tiny kfundus ViT-LoRA classifier (LayerNorm, no
dropout) in the strategy's scope and trains it with ``model.fit``; worker 0 is the chief.
On real hosts, run the worker command on each machine with ``TF_CONFIG`` listing all
``host:port`` pairs and its own ``task.index`` (see the README section "Scale").

Logs go to ``runs/multiworker-<backend>/worker-<i>.log``; the summary (JSON) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = dict(patch_size=8, hidden_dim=32, num_layers=2, num_heads=2, mlp_dim=64)
SIZE, GLOBAL_BATCH, STEPS = 32, 16, 6


def make_rows(n: int):
    """The full synthetic input (the same on every worker; each keeps only its shard)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (n, 2)).astype("float32")
    x = rng.uniform(0, 80, (n, SIZE, SIZE, 3)).astype("float32")
    x[..., 0] += 150 * y[:, :1, None, None][..., 0]  # label 0 is a red tint: learnable
    return x, y


def build(distribution="none"):
    import keras

    from kfundus.config import ModelConfig
    from kfundus.systems import build_model

    keras.utils.set_random_seed(0)  # same initial weights on every worker
    model = build_model(
        ModelConfig(name="vit", dropout=0.0, options={"encoder_config": TINY_VIT, "lora_rank": 2}),
        num_outputs=2,
        image_size=SIZE,
        task="multilabel",
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss={"probabilities": keras.losses.BinaryCrossentropy()})
    return model


# ---------------------------------------------------------------------------
# TensorFlow: MultiWorkerMirroredStrategy


def tf_worker(index: int, single: bool) -> dict:
    import keras
    import tensorflow as tf

    from kfundus.engine.distribute import strategy_scope, worker_dataset

    keras.config.disable_traceback_filtering()

    x, y = make_rows(GLOBAL_BATCH * STEPS)

    def rows():
        return tf.data.Dataset.from_tensor_slices((x, {"probabilities": y}))

    distribution = "none" if single else "multi_worker"
    with strategy_scope(distribution) as strategy:
        model = build()
    seen = []  # the rows this worker's pipeline read (its shard)
    if single:
        ds = rows().batch(GLOBAL_BATCH).repeat()
    else:
        ds = worker_dataset(strategy, lambda: rows().repeat(), GLOBAL_BATCH)
        shard = [i for i in range(len(x)) if i % strategy.num_replicas_in_sync == index]  # rows index::workers
        seen = [len(shard), shard[:4]]
    history = model.fit(ds, epochs=STEPS, steps_per_epoch=1, verbose=2)
    return {
        "worker": index,
        "replicas": strategy.num_replicas_in_sync,
        "strategy": type(strategy).__name__,
        "shard_rows": seen,
        "losses": [float(v) for v in history.history["loss"]],
    }


# ---------------------------------------------------------------------------
# JAX: jax.distributed + keras.distribution.DataParallel


def jax_worker(index: int, workers: int, port: int, single: bool) -> dict:
    import jax

    if not single:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=workers, process_id=index)
    import keras
    import tensorflow as tf

    from kfundus.engine.distribute import shard_dataset

    devices = jax.devices()
    if not single:
        # auto_shard_dataset=False: each process already reads only its shard (below); Keras'
        # own sharding would instead expect the global batch from every process
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False))
    model = build()
    x, y = make_rows(GLOBAL_BATCH * STEPS)
    rows = tf.data.Dataset.from_tensor_slices((x, {"probabilities": y}))
    local = GLOBAL_BATCH if single else GLOBAL_BATCH // workers
    if not single:
        rows = shard_dataset(rows, workers, index)  # this process's rows only
    # each process's batch of GLOBAL_BATCH / workers rows is its part of the global batch
    ds = rows.batch(local).repeat()
    history = model.fit(ds, epochs=STEPS, steps_per_epoch=1, verbose=2)
    return {
        "worker": index,
        "replicas": len(devices),
        "process_count": jax.process_count(),
        "strategy": "DataParallel" if not single else "none",
        "local_batch": local,
        "losses": [float(v) for v in history.history["loss"]],
    }


# ---------------------------------------------------------------------------
# launcher


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch(backend: str, workers: int, out: Path, timeout: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    ports = free_ports(workers)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs, logs = [], []
    start = time.time()
    for i in range(workers):
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        if backend == "tensorflow":
            env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        log = open(out / f"worker-{i}.log", "w")  # noqa: SIM115 - closed after the workers exit
        logs.append(log)
        cmd = [
            sys.executable,
            __file__,
            "--role",
            "worker",
            "--backend",
            backend,
            "--index",
            str(i),
            "--workers",
            str(workers),
            "--port",
            str(ports[0]),
        ]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO))
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, timeout - (time.time() - start))))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append("timeout")
    for log in logs:
        log.close()
    results = []
    for i in range(workers):
        lines = [ln for ln in (out / f"worker-{i}.log").read_text().splitlines() if ln.startswith("RESULT ")]
        results.append(json.loads(lines[-1][7:]) if lines else None)
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TF_CONFIG", None)
    single = subprocess.run(
        [sys.executable, __file__, "--role", "single", "--backend", backend],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )
    (out / "single.log").write_text(single.stdout + single.stderr)
    one = [json.loads(ln[7:]) for ln in single.stdout.splitlines() if ln.startswith("RESULT ")]
    summary = {
        "backend": backend,
        "workers": workers,
        "exit_codes": codes,
        "seconds": round(time.time() - start, 1),
        "results": results,
        "single_process": one[-1] if one else None,
        "logs": str(out),
    }
    if one and all(results):
        ref = np.array(one[-1]["losses"])
        summary["max_abs_diff_vs_single"] = max(float(np.max(np.abs(np.array(r["losses"]) - ref))) for r in results)
        summary["workers_agree"] = max(
            float(np.max(np.abs(np.array(r["losses"]) - np.array(results[0]["losses"])))) for r in results
        )
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["tensorflow", "jax"], default="tensorflow")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--role", choices=["launch", "worker", "single"], default="launch")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.role == "launch":
        out = args.out or REPO / "runs" / f"multiworker-{args.backend}"
        summary = launch(args.backend, args.workers, out, args.timeout)
        print(json.dumps(summary, indent=1))
        return 0 if all(c == 0 for c in summary["exit_codes"]) else 1
    single = args.role == "single"
    if args.backend == "jax":
        result = jax_worker(args.index, args.workers, args.port, single)
    else:
        result = tf_worker(args.index, single)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
