"""Full-size RETFound: a ViT-L/16 MAE checkpoint with random weights in the released layout
(``{"model": encoder + MAE decoder}``, 224 px, 303 M encoder parameters) converted by
``kfundus convert`` in a fresh process, its features compared with timm's at 1e-4 (global
pool + fc_norm, and class token + norm), and the conversion's time and peak memory recorded
in ``$KFUNDUS_FOUNDATION/retfound_full_results.json``."""

import json
import subprocess
import sys

import numpy as np
import pytest

TOL = 1e-4


@pytest.fixture(scope="module")
def reference(foundation_dir):
    path = foundation_dir / "retfound_reference.npz"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make test-foundation` (it writes the references first)")
    with np.load(path) as data:
        return dict(data)


def convert_in_fresh_process(checkpoint, out, *options):
    """``kfundus convert`` as a user runs it; returns its conversion.json."""
    command = [sys.executable, "-m", "kfundus", "convert", "--from", "retfound", str(checkpoint), "--out", str(out)]
    command += [x for option in options for x in ("--set", option)] + ["--overwrite"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    return json.loads((out / "conversion.json").read_text())


@pytest.mark.parametrize("pooling", ["avg", "token"])
def test_vit_large_features_equal_timm(foundation_dir, reference, pooling):
    from kfundus.systems.retfound import build_retfound_features

    checkpoint = foundation_dir / "RETFound_mae_random.pth"
    record = convert_in_fresh_process(checkpoint, foundation_dir / f"retfound_{pooling}", f"pooling={pooling}")
    assert record["details"]["architecture"] == {
        "patch_size": 16,
        "hidden_dim": 1024,
        "num_layers": 24,
        "num_heads": 16,
        "mlp_dim": 4096,
    }
    assert record["details"]["parameters"] > 300_000_000
    model = build_retfound_features(str(foundation_dir / f"retfound_{pooling}"), 224, pooling=pooling)
    features = model.predict(reference["images"], batch_size=1, verbose=0)
    diff = float(np.max(np.abs(features.astype(np.float64) - reference[f"{pooling}_features"])))
    results_file = foundation_dir / "retfound_full_results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results[pooling] = {
        "max_abs_diff": diff,
        "feature_scale": float(np.max(np.abs(reference[f"{pooling}_features"]))),
        "checkpoint_bytes": checkpoint.stat().st_size,
        "parameters": record["details"]["parameters"],
        "convert_seconds": record["seconds"],
        "read_seconds": record["read_seconds"],
        "peak_memory_mb": record["peak_memory_mb"],
        "ignored_keys": len(record["ignored_keys"]),
    }
    results_file.write_text(json.dumps(results, indent=1))
    print(f"RETFound ViT-L/16 {pooling}: {results[pooling]}")
    assert diff < TOL
