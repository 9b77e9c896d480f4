"""RETFound in Keras: conversion parity with timm (the reference outputs were written by
timm's VisionTransformer in the torch venv, tests/fixtures/foundation/make_fixtures.py),
position tables resized as RETFound does, wrong checkpoints named, layer-wise learning-rate
decay against a hand computation, the model learning a synthetic lesion with decay and drop
path, the transfer backbone, the convert command and the export."""

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from kfundus.config import BackboneSpec, TrainConfig, load_config
from kfundus.convert import convert
from kfundus.engine.optimizers import LayerDecayAdamW, make_optimizer
from kfundus.errors import ConfigError, DataError
from kfundus.systems.retfound import DropPath, RETFoundBackbone, build_retfound, build_retfound_features
from kfundus.systems.retfound.objective import retfound_param_groups

FIXTURES = Path(__file__).parent / "fixtures" / "foundation" / "retfound"
TOL = 1e-4
TINY = {"patch_size": 8, "hidden_dim": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 128}


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURES / "reference.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny fixtures converted once: MAE pre-training (avg and token pooling), the
    fine-tuned classifier (.pth and Hugging Face folder) and a class-token classifier."""
    out = tmp_path_factory.mktemp("retfound")
    return {
        "mae": convert("retfound", FIXTURES / "mae_pretrain.pth", out / "mae", num_heads=4),
        "mae_token": convert(
            "retfound", FIXTURES / "mae_pretrain.pth", out / "mae_token", num_heads=4, pooling="token"
        ),
        "finetuned": convert("retfound", FIXTURES / "finetuned.pth", out / "finetuned", num_heads=4),
        "hf": convert("retfound", FIXTURES / "hf", out / "hf"),  # heads from its config.json
        "token": convert("retfound", FIXTURES / "finetuned_token.pth", out / "token", num_heads=4, pooling="token"),
    }


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("size", [32, 48, 16])
@pytest.mark.parametrize("pooling", ["avg", "token"])
def test_features_equal_timm_at_native_and_resized_sizes(converted, ref, size, pooling):
    """The MAE checkpoint's features (avg: patch mean + a fresh fc_norm, as RETFound's fine-tuning
    starts; token: norm + class token) at the checkpoint's 32 px and at 48 / 16 px (position
    table resized bicubically, up and down, as RETFound's interpolate_pos_embed)."""
    folder = converted["mae" if pooling == "avg" else "mae_token"]
    model = build_retfound_features(str(folder), size, pooling=pooling)
    features = model.predict(ref[f"images_{size}"], verbose=0)
    assert max_diff(features, ref[f"mae_{pooling}_features_{size}"]) < TOL


@pytest.mark.parametrize("name", ["finetuned", "hf"])
def test_classifier_logits_equal_timm(converted, ref, name):
    """A fine-tuned RETFound ({"model": sd} .pth, and the same keys in a Hugging Face folder):
    features and logits of the converted classifier, with the checkpoint's head."""
    model = build_retfound(3, image_size=32, weights=str(converted[name]), head="checkpoint", activation="linear")
    assert max_diff(model.predict(ref["images_32"], verbose=0), ref["finetuned_logits"]) < TOL
    features = build_retfound_features(str(converted[name]), 32).predict(ref["images_32"], verbose=0)
    assert max_diff(features, ref["finetuned_features"]) < TOL
    softmax = build_retfound(3, image_size=32, weights=str(converted[name]), head="checkpoint")
    expected = np.exp(ref["finetuned_logits"]) / np.exp(ref["finetuned_logits"]).sum(1, keepdims=True)
    assert max_diff(softmax.predict(ref["images_32"], verbose=0), expected) < TOL


def test_class_token_classifier(converted, ref):
    model = build_retfound(
        2, image_size=32, weights=str(converted["token"]), head="checkpoint", activation="linear", pooling="token"
    )
    assert max_diff(model.predict(ref["images_32"], verbose=0), ref["finetuned_token_logits"]) < TOL


def test_conversion_report(converted):
    record = json.loads((converted["mae"] / "conversion.json").read_text())
    assert record["wrapper"] == "model"
    assert "mask_token" in record["ignored_keys"] and "decoder_pred.weight" in record["ignored_keys"]
    assert {"norm.weight", "norm.bias"} <= set(record["ignored_keys"])  # RETFound deletes norm for global pooling
    assert record["details"]["fc_norm"].startswith("identity")
    assert record["details"]["architecture"] == TINY
    token = json.loads((converted["mae_token"] / "conversion.json").read_text())
    assert "norm.weight" not in token["ignored_keys"]
    tuned = json.loads((converted["finetuned"] / "conversion.json").read_text())
    assert tuned["details"]["head_classes"] == 3 and tuned["details"]["fc_norm"] == "from the checkpoint"
    saved = keras.saving.load_model(converted["finetuned"] / "encoder.keras")  # a usable feature extractor
    assert saved.output.shape == (None, 32)


# ---------------------------------------------------------------------------
# wrong checkpoints


def write_safetensors(path: Path, tensors: dict) -> Path:
    """A .safetensors file written by hand (header length, JSON header, raw buffers)."""
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(array)), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    return path


def test_wrong_checkpoints_are_named(tmp_path):
    flair = {
        "vision_model.model.conv1.weight": np.zeros((64, 3, 7, 7)),
        "vision_model.model.layer1.0.conv1.weight": np.zeros((64, 64, 1, 1)),
        "text_model.model.embeddings.word_embeddings.weight": np.zeros((30, 8)),
        "text_model.model.encoder.layer.0.attention.self.query.weight": np.zeros((8, 8)),
    }
    path = write_safetensors(tmp_path / "flair_resnet.safetensors", flair)
    with pytest.raises(DataError) as error:
        convert("retfound", path, tmp_path / "out")
    message = str(error.value)
    assert "flair_resnet.safetensors is not a RETFound (MAE ViT, timm layout) checkpoint" in message
    assert "missing key(s): blocks.0.attn.qkv.weight, patch_embed.proj.weight" in message
    assert "looks like a FLAIR checkpoint" in message and "kfundus convert --from flair" in message

    from kfundus.convert import read_state_dict

    state = read_state_dict(FIXTURES / "finetuned.pth")
    del state["blocks.1.mlp.fc2.weight"]
    truncated = write_safetensors(tmp_path / "cut.safetensors", state)
    with pytest.raises(DataError, match=r"cut\.safetensors is not a RETFound.*1 missing key\(s\): blocks\.1\.mlp\.fc2"):
        convert("retfound", truncated, tmp_path / "out2", num_heads=4)


def test_pooling_must_match_the_checkpoint(tmp_path):
    with pytest.raises(DataError, match=r"missing key\(s\): norm\.bias, norm\.weight.*--set pooling=avg"):
        convert("retfound", FIXTURES / "finetuned.pth", tmp_path / "a", num_heads=4, pooling="token")
    with pytest.raises(DataError, match="fine-tuned on the class token.*--set pooling=token"):
        convert("retfound", FIXTURES / "finetuned_token.pth", tmp_path / "b", num_heads=4)
    with pytest.raises(ConfigError, match=r"number of attention heads is not in the weights.*--set num_heads="):
        convert("retfound", FIXTURES / "finetuned.pth", tmp_path / "c")


def test_builder_errors(converted):
    with pytest.raises(ConfigError, match="head has 3 classes, the task has 2"):
        build_retfound(2, image_size=32, weights=str(converted["finetuned"]), head="checkpoint")
    with pytest.raises(ConfigError, match="no fine-tuned head"):
        build_retfound(2, image_size=32, weights=str(converted["mae"]), head="checkpoint")
    with pytest.raises(ConfigError, match="converted with pooling=avg"):
        build_retfound(2, image_size=32, weights=str(converted["mae"]), pooling="token")
    with pytest.raises(ConfigError, match="not a multiple of the encoder's patch size 8"):
        build_retfound(2, image_size=36, weights=str(converted["mae"]))
    with pytest.raises(ConfigError, match="is a checkpoint file, not a converted folder"):
        build_retfound(2, image_size=32, weights=str(FIXTURES / "finetuned.pth"))


# ---------------------------------------------------------------------------
# layer-wise learning-rate decay


def test_layer_decay_step_is_the_hand_computation():
    """One LayerDecayAdamW step on three variables: multipliers 1, 0.65^2 and 0.65^3, decay
    on two of them, compared with AdamW written out by hand (torch.optim.AdamW's order: decay
    at the scaled rate, then the Adam update at the scaled rate)."""
    lr, wd, b1, b2, eps = 0.01, 0.05, 0.9, 0.999, 1e-7
    values = {"head": np.array([[0.5, -1.0]]), "block": np.array([[2.0, 0.3]]), "bias": np.array([1.5, -0.5])}
    grads = {"head": np.array([[0.2, -0.1]]), "block": np.array([[-0.3, 0.05]]), "bias": np.array([0.4, 0.01])}
    multipliers = {"head": 1.0, "block": 0.65**2, "bias": 0.65**3}
    variables = {k: keras.Variable(v.astype("float32"), name=k) for k, v in values.items()}
    optimizer = LayerDecayAdamW(
        lr,
        weight_decay=wd,
        lr_multipliers={variables[k].path: m for k, m in multipliers.items()},
        no_weight_decay=[variables["bias"].path],
        beta_1=b1,
        beta_2=b2,
        epsilon=eps,
    )
    optimizer.apply_gradients([(grads[k].astype("float32"), variables[k]) for k in values])
    for key, w in values.items():
        g, rate = grads[key], lr * multipliers[key]
        decayed = w - rate * (0 if key == "bias" else wd) * w
        m, v = (1 - b1) * g, (1 - b2) * g**2
        expected = decayed - rate * np.sqrt(1 - b2) / (1 - b1) * m / (np.sqrt(v) + eps)
        np.testing.assert_allclose(variables[key].numpy(), expected, rtol=1e-5, atol=1e-7, err_msg=key)
    config = optimizer.get_config()
    again = LayerDecayAdamW.from_config(config)  # serializable
    assert again.lr_multipliers == optimizer.lr_multipliers and again.layer_weight_decay == wd


def test_param_groups_follow_retfounds_lr_decay():
    """util/lr_decay.py with num_layers = depth + 1: patch embedding, class token and
    position table get decay^(depth+1), block i decay^(depth-i), fc_norm and head decay^0;
    no weight decay on 1-D variables, the class token and the position table."""
    model = build_retfound(2, image_size=32, encoder_config=TINY, drop_path=0.1)
    groups = retfound_param_groups(model)
    assert set(groups) == {v.path for v in model.weights}
    depth = {p: d for p, (d, _) in groups.items()}
    assert depth["patch_embed/kernel"] == depth["embeddings/cls_token"] == depth["embeddings/pos_embed"] == 3
    assert depth["blocks_0/attn/query/kernel"] == depth["blocks_0/norm1/gamma"] == 2
    assert depth["blocks_1/fc2/kernel"] == 1
    assert depth["pooling/fc_norm/gamma"] == depth["logits/kernel"] == 0
    decayed = sorted(p for p, (_, decay) in groups.items() if decay and "seed_generator" not in p)
    assert decayed == sorted(
        ["patch_embed/kernel", "logits/kernel"]
        + [f"blocks_{i}/{k}/kernel" for i in range(2) for k in ("attn/query", "attn/key", "attn/value")]
        + [f"blocks_{i}/{k}/kernel" for i in range(2) for k in ("attn/attention_output", "fc1", "fc2")]
    )
    train = TrainConfig(optimizer="adamw", learning_rate=1e-3, weight_decay=0.05, layer_decay=0.65)
    optimizer = make_optimizer(train, 10, groups)
    assert isinstance(optimizer, LayerDecayAdamW)
    assert optimizer.lr_multipliers["patch_embed/kernel"] == pytest.approx(0.65**3)
    assert optimizer.lr_multipliers["blocks_1/fc1/bias"] == pytest.approx(0.65)
    assert "embeddings/pos_embed" in optimizer.no_weight_decay
    with pytest.raises(ConfigError, match="has no layer depths.*--set train.layer_decay=null"):
        make_optimizer(train, 10, None)
    with pytest.raises(ConfigError, match="applied by AdamW"):
        make_optimizer(TrainConfig(optimizer="adam", layer_decay=0.65), 10, groups)


def test_drop_path_is_per_sample_stochastic_depth():
    layer = DropPath(0.3, seed=1)
    x = np.ones((4000, 3, 2), "float32")
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    kept = y[:, 0, 0] > 0
    assert abs(1 - kept.mean() - 0.3) < 0.03  # about 30 % of the samples dropped
    assert np.allclose(y[kept], 1 / 0.7) and np.all(y[~kept] == 0)  # whole samples, survivors rescaled
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)
    backbone = RETFoundBackbone(image_size=16, drop_path=0.2, **{**TINY, "num_layers": 5})
    rates = [backbone.get_layer(f"blocks_{i}").drop_path for i in range(5)]
    np.testing.assert_allclose(rates, [0.0, 0.05, 0.1, 0.15, 0.2])  # timm: linspace(0, rate, depth)


def square_data(n, seed, size=32):
    """A bright 8x8 square somewhere in the image is the label."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 120, (n, size, size, 3)).astype("float32")
    y = (rng.uniform(size=n) < 0.5).astype("float32")
    where = rng.integers(0, size // 8, (n, 2)) * 8
    for i in np.flatnonzero(y):
        x[i, where[i, 0] : where[i, 0] + 8, where[i, 1] : where[i, 1] + 8] = 250
    return x, np.stack([1 - y, y], axis=1), where


def test_learns_through_the_engine_with_layer_decay_and_drop_path(tmp_path):
    """The RETFound recipe on a tiny ViT (random start): softmax with label smoothing,
    layer decay 0.65, drop path 0.1, AdamW through kfundus.engine.fit; it learns the square."""
    import tensorflow as tf

    from kfundus.data.manifest import Manifest
    from kfundus.engine import fit
    from kfundus.systems import make_objective

    config = load_config(
        "retfound_finetune",
        [
            "train.epochs=8",
            "train.warmup_epochs=1",
            "train.learning_rate=0.002",
            "train.batch_size=20",
            "model.options.drop_path=0.1",
        ],
    )
    x, y, where = square_data(240, 0)
    frame = pd.DataFrame({"none": y[:, 0], "square": y[:, 1]})
    manifest = Manifest(frame=frame, labels=["none", "square"], task="multiclass", name="squares")
    objective = make_objective(config, manifest, y[:200])
    assert objective.loss.get_config()["label_smoothing"] == 0.1
    data = tf.data.Dataset.from_tensor_slices((x[:200], y[:200])).shuffle(200, seed=0).batch(20)
    val = tf.data.Dataset.from_tensor_slices((x[200:], y[200:])).batch(20)
    result = fit(
        lambda: build_retfound(2, image_size=32, encoder_config=TINY, drop_path=0.1),
        objective,
        data,
        val,
        config.train,
        train_rows=200,
        val_rows=40,
    )
    assert isinstance(result.model.optimizer, LayerDecayAdamW)
    assert result.model.optimizer.lr_multipliers["blocks_0/fc1/kernel"] == pytest.approx(0.65**2)
    probs = result.model.predict(x[200:], verbose=0)[:, 1]
    assert roc_auc_score(y[200:, 1], probs) > 0.9
    # Grad-CAM on the patch-token grid points at the square the model learned
    from kfundus.explain import GradCAM, TokenGradCAM

    explainer = GradCAM(result.model)
    assert isinstance(explainer, TokenGradCAM)
    positives = np.flatnonzero(y[200:, 1]) + 200
    maps = explainer(x[positives], 1)
    cells = maps.reshape(len(maps), 4, 8, 4, 8).sum(axis=(2, 4))  # map energy per 8x8 patch
    hottest = cells.reshape(len(maps), -1).argmax(axis=1)
    square = (where[positives] // 8) @ np.array([4, 1])
    assert np.mean(hottest == square) > 0.25  # chance: 1 / 16 (measured: 0.43)


# ---------------------------------------------------------------------------
# transfer backbone, command line, export


def test_transfer_backbone_is_the_converted_encoder(converted, ref):
    from kfundus.workflows.transfer import build_extractor

    spec = BackboneSpec(name="retfound", family="retfound", weights=str(converted["mae"]))
    extractor = build_extractor(spec, 48)
    assert max_diff(extractor.predict(ref["images_48"], verbose=0), ref["mae_avg_features_48"]) < TOL
    config = load_config(
        None, ["workflow=transfer", f"transfer.backbones=[{{name: retfound, weights: {converted['mae']}}}]"]
    )
    assert config.transfer.backbones[0].name == "retfound"


def test_convert_command(tmp_path, capsys):
    from kfundus.cli import main

    out = tmp_path / "cli"
    code = main(
        ["convert", "--from", "retfound", str(FIXTURES / "mae_pretrain.pth"), "--out", str(out), "--set", "num_heads=4"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"-> {out}" in printed and "dropped 22 checkpoint key(s) on purpose" in printed
    assert (out / "encoder.keras").is_file() and (out / "conversion.json").is_file()
    code = main(["convert", "--from", "retfound", str(FIXTURES / "finetuned.pth"), "--out", str(tmp_path / "x")])
    assert code == 2
    assert "--set num_heads=" in capsys.readouterr().err


def test_saves_loads_and_exports_within_tolerance(converted, ref, tmp_path):
    """A converted classifier survives .keras, and its SavedModel and float32 TFLite match
    Keras within the exporter's tolerance (the exporter checks it and records it)."""
    from kfundus.deploy import export_bundle, run_saved_model, run_tflite
    from kfundus.systems import load_model

    model = build_retfound(3, image_size=32, weights=str(converted["finetuned"]), head="checkpoint")
    expected = model.predict(ref["images_32"], verbose=0)
    model.save(tmp_path / "model.keras")
    np.testing.assert_allclose(
        load_model(tmp_path / "model.keras").predict(ref["images_32"], verbose=0), expected, atol=1e-6
    )
    export_bundle(
        model,
        tmp_path / "bundle",
        labels=["a", "b", "c"],
        formats=("saved_model", "tflite"),
        tflite_variants=("float32", "float16"),
        check=True,
        sample_inputs={"image": ref["images_32"]},
    )
    card = json.loads((tmp_path / "bundle" / "model_card.json").read_text())
    assert card["parity"]["saved_model_max_abs_diff"]["probabilities"] < 1e-4
    assert card["parity"]["tflite_max_abs_diff"]["probabilities"] < 1e-4
    saved = run_saved_model(tmp_path / "bundle" / "saved_model", {"image": ref["images_32"]})
    assert max_diff(saved["probabilities"], expected) < 1e-4
    lite = run_tflite(tmp_path / "bundle" / "model.tflite", {"image": ref["images_32"]})
    assert max_diff(lite["probabilities"], expected) < 1e-4
    half = run_tflite(tmp_path / "bundle" / "model_float16.tflite", {"image": ref["images_32"]})
    assert max_diff(half["probabilities"], expected) < 1e-2
