"""RET-CLIP (issue 6): the tripartite loss against a hand computation, pre-training on
synthetic image-report pairs (retrieval far above chance), the vision preset reloading to
identical embeddings, zero-shot classification."""

import json

import keras
import numpy as np
import pytest

from kfundus.config import load_config
from kfundus.errors import ConfigError
from kfundus.systems.clip_lora.encoders import load_encoder, token_pooling
from kfundus.systems.retclip.model import (
    BRANCHES,
    TINY_TEXT,
    EndTokenPooling,
    build_retclip,
    embedding_models,
    load_text_encoder,
    logit_scales,
)
from kfundus.systems.retclip.objective import retclip_objective
from kfundus.workflows.pretrain import pretrain, retrieval_metrics

TINY_VISION = dict(patch_size=8, hidden_dim=32, num_layers=2, num_heads=2, intermediate_dim=64)


def tiny_model(size=32, vocab=40, length=10, embed=16):
    return build_retclip(
        image_size=size,
        vocabulary_size=vocab,
        sequence_length=length,
        vision_config=TINY_VISION,
        text_config=TINY_TEXT,
        embed_dim=embed,
    )


def random_batch(n, size=32, vocab=40, length=10, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, length + 1, n)
    mask = np.arange(length)[None] < lengths[:, None]
    return {
        "left_image": rng.uniform(0, 255, (n, size, size, 3)).astype("float32"),
        "right_image": rng.uniform(0, 255, (n, size, size, 3)).astype("float32"),
        "token_ids": np.where(mask, rng.integers(1, vocab, (n, length)), 0).astype("int32"),
        "padding_mask": mask,
    }


def log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_tripartite_loss_equals_hand_computation():
    model = tiny_model()
    objective = retclip_objective()
    loss, weights = objective.loss, objective.loss_weights
    model.compile(optimizer="adam", loss=loss, loss_weights=weights)
    layer = model.get_layer("logit_scales")
    layer.log_scales.assign(np.log([5.0, 1000.0, 20.0]).astype("float32"))  # the right branch hits the clamp
    assert logit_scales(model) == pytest.approx({"left": 5.0, "right": 100.0, "patient": 20.0}, rel=1e-5)

    n = 5
    x = random_batch(n)
    towers = embedding_models(model)
    z = towers["image"].predict([x["left_image"], x["right_image"]], verbose=0)
    t = towers["text"].predict([x["token_ids"], x["padding_mask"]], verbose=0)
    for emb in (*z.values(), *t.values()):
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    want = 0.0
    for branch, scale in zip(BRANCHES, (5.0, 100.0, 20.0)):
        logits = scale * z[f"z_{branch}"].astype("float64") @ t[f"t_{branch}"].astype("float64").T
        rows = -np.diag(log_softmax(logits, 1)).mean()
        cols = -np.diag(log_softmax(logits, 0)).mean()
        want += 0.5 * (rows + cols)
    got = model.evaluate(x, {b: np.arange(n) for b in BRANCHES}, batch_size=n, verbose=0, return_dict=True)
    assert got["loss"] == pytest.approx(want, rel=1e-4)
    assert want > 0.5  # not a degenerate batch


def test_end_token_pooling_picks_the_last_real_token():
    rng = np.random.default_rng(1)
    sequence = rng.normal(size=(3, 6, 4)).astype("float32")
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], bool)
    got = np.asarray(EndTokenPooling()(sequence, mask))
    np.testing.assert_array_equal(got, sequence[[0, 1, 2], [2, 5, 1]])


def test_text_preset_offline_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="text_weights|text preset"):
        load_text_encoder(str(tmp_path / "no_such_preset"), None, 100, 16)
    with pytest.raises(ConfigError, match="both set"):
        load_text_encoder("bert_base_en", {"num_layers": 2}, 100, 16)


def test_retrieval_metrics_against_brute_force():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(12, 5))
    text = image + rng.normal(0, 0.8, image.shape)
    reports = ["a", "b", "c", "a", "d", "e", "f", "g", "h", "b", "i", "j"]
    got = retrieval_metrics(image, text, reports, ks=(1, 5))
    sim = image @ text.T
    for k in (1, 5):
        hits = [any(reports[j] == reports[i] for j in np.argsort(-sim[i])[:k]) for i in range(12)]
        assert got[f"image_to_text_recall@{k}"] == pytest.approx(np.mean(hits))
        hits = [any(reports[i] == reports[j] for i in np.argsort(-sim[:, j])[:k]) for j in range(12)]
        assert got[f"text_to_image_recall@{k}"] == pytest.approx(np.mean(hits))
    # chance of recall@1: the share of texts equal to the query's own
    assert got["chance@1"] == pytest.approx(np.mean([reports.count(r) / 12 for r in reports]))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Synthetic ODIR patients with normal or cataract eyes (the finding a 32 px image
    shows; glaucoma's cup needs more pixels): four reports ("left eye: cataract. right eye:
    normal fundus." and its mirror, both, neither), so matching needs both eyes, in order."""
    from kfundus.data.synthetic import make_odir

    root = tmp_path_factory.mktemp("retclip")
    make_odir(
        root / "data",
        n_patients=200,
        size=64,
        seed=3,
        prevalence={"N": 0.4, "C": 1.0, "D": 0, "G": 0, "A": 0, "H": 0, "M": 0, "O": 0},
    )
    config = load_config(
        "retclip_pretrain",
        [
            "data.image_size=32",
            f"data.cache_dir={root / 'cache'}",
            "data.split.val=0.2",
            "data.split.test=0.2",
            f"model.options.vision_config={json.dumps(TINY_VISION)}",
            f"model.options.text_config={json.dumps(TINY_TEXT)}",
            "model.options.embed_dim=32",
            "text.sequence_length=24",
            "text.vocabulary_size=200",
            "data.augment={}",  # the shipped config augments; 20 short epochs on 120 patients learn faster without
            "train.epochs=20",
            "train.batch_size=32",
            "train.learning_rate=1e-3",
            "train.warmup_epochs=1",
            'zero_shot.prompts={normal: ["{eye} eye: normal fundus."], cataract: ["{eye} eye: cataract."]}',
            "zero_shot.labels={normal: N, cataract: C}",
        ],
    )
    run = pretrain(config, root / "data", root / "run")
    return run, load_config(run / "config.yaml")


def test_pretraining_retrieves_and_classifies_held_out_patients(pretrained):
    """After 20 short epochs, on the 80 held-out patients (val + test)."""
    from kfundus.run import RunFolder
    from kfundus.workflows.pretrain import embed_pairs, load_pretrained, prepare_pairs, zero_shot

    run, config = pretrained
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"val", "test"} and (run / "metrics.md").exists()
    model, packer, _ = load_pretrained(run)
    everything = RunFolder(run).split_manifest("all")
    table = RunFolder(run).read_splits()
    held_out = prepare_pairs(config, everything.subset((table["split"] != "train").to_numpy()))
    emb = embed_pairs(model, packer, held_out)
    r = retrieval_metrics(emb["z_patient"], emb["t_patient"], list(held_out.manifest.frame["text"]))
    # measured over train.seed 0..3 (chance 0.26): image->text 0.39 / 0.35 / 0.58 / 0.45, text->image
    # 0.88 / 0.39 / 0.46 / 0.69 - 60 steps of a tiny model are noisy; every seed is well above chance
    # (image->text is the weaker direction: a few reports attract most images early in training)
    assert r["image_to_text_recall@1"] > r["chance@1"] + 0.08, r
    assert r["text_to_image_recall@1"] > r["chance@1"] + 0.1, r
    zs = zero_shot(model, packer, held_out, config.zero_shot, emb)
    assert zs["eyes"] == 2 * len(held_out)
    assert zs["macro_auroc"] > 0.8, zs  # measured 0.95
    assert (run / "training_curves.png").stat().st_size > 1000


def test_vision_preset_reloads_with_identical_embeddings(pretrained):
    from kfundus.systems import load_model

    run, config = pretrained
    model = load_model(run / "model.keras")
    size = config.data.image_size
    encoder = load_encoder("clip", str(run / "vision_encoder"), size)
    x = random_batch(4, size=size)["left_image"]
    from kfundus.systems.clip_lora.encoders import find_encoder

    trained = {w.path.split("/", 1)[-1]: np.asarray(w) for w in find_encoder(model).weights}
    reloaded = {w.path.split("/", 1)[-1]: np.asarray(w) for w in encoder.weights}
    assert trained.keys() == reloaded.keys()
    for key in trained:  # bit-identical weights
        np.testing.assert_array_equal(trained[key], reloaded[key], err_msg=key)
    want = np.asarray(embedding_models(model)["features"](x))
    normalise = model.get_layer("clip_normalization")
    got = np.asarray(token_pooling("cls", int(encoder.output.shape[1]))(encoder({"images": normalise(x)})))
    np.testing.assert_allclose(got, want, atol=1e-5)  # same function (float op order may differ)
    assert np.std(want) > 0.1


def test_pretrain_command_errors_name_the_fix(tmp_path, capsys):
    from kfundus.cli import main

    assert (
        main(
            [
                "pretrain",
                "--config",
                "retclip_pretrain",
                "--data",
                str(tmp_path / "absent"),
                "--run-dir",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert str(tmp_path / "absent") in capsys.readouterr().err
    assert main(["pretrain", "--evaluate"]) == 2
    assert "--run" in capsys.readouterr().err
    assert main(["pretrain", "--config", "retclip_pretrain", "--set", "train.epochz=1"]) == 2
    assert "epochz" in capsys.readouterr().err


def test_mixed_precision_step_keeps_float32_logits():
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = tiny_model()
        objective = retclip_objective()
        loss, weights = objective.loss, objective.loss_weights
        model.compile(optimizer="adam", loss=loss, loss_weights=weights)
        x = random_batch(6)
        out = model(x)
        assert all(keras.backend.standardize_dtype(out[b].dtype) == "float32" for b in BRANCHES)
        result = model.train_on_batch(x, {b: np.arange(6) for b in BRANCHES}, return_dict=True)
        assert np.isfinite(result["loss"]) and result["loss"] > 0
    finally:
        keras.mixed_precision.set_global_policy(previous)
