"""Every kfundus model family, loss, layer and metric under KERAS_BACKEND=tensorflow, jax
(and torch when it is installed): it builds, trains a step, and gives the same outputs for
the same weights as TensorFlow. Run by ``make test-backends`` (see tests/backends/conftest.py).

The TensorFlow run goes first and writes the weights; each other backend loads them
(``tests/backends/matrix.py``). The matrix is written to ``runs/backend-matrix.md``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MATRIX = Path(__file__).with_name("matrix.py")
REPO = Path(__file__).resolve().parents[2]
# float32, different kernels (XLA vs TF/oneDNN): observed <= 5e-6 on logits of size ~10
RTOL = 1e-4
BACKENDS = ["jax"] + (["torch"] if importlib.util.find_spec("torch") else [])
# stochastic depth (keras.applications EfficientNet drop_connect) draws different random
# masks per backend in the training step, so only its inference outputs are compared
RANDOM_TRAIN_STEP = {"efficientnet_b0"}


def _run(backend: str, out: Path, mode: str) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(MATRIX), str(out), mode], capture_output=True, text=True, env=env, timeout=900, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix")
    report = _run("tensorflow", out, "save")
    failed = {k: v["error"] for k, v in report["cases"].items() if not v["ok"]}
    assert not failed, failed
    return out, report


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(a)))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_tensorflow(reference, backend):
    out, tf_report = reference
    report = _run(backend, out, "load")
    rows, failures = [], []
    for case, result in report["cases"].items():
        if not result["ok"]:
            failures.append(f"{case}: {result['error']}")
            rows.append((case, "FAIL", result["error"][:120]))
            continue
        ref, got = np.load(out / f"{case}-tensorflow.npz"), np.load(out / f"{case}-{backend}.npz")
        diffs = {k: max_rel_diff(ref[k], got[k]) for k in ref.files}
        worst = max(diffs.values())
        note = f"max rel. output diff {worst:.1e}"
        if "step_loss" in result and case not in RANDOM_TRAIN_STEP:
            step = abs(result["step_loss"] - tf_report["cases"][case]["step_loss"])
            note += f"; train-step loss diff {step:.1e}"
            if step > RTOL * max(1.0, abs(result["step_loss"])):
                failures.append(
                    f"{case}: train-step loss {result['step_loss']} vs TF {tf_report['cases'][case]['step_loss']}"
                )
        if worst > RTOL:
            failures.append(f"{case}: outputs differ from TensorFlow by {worst:.2e} ({diffs})")
        rows.append((case, "ok" if worst <= RTOL else "DIFF", note))
    table = "\n".join(
        [f"| case | {backend} | vs TensorFlow |", "|---|---|---|"] + [f"| {c} | {s} | {n} |" for c, s, n in rows]
    )
    (REPO / "runs").mkdir(exist_ok=True)
    (REPO / "runs" / f"backend-matrix-{backend}.md").write_text(table + "\n")
    print("\n" + table)
    assert not failures, failures
