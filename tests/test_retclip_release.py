"""The released RET-CLIP checkpoint (issue 17) converted into kfundus' RET-CLIP model, proven
against an open_clip VisionTransformer (OpenAI-CLIP layout) + transformers BertModel
reference with random weights in the released key layout, wrapped and ``module.``-prefixed as
RET-CLIP's training script saves it (tests/fixtures/foundation/make_flair_retclip.py writes
it; no torch here); the converted folder as a CLIP encoder elsewhere; kfundus' own RET-CLIP
defaults untouched; wrong files; the two-eye classifier; zero-shot on a known answer."""

import json
import shutil
import struct
from pathlib import Path

import keras
import numpy as np
import pytest

from kfundus.convert import convert, read_checkpoint
from kfundus.errors import ConfigError, DataError
from kfundus.systems.retclip.model import (
    build_retclip,
    build_retclip_classifier,
    embedding_models,
    load_retclip_model,
    logit_scales,
)

FIXTURES = Path(__file__).parent / "fixtures" / "foundation"
RETCLIP = FIXTURES / "retclip_tiny.pt"
VOCAB = FIXTURES / "retclip_vocab.txt"
TOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURES / "retclip_tiny_reference.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("retclip") / "retclip"
    convert("retclip", RETCLIP, out, vocab=str(VOCAB), num_heads=2, text_heads=2, sequence_length=16)
    return out


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def write_safetensors(state: dict, path: Path) -> None:
    header, blobs, offset = {}, [], 0
    for key, value in state.items():
        value = np.asarray(value, dtype="float32")
        blob = value.tobytes()
        header[key] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_embeddings_match_the_open_clip_transformers_reference(converted, reference):
    model = load_retclip_model(converted)
    towers = embedding_models(model)
    z = towers["image"].predict([reference["left_images"], reference["right_images"]], verbose=0)
    for key in ("z_left", "z_right", "z_patient"):
        assert max_diff(z[key], reference[key]) < TOL, key
    f = towers["features"].predict(reference["left_images"], verbose=0)
    assert max_diff(f, reference["f_left"]) < TOL  # f = proj(ln_post(class token)), the released feature
    ids = reference["token_ids"].astype("int32")
    t = towers["text"].predict([ids, ids != 0], verbose=0)
    for key in ("t_left", "t_right", "t_patient"):
        assert max_diff(t[key], reference[key]) < TOL, key
    want = dict(zip(("left", "right", "patient"), np.exp(reference["logit_scales"])))
    assert logit_scales(model) == pytest.approx(want, rel=1e-5)


def test_conversion_record_names_the_wrapper(converted):
    record = json.loads((converted / "conversion.json").read_text())
    assert record["wrapper"] == "state_dict" and record["stripped_prefix"] == "module."
    assert set(record["other_entries"]) == {"epoch", "step", "name"}
    info = json.loads((converted / "retclip.json").read_text())
    assert info["text_pooling"] == "cls" and info["tokenizer"] == "tokenizer"


def test_converted_folder_is_a_clip_encoder_preset(converted, reference):
    """``model.weights: DIR`` wherever a CLIP encoder is named: its pooled class token times the
    released ``proj`` is RET-CLIP's feature."""
    from kfundus.config import BackboneSpec
    from kfundus.workflows.transfer import build_extractor

    extractor = build_extractor(BackboneSpec(name="retclip", weights=str(converted)), 32)
    pooled = extractor.predict(reference["left_images"], verbose=0)
    proj = load_retclip_model(converted).get_layer("vision_projection").kernel.numpy()
    assert max_diff(pooled @ proj, reference["f_left"]) < TOL


def test_kfundus_retclip_defaults_are_unchanged(tmp_path):
    """Without the release options the model is kfundus' own (no proj, end-token pooling), and a
    model with a BERT text encoder saves and reloads (segment ids are a registered layer)."""
    state = read_checkpoint(RETCLIP, model="RET-CLIP").state
    from kfundus.convert.bert import build_bert

    bert, _ = build_bert(state, "bert.", num_heads=2)
    bert.save_to_preset(str(tmp_path / "bert"))
    vision = dict(patch_size=8, hidden_dim=32, num_layers=2, num_heads=2, intermediate_dim=64)
    model = build_retclip(
        image_size=32, vocabulary_size=30, sequence_length=8, vision_config=vision, text_weights=str(tmp_path / "bert")
    )
    names = {layer.name for layer in model.layers}
    assert "vision_projection" not in names and "end_token" in names and "cls_token_text" not in names
    model.save(tmp_path / "model.keras")
    again = keras.saving.load_model(tmp_path / "model.keras")
    rng = np.random.default_rng(0)
    x = {
        "left_image": rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32"),
        "right_image": rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32"),
        "token_ids": rng.integers(5, 30, (2, 8)).astype("int32"),
        "padding_mask": np.ones((2, 8), bool),
    }
    for branch, value in model.predict(x, verbose=0).items():
        np.testing.assert_allclose(again.predict(x, verbose=0)[branch], value, atol=1e-5)
    with pytest.raises(ConfigError, match="text_pooling"):
        build_retclip(image_size=32, vocabulary_size=30, vision_config=vision, text_pooling="mean")


def test_wrong_checkpoints_say_what_they_look_like(tmp_path):
    with pytest.raises(DataError) as error:
        convert("retclip", FIXTURES / "flair_tiny.pth", tmp_path / "a")
    message = str(error.value)
    assert "flair_tiny.pth" in message and "RET-CLIP" in message and "--from flair" in message
    state = read_checkpoint(RETCLIP, model="RET-CLIP").state
    chinese_clip = {k: v for k, v in state.items() if "mapping" not in k and "text_projection_" not in k}
    write_safetensors(chinese_clip, tmp_path / "cn_clip.safetensors")
    with pytest.raises(DataError, match="Chinese-CLIP checkpoint") as error:
        convert("retclip", tmp_path / "cn_clip.safetensors", tmp_path / "b", num_heads=2, text_heads=2)
    assert "global_feature_mapping.weight" in str(error.value)  # the first missing keys are named
    with pytest.raises(ConfigError, match="21128|tokens"):
        convert("retclip", RETCLIP, tmp_path / "c", vocab=str(FIXTURES / "flair_vocab.txt"), num_heads=2, text_heads=2)


def test_two_eye_classifier_reads_the_released_feature(converted, reference):
    model = build_retclip_classifier(8, image_size=32, weights=str(converted))
    assert [t.name.split(":")[0] for t in model.inputs] == ["left_image", "right_image"]
    fused = keras.Model(model.inputs, model.get_layer("patient_features").output)
    got = fused.predict([reference["left_images"], reference["right_images"]], verbose=0)
    want = np.concatenate([reference["f_left"], reference["f_right"]], axis=1)  # RET-CLIP's ODIR input
    assert got.shape == (2, 32) and max_diff(got, want) < TOL
    frozen = build_retclip_classifier(8, image_size=32, weights=str(converted), trainable_blocks=1)
    encoder = frozen.get_layer("encoder")
    trainable = [layer.name for layer in encoder.layers if layer.trainable and layer.weights]
    assert trainable == [encoder.encoder_layers[-1].name, encoder.layer_norm.name]
    with pytest.raises(ConfigError, match="no RET-CLIP model there|kfundus convert"):
        build_retclip_classifier(8, image_size=32, weights=str(FIXTURES))


def odir_colour_task(root: Path, per_class: int = 4) -> dict:
    """An ODIR-layout dataset whose two eyes share a flat colour per class (N, G, C)."""
    import pandas as pd
    from PIL import Image

    colours = {"N": (200, 40, 40), "G": (40, 200, 40), "C": (40, 40, 200)}
    keywords = {"N": "normal fundus", "G": "glaucoma", "C": "cataract"}
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows, pid = [], 0
    for label, colour in colours.items():
        for _ in range(per_class):
            for side in ("left", "right"):
                pixels = np.clip(np.array(colour) + rng.integers(-6, 7, (40, 40, 3)), 0, 255).astype("uint8")
                Image.fromarray(pixels).save(root / "images" / f"{pid}_{side}.png")
            flags = {k: int(k == label) for k in "NDGCAHMO"}
            rows.append(
                [
                    pid,
                    60,
                    "Male",
                    f"{pid}_left.png",
                    f"{pid}_right.png",
                    keywords[label],
                    keywords[label],
                    *flags.values(),
                ]
            )
            pid += 1
    columns = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus"]
    columns += ["Left-Diagnostic Keywords", "Right-Diagnostic Keywords", *"NDGCAHMO"]
    pd.DataFrame(rows, columns=columns).to_csv(root / "annotation.csv", index=False)
    return colours


def test_zero_shot_with_the_released_text_tower_finds_the_known_answer(tmp_path, converted):
    """Patient-branch zero-shot through `kfundus zero-shot --config retclip_odir`: the patient
    projection and the patient text head are set so that class k's Chinese prompt and the
    patients whose eyes have colour k meet on one axis; accuracy 1 and AUROC 1, and 0 with the
    classes swapped (the plumbing, not accuracy)."""
    from kfundus.cli import main
    from kfundus.text import TextPacker, make_tokenizer

    colours = odir_colour_task(tmp_path / "odir")
    folder = tmp_path / "rigged"
    shutil.copytree(converted, folder)
    model = load_retclip_model(folder)
    towers = embedding_models(model)
    prompts = {"N": "正常眼底", "G": "青光眼", "C": "白内障"}
    # image side: concat(f_L, f_R) of each colour -> its class axis
    flat = np.stack([np.full((32, 32, 3), c, "float32") for c in colours.values()])
    f = towers["features"].predict(flat, verbose=0)
    fused = np.concatenate([f, f], axis=1)
    axes = np.eye(16)[:3]
    model.get_layer("image_projection_patient").kernel.assign(
        np.linalg.lstsq(fused, axes, rcond=None)[0].astype("float32")
    )
    # text side: the patient head's hidden activations of each prompt -> its class axis
    packer = TextPacker(make_tokenizer(str(folder / "tokenizer")), 16)
    packed = packer(list(prompts.values()))
    hidden = keras.Model(model.inputs, model.get_layer("text_head_patient_hidden").output)
    h = hidden.predict(
        {
            "left_image": flat,
            "right_image": flat,
            "token_ids": packed["token_ids"],
            "padding_mask": packed["padding_mask"],
        },
        verbose=0,
    )
    head = model.get_layer("text_head_patient")
    head.kernel.assign(np.linalg.lstsq(h, axes, rcond=None)[0].astype("float32"))
    head.bias.assign(np.zeros(16, "float32"))
    model.save(folder / "retclip.keras")

    def run(labels, out):
        args = ["zero-shot", "--config", "retclip_odir", "--data", str(tmp_path / "odir"), "--out", str(out)]
        args += ["--set", "data.image_size=32", "--set", "data.crop_fundus=false", "--set", f"model.weights={folder}"]
        args += ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
        args += ["--set", "zero_shot.prompts={normal: [正常眼底], glaucoma: [青光眼], cataract: [白内障]}"]
        args += ["--set", f"zero_shot.labels={labels}"]
        assert main(args) == 0
        return json.loads((out / "zero_shot.json").read_text())

    right = run("{normal: N, glaucoma: G, cataract: C}", tmp_path / "right")
    assert right["rows"] == 12 and right["accuracy"] == 1.0
    assert right["auroc"] == {"normal": 1.0, "glaucoma": 1.0, "cataract": 1.0}
    swapped = run("{normal: G, glaucoma: C, cataract: N}", tmp_path / "swapped")
    assert swapped["accuracy"] == 0.0


def test_retclip_classifier_trains_and_reloads(tmp_path, converted):
    """`kfundus train --config retclip_odir` on synthetic patients (both eyes, 32 px) from the
    converted tiny checkpoint: the loss falls, and the saved model reloads to the same outputs."""
    import pandas as pd

    from kfundus.cli import main
    from kfundus.data.synthetic import make_odir
    from kfundus.systems import load_model

    data = make_odir(
        tmp_path / "data", n_patients=40, size=40, seed=3, prevalence={"N": 0.5, "C": 0.5}, write_masks=False
    )
    run = tmp_path / "run"
    args = ["train", "--config", "retclip_odir", "--data", str(data), "--run-dir", str(run), "--no-export"]
    for item in (
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.image_size=32",
        "data.labels=[N, C]",
        "data.augment={}",
        "data.split={val: 0.2, test: 0.2, seed: 0}",
        f"model.weights={converted}",
        "train.epochs=3",
        "train.learning_rate=0.001",
        "train.batch_size=8",
    ):
        args += ["--set", item]
    assert main(args) == 0
    history = pd.read_csv(run / "history.csv")
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    model = load_model(run / "model.keras")  # every custom layer registered: it reloads
    tuned = model.get_layer("encoder").encoder_layers[0].dense_1.kernel.numpy()
    start = load_retclip_model(converted).get_layer("encoder").encoder_layers[0].dense_1.kernel.numpy()
    assert max_diff(tuned, start) > 1e-5  # trainable_blocks -1: the encoder was fine-tuned too
    x = [np.full((1, 32, 32, 3), 90.0, "float32"), np.full((1, 32, 32, 3), 160.0, "float32")]
    assert model.predict(x, verbose=0).shape == (1, 2)
