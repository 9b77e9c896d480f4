"""CLIP / ViT encoders with LoRA: loading, learning, frozen weights, adapters, merge and
export, the ViT explanation, and the sweep end to end on synthetic two-eye ODIR data."""

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from kfundus.data.synthetic import make_arrays, make_odir
from kfundus.errors import ConfigError
from kfundus.systems.clip_lora.encoders import load_encoder
from kfundus.systems.clip_lora.lora import load_adapters, lora_layers, lora_parameter_count, merge_lora, save_adapters
from kfundus.systems.clip_lora.model import build_clip_lora, build_vit
from kfundus.systems.clip_lora.shadow_loss import ShadowLoss

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = dict(patch_size=8, hidden_dim=48, num_layers=2, num_heads=2, intermediate_dim=96)
TINY_VIT = dict(patch_size=8, hidden_dim=32, num_layers=2, num_heads=2, mlp_dim=64)
SIZE = 32


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """A tiny CLIP vision encoder saved as a keras-hub preset folder (the offline case)."""
    import keras_hub

    keras.utils.set_random_seed(3)
    encoder = keras_hub.models.CLIPVisionEncoder(**TINY_CLIP, image_shape=(SIZE, SIZE, 3))
    encoder.embedding.position_ids.assign(np.arange(17)[None])
    folder = tmp_path_factory.mktemp("preset") / "tiny_clip"
    encoder.save_to_preset(str(folder))
    return folder, encoder


def test_encoder_from_preset_folder_config_and_errors(preset):
    folder, original = preset
    x = {"images": np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype("float32")}
    loaded = load_encoder("clip", str(folder), SIZE)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(original(x)))
    # another image size: same weights, the position-embedding grid resized (4x4 -> 6x6)
    bigger = load_encoder("clip", str(folder), 48)
    table = bigger.embedding.position_embedding.embeddings.numpy()
    assert table.shape == (1 + 36, 48)
    np.testing.assert_array_equal(table[0], original.embedding.position_embedding.embeddings.numpy()[0])
    np.testing.assert_array_equal(
        bigger.get_layer("encoder_block_1").get_weights()[0], original.get_layer("encoder_block_1").get_weights()[0]
    )
    # random initialisation from an explicit config: position ids 0..n, not keras-hub's zeros
    fresh = load_encoder("clip", None, SIZE, TINY_CLIP)
    assert fresh.embedding.position_ids.numpy().tolist() == [list(range(17))]
    with pytest.raises(ConfigError, match="save_to_preset"):
        load_encoder("clip", str(folder.parent / "missing"), SIZE)
    with pytest.raises(ConfigError, match="model.weights=/models/clip_vit_base_patch16"):
        load_encoder("clip", "clip_vit_base_patch16_no_such_preset", SIZE)
    with pytest.raises(ConfigError, match="ViTBackbone"):
        load_encoder("vit", str(folder), SIZE)
    with pytest.raises(ConfigError, match="both set"):
        load_encoder("clip", str(folder), SIZE, TINY_CLIP)


def _two_eye_data(n, seed):
    """Patients whose label C (cataract haze) is on if either eye has it."""
    left, yl = make_arrays(n, size=SIZE, labels=("C",), prevalence=0.3, seed=seed)
    right, yr = make_arrays(n, size=SIZE, labels=("C",), prevalence=0.3, seed=seed + 100)
    return {"left_image": left.astype("float32"), "right_image": right.astype("float32")}, np.maximum(yl, yr)


def _compile(model, lr=3e-3):
    model.compile(
        keras.optimizers.Adam(lr),
        loss={"probabilities": keras.losses.BinaryCrossentropy(), "embedding": ShadowLoss(0.5)},
        loss_weights={"probabilities": 1.0, "embedding": 0.5},
    )


@pytest.fixture(scope="module")
def trained(preset, tmp_path_factory):
    folder, _ = preset
    keras.utils.set_random_seed(0)
    model = build_clip_lora(1, image_size=SIZE, weights=str(folder), two_eye=True, lora_rank=4, lora_alpha=8)
    frozen = {v.path: v.numpy().copy() for v in model.weights if not v.trainable}
    lora_before = {v.path: v.numpy().copy() for v in model.trainable_weights}
    x, y = _two_eye_data(120, seed=1)
    xv, yv = _two_eye_data(50, seed=2)
    _compile(model)
    model.fit(x, {"probabilities": y, "embedding": y}, epochs=12, batch_size=16, verbose=0)
    return model, frozen, lora_before, (xv, yv), tmp_path_factory.mktemp("adapters")


def test_lora_model_learns_and_frozen_weights_stay_bit_identical(trained):
    model, frozen, lora_before, (xv, yv), _ = trained
    assert sorted(model.output) == ["embedding", "probabilities"]
    auroc = roc_auc_score(yv[:, 0], model.predict(xv, verbose=0)["probabilities"][:, 0])
    assert auroc > 0.9, auroc
    trainable = [v.path for v in model.trainable_weights]
    assert sorted(p.rsplit("/", 1)[-1] for p in trainable) == sorted(
        ["bias", "kernel"] + ["lora_kernel_a", "lora_kernel_b"] * 4
    )
    assert len(frozen) > 20
    changed = [v.path for v in model.weights if not v.trainable and not np.array_equal(frozen[v.path], v.numpy())]
    assert not changed, changed  # every frozen weight (kernels, biases, norms, embeddings) untouched
    moved = [
        p
        for p, before in lora_before.items()
        if not np.array_equal(before, next(v for v in model.trainable_weights if v.path == p).numpy())
    ]
    assert sorted(moved) == sorted(lora_before)  # and every LoRA factor / head weight trained
    share = lora_parameter_count(model.get_layer("encoder"))
    # 2 blocks x (q, v) x (A: hidden x r, B: r x hidden), the paper's rank-r update
    assert share["lora_parameters"] == 2 * 2 * (48 * 4 + 4 * 48) == share["textbook_lora_parameters"]


def test_lora_update_is_the_papers_rank_r_matrix_and_per_head_is_keras():
    """A LoRA query projection computes x (W + alpha/r A B) + b with W seen as a
    hidden x hidden matrix (checked in NumPy); ``lora_per_head`` keeps Keras' own
    factorisation, heads times larger."""
    keras.utils.set_random_seed(0)
    model = build_clip_lora(1, image_size=SIZE, encoder_config=TINY_CLIP, lora_rank=4, lora_alpha=8)
    query = lora_layers(model.get_layer("encoder"), ["query"])[0]
    assert query.lora_kernel_a.shape == (48, 4) and query.lora_kernel_b.shape == (4, 2, 24)
    query.lora_kernel_b.assign(np.random.default_rng(1).normal(size=(4, 2, 24)) * 0.1)
    x = np.random.default_rng(2).normal(size=(3, 5, 48)).astype("float32")
    kernel = query._kernel.numpy().reshape(48, 48)
    update = query.lora_kernel_a.numpy() @ query.lora_kernel_b.numpy().reshape(4, 48)
    expected = x @ (kernel + (8 / 4) * update) + query.bias.numpy().reshape(48)
    np.testing.assert_allclose(np.asarray(query(x)).reshape(3, 5, 48), expected, atol=1e-5)
    assert not np.allclose(expected, x @ kernel + query.bias.numpy().reshape(48), atol=1e-2)  # the update counts
    per_head = build_clip_lora(
        1, image_size=SIZE, encoder_config=TINY_CLIP, lora_rank=4, lora_alpha=8, lora_per_head=True
    )
    query = lora_layers(per_head.get_layer("encoder"), ["query"])[0]
    assert type(query) is keras.layers.EinsumDense
    assert query.lora_kernel_a.shape == (48, 2, 4) and query.lora_kernel_b.shape == (4, 24)
    count = lora_parameter_count(per_head.get_layer("encoder"))
    assert count["lora_parameters"] == 2 * 2 * (48 * 2 * 4 + 4 * 24) > count["textbook_lora_parameters"]


def test_adapters_round_trip_exactly_and_refuse_a_mismatch(trained, preset):
    model, _, _, (xv, _), tmp = trained
    path = save_adapters(model, tmp / "adapter.npz", {"labels": ["C"]})
    assert path.stat().st_size < 30_000  # small: LoRA factors and head only
    fresh = build_clip_lora(1, image_size=SIZE, weights=str(preset[0]), two_eye=True, lora_rank=4, lora_alpha=8)
    assert not np.allclose(fresh.predict(xv, verbose=0)["probabilities"], model.predict(xv, verbose=0)["probabilities"])
    meta = load_adapters(fresh, path)
    assert meta["labels"] == ["C"]
    for key in ("probabilities", "embedding"):
        np.testing.assert_array_equal(fresh.predict(xv, verbose=0)[key], model.predict(xv, verbose=0)[key])
    other = build_clip_lora(1, image_size=SIZE, weights=str(preset[0]), two_eye=True, lora_rank=2, lora_alpha=8)
    with pytest.raises(ConfigError, match="rank"):
        load_adapters(other, path)


def test_merged_model_equals_lora_model_and_exports(trained, tmp_path):
    from kfundus.deploy.saved_model import export_bundle, run_saved_model
    from kfundus.deploy.tflite import has_flex_ops, run_tflite

    model, _, _, (xv, _), _ = trained
    merged = merge_lora(model)
    assert not any("lora" in v.path for v in merged.weights)
    assert (
        merged.count_params()
        == model.count_params() - lora_parameter_count(model.get_layer("encoder"))["lora_parameters"]
    )
    sample = {k: v[:4] for k, v in xv.items()}
    for key in ("probabilities", "embedding"):
        np.testing.assert_allclose(
            merged.predict(sample, verbose=0)[key], model.predict(sample, verbose=0)[key], atol=1e-5
        )
    paths = export_bundle(
        merged,
        tmp_path / "bundle",
        labels={"probabilities": ["C"]},
        formats=("saved_model", "tflite"),
        sample_inputs=sample,
    )
    # export_bundle itself fails on a Flex op or a parity error > 1e-4; checked here again
    # against the un-merged LoRA model
    assert not has_flex_ops(paths["tflite"])
    reference = model.predict(sample, verbose=0)
    for name, run in (("saved_model", run_saved_model), ("tflite", run_tflite)):
        got = run(paths[name], sample)
        for key in ("probabilities", "embedding"):
            np.testing.assert_allclose(got[key], reference[key], atol=1e-4, err_msg=f"{name} {key}")


def test_per_eye_vit_variant_full_finetune_and_token_gradcam():
    """Per-eye ViT: one input; lora_rank=0 fine-tunes only the last block; the ViT
    Grad-CAM points at a square the model learned to detect."""
    from kfundus.explain import GradCAM, TokenGradCAM

    keras.utils.set_random_seed(1)
    model = build_vit(1, image_size=SIZE, encoder_config=TINY_VIT, lora_rank=0, trainable_blocks=1, dropout=0)
    assert [t.name for t in model.inputs] == ["image"]
    trainable = {v.path.split("/")[1] if "/" in v.path else v.path for v in model.trainable_weights}
    assert any("transformer_block_2" in v.path for v in model.trainable_weights)
    assert not any("transformer_block_1/" in v.path for v in model.trainable_weights), trainable
    lora = build_vit(1, image_size=SIZE, encoder_config=TINY_VIT, lora_rank=2, lora_targets=["mlp"])
    assert sorted({v.path.rsplit("/", 2)[-2] for v in lora.trainable_weights} - {"logits"}) == ["dense_1", "dense_2"]

    # a bright square in one of the 16 patches is the label; its position varies
    rng = np.random.default_rng(0)
    n = 240
    x = rng.uniform(0, 120, (n, SIZE, SIZE, 3)).astype("float32")
    y = (rng.uniform(size=n) < 0.5).astype("float32")[:, None]
    where = rng.integers(0, 4, (n, 2)) * 8
    for i in np.flatnonzero(y[:, 0]):
        x[i, where[i, 0] : where[i, 0] + 8, where[i, 1] : where[i, 1] + 8] = 250
    positives = np.flatnonzero(y[200:, 0]) + 200
    # Which evidence a tiny model learns depends on its initial weights: over seeds 0-5 (measured
    # in fresh processes) the maps pointed at the square's patch in 3 (pointing 1.0, energy share
    # about 0.6) and away from it in 3 (pointing 0: there the square raises the logit through
    # tokens whose gradient x activation is negative, which the ReLU drops). So the test trains
    # several seeds and asks that the explainer finds the square on a model that looks at it;
    # with the map taken on a deeper layer no seed would (share 0.002 on the last block's input).
    pointing = []
    for seed in (1, 2, 3, 4):
        keras.utils.set_random_seed(seed)
        clip = build_clip_lora(
            1,
            image_size=SIZE,
            encoder_config=TINY_CLIP,
            lora_rank=8,
            lora_alpha=16,
            lora_targets=["attention", "mlp"],
            dropout=0,
        )
        _compile(clip, lr=3e-3)
        clip.fit(x[:200], {"probabilities": y[:200], "embedding": y[:200]}, epochs=10, batch_size=20, verbose=0)
        probs = clip.predict(x[200:], verbose=0)["probabilities"][:, 0]
        assert roc_auc_score(y[200:, 0], probs) > 0.9
        explainer = GradCAM(clip)
        assert isinstance(explainer, TokenGradCAM)
        maps = explainer(x[positives], 0)
        assert maps.shape == (len(positives), SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1
        np.testing.assert_allclose(explainer.predict(x[positives]), probs[positives - 200][:, None], atol=1e-5)
        hottest = [np.unravel_index(np.argmax(m), m.shape) for m in maps]
        pointing.append(
            np.mean([r <= i < r + 8 and c <= j < c + 8 for (i, j), (r, c) in zip(hottest, where[positives])])
        )
        if pointing[-1] > 0.9:
            inside = [m[r : r + 8, c : c + 8].sum() / max(m.sum(), 1e-9) for m, (r, c) in zip(maps, where[positives])]
            assert np.mean(inside) > 3 * (64 / SIZE**2), np.mean(inside)  # energy share > 3x the square's area
            break
    assert max(pointing) > 0.9, pointing


def test_sweep_trains_evaluates_and_compares(tmp_path):
    """Two cells through the real CLI path (train + evaluate), patient-level ODIR layout:
    a comparison table and, per cell, the official ODIR score and submission CSV."""
    from kfundus.cli import main

    data = make_odir(tmp_path / "data", n_patients=60, size=64, seed=4, write_masks=False)
    out = tmp_path / "sweep"
    tiny = json.dumps(TINY_CLIP).replace('"', "")
    args = [
        "sweep",
        "--config",
        "odir_clip_lora_shadow",
        "--data",
        str(data),
        "--out",
        str(out),
        "--grid",
        "model.options.lora_rank=2,4",
        "--grid",
        "train.loss_options.margin=0.3",
        "--set",
        "model.weights=null",
        "--set",
        f"model.options.encoder_config={tiny}",
        "--set",
        f"data.image_size={SIZE}",
        "--set",
        "train.epochs=2",
        "--set",
        "train.learning_rate=0.003",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--set",
        "data.split.test=0.3",
    ]
    assert main(args) == 0
    table = pd.read_csv(out / "comparison.csv")
    assert table["lora_rank"].tolist() == [2, 4] and table["margin"].tolist() == [0.3, 0.3]
    for column in ("odir_kappa", "odir_f1", "odir_auc", "odir_final", "macro_auroc"):
        assert table[column].notna().all(), column
    assert "| lora_rank |" in (out / "comparison.md").read_text() and (out / "comparison.png").stat().st_size > 0
    for run in table["run"]:
        report = out / run / "eval-test"
        submission = pd.read_csv(report / "odir_submission.csv")
        assert list(submission.columns) == ["ID", "N", "D", "G", "C", "A", "H", "M", "O"]
        metrics = json.loads((report / "metrics.json").read_text())
        assert set(metrics["odir"]) >= {"kappa", "f1", "auc", "final"} and len(submission) == metrics["rows"]
        per_class = pd.read_csv(report / "per_class.csv")
        assert "auroc" in per_class.columns
    assert main(args) == 0  # a second run reuses the finished cells
