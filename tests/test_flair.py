"""FLAIR (issue 17): the released checkpoint converted into Keras, proven against PyTorch
references built by torchvision (ResNet) and transformers (BertModel) with random weights in
FLAIR's key layout (tests/fixtures/foundation/make_flair_retclip.py writes them; this file
never imports torch); BERT alone and its tokenizer; wrong checkpoints; zero-shot against
FLAIR's own recipe and on a dataset whose answer is known; the transfer command and the
classifier with a converted FLAIR backbone."""

import json
import math
import struct
from pathlib import Path

import keras
import numpy as np
import pytest

from kfundus.convert import convert, read_checkpoint
from kfundus.convert.bert import (
    ExactGeluBertBackbone,
    bert_tokenizer,
    build_bert,
    exact_gelu,
    hidden_states_model,
    save_vocabulary,
)
from kfundus.errors import ConfigError, DataError
from kfundus.systems.flair import zero_shot as zs
from kfundus.systems.flair.model import CAPTION, load_flair_text, load_flair_vision, read_flair_config

FIXTURES = Path(__file__).parent / "fixtures" / "foundation"
FLAIR = FIXTURES / "flair_tiny.pth"
VOCAB = FIXTURES / "flair_vocab.txt"
TOL = 1e-4  # float32 parity budget (issue 17)


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURES / "flair_tiny_reference.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("flair") / "flair"
    convert("flair", FLAIR, out, vocab=str(VOCAB), num_heads=2, image_size=64)
    return out


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def write_safetensors(state: dict, path: Path) -> None:
    """A safetensors file (8-byte header length, JSON header, raw little-endian buffers)."""
    names = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64"}
    header, blobs, offset = {}, [], 0
    for key, value in state.items():
        value = np.asarray(value)
        blob = value.astype(value.dtype.newbyteorder("<")).tobytes()
        header[key] = {
            "dtype": names[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


# ---------------------------------------------------------------------------
# BERT and its tokenizer


def test_bert_hidden_states_match_transformers(reference):
    state = read_checkpoint(FLAIR, model="FLAIR").state
    backbone, used = build_bert(state, "text_model.model.", num_heads=2)
    assert "text_model.model.pooler.dense.weight" in used
    ids = reference["token_ids"].astype("int32")
    mask = reference["attention_mask"].astype("int32")
    states = hidden_states_model(backbone)({"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": mask})
    assert len(states) == 4  # embeddings + 3 layers, as transformers' hidden_states
    for index, key in ((1, "hidden_1"), (2, "hidden_2"), (-1, "hidden_last")):
        assert max_diff(states[index], reference[key]) < TOL, key


def test_bert_preset_keeps_the_exact_gelu(tmp_path, reference):
    """keras-hub's BertBackbone uses the tanh GELU; the converted backbone keeps BERT's erf
    GELU through a keras-hub preset round trip (with the stock class a BERT-base's last hidden
    state is 1.0e-3 away from transformers')."""
    import keras_hub

    state = read_checkpoint(FLAIR, model="FLAIR").state
    backbone, _ = build_bert(state, "text_model.model.", num_heads=2)
    backbone.save_to_preset(str(tmp_path / "bert"))
    again = keras_hub.models.Backbone.from_preset(str(tmp_path / "bert"))
    assert isinstance(again, ExactGeluBertBackbone)
    x = np.linspace(-4, 4, 101).astype("float32")
    dense = again.get_layer("transformer_layer_0")._feedforward_intermediate_dense
    erf = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    assert max_diff(dense.activation(x), erf) < 1e-6
    ids = reference["token_ids"].astype("int32")
    feed = {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": reference["attention_mask"]}
    np.testing.assert_allclose(again(feed)["sequence_output"], backbone(feed)["sequence_output"], atol=1e-6)


def test_tokenizers_match_transformers():
    """keras-hub's BertTokenizer on a checkpoint's vocab.txt gives the ids transformers'
    BertTokenizer gives, for English (FLAIR) and Chinese with full-width punctuation (RET-CLIP,
    which keras-hub's own lowercase=True would turn into [UNK])."""
    expected = json.loads((FIXTURES / "tokenizer_reference.json").read_text())
    for vocab, key in (("flair_vocab.txt", "flair"), ("retclip_vocab.txt", "retclip")):
        tokenizer = bert_tokenizer(FIXTURES / vocab)
        for text, ids in zip(expected[f"{key}_texts"], expected[f"{key}_ids"]):
            assert [int(i) for i in np.asarray(tokenizer(text))] == ids[1:-1], text  # without [CLS]/[SEP]


def test_bad_vocabularies_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        bert_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "words.txt").write_text("a\nb\n")
    with pytest.raises(ConfigError, match="not a BERT vocabulary"):
        bert_tokenizer(tmp_path / "words.txt")
    # a real vocabulary of another size than the checkpoint's text encoder: named, nothing saved
    with pytest.raises(ConfigError, match=r"flair_vocab.txt has \d+ tokens, the text encoder of x.pth 99: give"):
        save_vocabulary(VOCAB, tmp_path / "tok", lowercase=True, vocabulary_size=99, checkpoint="x.pth", expected="X")
    assert not (tmp_path / "tok").exists()


# ---------------------------------------------------------------------------
# conversion


def test_flair_towers_match_the_pytorch_reference(converted, reference):
    vision = load_flair_vision(converted)
    out = vision.predict(reference["images"], verbose=0)
    assert reference["vision_features"].std() > 0.1  # BatchNorm statistics set: not a degenerate feature
    assert max_diff(out["features"], reference["vision_features"]) < TOL
    assert max_diff(out["embedding"], reference["image_embedding"]) < TOL
    text, _ = load_flair_text(converted)
    got = text({"token_ids": reference["token_ids"], "padding_mask": reference["attention_mask"]})
    assert max_diff(got["features"], reference["text_feature"]) < TOL
    assert max_diff(got["embedding"], reference["text_embedding"]) < TOL
    info = read_flair_config(converted)
    scale = min(np.exp(info["logit_scale"]), 100.0)
    logits = scale * np.asarray(out["embedding"]) @ np.asarray(got["embedding"]).T
    assert max_diff(logits, reference["logits"]) < 10 * TOL  # scaled by ~19
    record = json.loads((converted / "conversion.json").read_text())
    assert record["kind"] == "flair"
    assert "text_model.model.embeddings.position_ids" in record["ignored_keys"]
    assert any(k.endswith("num_batches_tracked") for k in record["ignored_keys"])


def test_hugging_face_folder_with_module_prefix_converts_the_same(tmp_path, converted, reference):
    """FLAIR's Hugging Face release (model.safetensors + config.json); keys with a DataParallel
    ``module.`` prefix are read the same."""
    state = read_checkpoint(FLAIR, model="FLAIR").state
    folder = tmp_path / "jusiro2-FLAIR"
    folder.mkdir()
    write_safetensors({f"module.{k}": v for k, v in state.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"vision_type": "resnet_v1", "proj_dim": 16}))
    (folder / "vocab.txt").write_text(VOCAB.read_text())  # found beside the checkpoint
    out = convert("flair", folder, tmp_path / "out", num_heads=2, image_size=64)
    record = json.loads((out / "conversion.json").read_text())
    assert record["format"] == "huggingface" and record["stripped_prefix"] == "module."
    got = load_flair_vision(out).predict(reference["images"], verbose=0)
    assert max_diff(got["embedding"], reference["image_embedding"]) < TOL
    assert read_flair_config(out)["tokenizer"] == "tokenizer"


def test_torchvision_resnet_converts_as_a_vision_encoder(tmp_path, reference):
    """A plain torchvision ResNet state dict (an ImageNet file's layout, fc dropped) gives the
    architecture-matched encoder without FLAIR's projection."""
    state = read_checkpoint(FLAIR, model="FLAIR").state
    plain = {k[len("vision_model.model.") :]: v for k, v in state.items() if k.startswith("vision_model.model.")}
    plain["fc.weight"] = np.zeros((10, 128), "float32")
    plain["fc.bias"] = np.zeros(10, "float32")
    write_safetensors(plain, tmp_path / "resnet.safetensors")
    out = convert("flair", tmp_path / "resnet.safetensors", tmp_path / "imagenet", image_size=64)
    got = load_flair_vision(out).predict(reference["images"], verbose=0)
    assert set(got) == {"features"}
    assert max_diff(got["features"], reference["vision_features"]) < TOL
    assert {"fc.weight", "fc.bias"} <= set(json.loads((out / "conversion.json").read_text())["ignored_keys"])
    with pytest.raises(ConfigError, match="no FLAIR text encoder"):
        load_flair_text(out)


def test_wrong_checkpoints_say_what_they_look_like(tmp_path):
    with pytest.raises(DataError) as error:
        convert("flair", FIXTURES / "retclip_tiny.pt", tmp_path / "a")
    message = str(error.value)
    assert "retclip_tiny.pt" in message and "FLAIR" in message
    assert "RET-CLIP" in message and "--from retclip" in message
    retfound = FIXTURES / "retfound" / "finetuned.pth"
    if retfound.exists():
        with pytest.raises(DataError, match="RETFound"):
            convert("flair", retfound, tmp_path / "b")
    truncated = tmp_path / "flair_resnet.pth"
    truncated.write_bytes(FLAIR.read_bytes()[: FLAIR.stat().st_size // 2])
    with pytest.raises(DataError, match="flair_resnet.pth"):
        convert("flair", truncated, tmp_path / "c")
    state = read_checkpoint(FLAIR, model="FLAIR").state
    state.pop("vision_model.model.layer2.0.conv2.weight")
    write_safetensors(state, tmp_path / "broken.safetensors")
    with pytest.raises(DataError, match=r"missing key\(s\): vision_model\.model\.layer2\.0\.conv2\.weight"):
        convert("flair", tmp_path / "broken.safetensors", tmp_path / "d", num_heads=2)
    with pytest.raises(ConfigError, match="tokens"):  # a vocabulary of another size
        convert("flair", FLAIR, tmp_path / "e", vocab=str(FIXTURES / "retclip_vocab.txt"), num_heads=2)


# ---------------------------------------------------------------------------
# zero-shot


def test_zero_shot_follows_flair(converted, reference):
    """Class embeddings (expert descriptions + the class name, each class padded to its
    longest caption, mean not re-normalised) and the softmax, against FLAIR's recipe run on
    the PyTorch reference."""
    text, tokenizer = load_flair_text(converted)
    prompts = zs.class_prompts(["normal", "glaucoma", "cataract"])
    assert prompts["cataract"] == ["opacity in the macular area", "cataract"]
    classes = zs.class_embeddings(text, tokenizer, prompts, caption=CAPTION)
    assert max_diff(classes, reference["class_embeddings"]) < TOL
    image = load_flair_vision(converted).predict(reference["images"], verbose=0)["embedding"]
    probs = zs.probabilities(image, classes, read_flair_config(converted)["logit_scale"])
    assert max_diff(probs, reference["zero_shot_probabilities"]) < TOL


def colour_task(root: Path, per_class: int = 6):
    """One folder per class of flat-colour PNG images: the answer is the colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"normal": (200, 40, 40), "glaucoma": (40, 200, 40), "cataract": (40, 40, 200)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-8, 9, (64, 64, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    return colours


def test_zero_shot_command_finds_the_known_answer(tmp_path, converted):
    """A converted FLAIR whose projections are set so that class k's prompts and the images of
    colour k meet at the same unit vector: `kfundus zero-shot` on that dataset must score
    AUROC 1 and accuracy 1, and the swapped mapping accuracy 0 (the plumbing, not accuracy)."""
    import shutil

    from kfundus.cli import main

    colours = colour_task(tmp_path / "data")
    folder = tmp_path / "rigged"
    shutil.copytree(converted, folder)
    classes = list(colours)
    text, tokenizer = load_flair_text(folder)
    vision = load_flair_vision(folder)
    # text: each description's unit feature -> its class's axis (least squares, exact here)
    prompts = zs.class_prompts(classes)
    feats, axes = [], []
    for k, name in enumerate(classes):
        packed = zs.pack(tokenizer, zs.captioned(prompts[name], CAPTION))
        f = np.asarray(text(packed)["features"])
        feats.append(f / np.linalg.norm(f, axis=1, keepdims=True))
        axes += [k] * len(f)
    feats = np.concatenate(feats)
    target = np.eye(16)[axes]
    text.get_layer("text_projection").kernel.assign(np.linalg.lstsq(feats, target, rcond=None)[0].astype("float32"))
    # vision: the unit feature of each flat colour -> its class's axis
    flat = np.stack([np.full((64, 64, 3), c, "float32") for c in colours.values()])
    f = vision.predict(flat, verbose=0)["features"]
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    vision.get_layer("vision_projection").kernel.assign(
        np.linalg.lstsq(f, np.eye(16)[:3], rcond=None)[0].astype("float32")
    )
    text.save(folder / "text.keras")
    vision.save(folder / "vision.keras")

    def run(labels, out):
        args = ["zero-shot", "--config", "flair_zero_shot", "--data", str(tmp_path / "data"), "--out", str(out)]
        args += ["--set", "data.source=folders", "--set", "data.options={}", "--set", "data.image_size=64"]
        args += ["--set", "data.crop_fundus=false", "--set", f"model.weights={folder}"]
        args += ["--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", f"zero_shot.labels={labels}"]
        assert main(args) == 0
        return json.loads((out / "zero_shot.json").read_text())

    right = run("{normal: normal, glaucoma: glaucoma, cataract: cataract}", tmp_path / "right")
    assert right["rows"] == 18 and right["accuracy"] == 1.0
    assert right["auroc"] == {"normal": 1.0, "glaucoma": 1.0, "cataract": 1.0}
    assert right["prompts"]["glaucoma"][0] == "A fundus photograph of optic nerve abnormalities"
    swapped = run("{normal: glaucoma, glaucoma: cataract, cataract: normal}", tmp_path / "swapped")
    assert swapped["accuracy"] == 0.0
    table = (tmp_path / "right" / "predictions.csv").read_text().splitlines()
    assert table[0].endswith("y_normal,y_glaucoma,y_cataract") and len(table) == 19


def test_zero_shot_config_errors_name_the_fix(tmp_path):
    from kfundus.config import load_config

    with pytest.raises(ConfigError, match=r"\[CLS\]"):
        load_config("flair_zero_shot", ["zero_shot.caption=a photo"])
    from kfundus.workflows.zero_shot import run_zero_shot

    config = load_config("flair_zero_shot", ["model.name=efficientnet_b0"])
    with pytest.raises(ConfigError, match="vision-language model"):
        run_zero_shot(config, tmp_path, tmp_path / "out")


# ---------------------------------------------------------------------------
# using the encoder: transfer, classifier


def test_transfer_takes_a_converted_flair_backbone(tmp_path, converted):
    from kfundus.config import BackboneSpec, load_config
    from kfundus.data.synthetic.hr import make_hrdc
    from kfundus.workflows.transfer import build_classifier, build_extractor, run_transfer

    spec = BackboneSpec(name="flair", family="flair", weights=str(converted))
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    want = load_flair_vision(converted).predict(x, verbose=0)["features"]
    assert max_diff(build_extractor(spec, 64).predict(x, verbose=0), want) < 1e-5  # the pooled ResNet feature
    tiny = {"stackwise_num_filters": [64, 8, 16, 32], "stackwise_num_blocks": [1, 1, 1, 1], "input_conv_filters": [8]}
    random = build_extractor(BackboneSpec(name="random", family="flair", encoder_config=tiny), 64, seed=3)
    again = build_extractor(BackboneSpec(name="random", family="flair", encoder_config=tiny), 64, seed=3)
    assert random.output.shape == (None, 128)
    np.testing.assert_array_equal(random.predict(x, verbose=0), again.predict(x, verbose=0))  # seeded start

    data = make_hrdc(tmp_path / "hrdc", n_images=24, size=72, seed=0)
    config = load_config(
        "hr_transfer_flair",
        [
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.image_size=64",
            "transfer.folds=2",
            "transfer.protocols=[lp]",  # fine-tuning builds build_classifier(build_extractor(spec)), below
            f"transfer.backbones=[{{name: flair, family: flair, weights: {converted}}}]",
        ],
    )
    summary = run_transfer(config, data, tmp_path / "out")
    assert list(zip(summary["backbone"], summary["protocol"])) == [("flair", "lp")]
    assert (tmp_path / "out" / "folds.csv").read_text().count("\n") == 1 + 2
    w, b = np.linspace(-0.02, 0.02, 128).astype("float32"), 0.5  # the LP-FT start: the probe's head
    model = build_classifier(build_extractor(spec, 64), head=(w, b))
    np.testing.assert_allclose(model.predict(x, verbose=0)[:, 0], 1 / (1 + np.exp(-(want @ w + b))), atol=1e-5)


def test_classifier_on_the_converted_encoder(converted):
    from kfundus.systems.flair.model import build_flair_classifier

    model = build_flair_classifier(3, image_size=64, weights=str(converted), two_eye=True, trainable_blocks=1)
    assert [t.name.split(":")[0] for t in model.inputs] == ["left_image", "right_image"]
    assert model.output.shape == (None, 3)
    resnet = model.get_layer("resnet")  # directly in the classifier: Grad-CAM reads its last stage
    trainable = {layer.name.split("_")[0] for layer in resnet.layers if layer.trainable and layer.weights}
    assert trainable == {"stack3"}  # the last stage only
    projected = build_flair_classifier(1, image_size=64, weights=str(converted), features="projection")
    x = np.full((1, 64, 64, 3), 120.0, "float32")
    inner = keras.Model(projected.input, projected.get_layer("image_embedding").output).predict(x, verbose=0)
    np.testing.assert_allclose(np.linalg.norm(inner, axis=1), 1.0, rtol=1e-5)  # the unit 16-d embedding
    with pytest.raises(ConfigError, match="not a converted FLAIR folder|kfundus convert"):
        build_flair_classifier(1, image_size=64, weights=str(FIXTURES))


def test_exact_gelu_is_registered():
    assert keras.saving.get_registered_object("kfundus>exact_gelu") is exact_gelu


def test_fine_tuned_flair_classifier_learns_and_exports(tmp_path, converted):
    """`kfundus train` with the converted encoder (model.name flair) on synthetic fundus images
    (normal vs cataract, 64 px), then `export`: the training loss falls, the SavedModel and the
    float32 TFLite file reproduce Keras within the exporter's check (float16, Grad-CAM through
    `kfundus evaluate`: the end-to-end run in docs/systems/flair.md)."""
    import pandas as pd

    from kfundus.cli import main
    from kfundus.data.synthetic import make_odir

    data = make_odir(
        tmp_path / "data", n_patients=40, size=72, seed=2, prevalence={"N": 0.5, "C": 0.5}, write_masks=False
    )
    run = tmp_path / "runs" / "flair_run"
    args = [
        "train",
        "--config",
        "demo_synthetic",
        "--data",
        str(data),
        "--run-dir",
        str(run),
        "--set",
        "name=flair_run",
    ]
    for item in (
        f"output_dir={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"export.dir={tmp_path / 'saved_models'}",
        "data.labels=[N, C]",
        "data.image_size=64",
        "data.augment={}",
        "model.name=flair",
        f"model.weights={converted}",
        "model.dropout=0.0",
        "model.bn_momentum=null",
        "train.epochs=3",
        "train.learning_rate=0.001",
        "train.warmup_epochs=0",
        "export.tflite=[float32]",
    ):
        args += ["--set", item]
    assert main([*args, "--no-export"]) == 0
    history = pd.read_csv(run / "history.csv")
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    assert main(["export", "--run", str(run)]) == 0
    card = json.loads((tmp_path / "saved_models" / "flair_run" / "model_card.json").read_text())
    parity = card["parity"]
    for fmt in ("saved_model", "tflite"):
        assert max(parity[f"{fmt}_max_abs_diff"].values()) <= parity["atol"], fmt
