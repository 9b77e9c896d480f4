"""Full-size FLAIR (torchvision ResNet-50 + BERT-base, Bio_ClinicalBERT's sizes) and RET-CLIP
(OpenAI-CLIP ViT-B/16 + BERT-base, RoBERTa-wwm-ext-base-chinese's sizes) checkpoints with random
weights in the released layouts (tests/fixtures/foundation/make_flair_retclip.py --full),
converted by ``kfundus convert`` in a fresh process and compared with the torchvision /
transformers / open_clip outputs at 1e-4; figures go to
``$KFUNDUS_FOUNDATION/flair_retclip_full_results.json``."""

import json
import subprocess
import sys

import numpy as np
import pytest

TOL = 1e-4


def load(foundation_dir, name):
    path = foundation_dir / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make test-foundation` (it writes the references first)")
    with np.load(path) as data:
        return dict(data)


def convert_in_fresh_process(kind, checkpoint, out, *options):
    command = [sys.executable, "-m", "kfundus", "convert", "--from", kind, str(checkpoint), "--out", str(out)]
    command += [x for option in options for x in ("--set", option)] + ["--overwrite"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    return json.loads((out / "conversion.json").read_text())


def diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def record(foundation_dir, key, values):
    path = foundation_dir / "flair_retclip_full_results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = values
    path.write_text(json.dumps(results, indent=1))
    print(f"{key}: {values}")


def test_flair_resnet50_bert_base_equal_torchvision_transformers(foundation_dir):
    from kfundus.systems.flair import zero_shot as zs
    from kfundus.systems.flair.model import CAPTION, load_flair_text, load_flair_vision, read_flair_config

    ref = load(foundation_dir, "flair_full_reference.npz")
    checkpoint = foundation_dir / "flair_full.pth"
    out = foundation_dir / "flair_converted"
    vocab = foundation_dir / "flair_full_vocab.txt"  # 28996 entries, Bio_ClinicalBERT's size
    conversion = convert_in_fresh_process("flair", checkpoint, out, "image_size=224", f"vocab={vocab}")
    assert "blocks [3, 4, 6, 3]" in conversion["details"]["vision"]
    assert conversion["details"]["text"] == "BERT 12 layers, 768-d, 12 heads"
    vision = load_flair_vision(out).predict(ref["images"], batch_size=1, verbose=0)
    text, tokenizer = load_flair_text(out)
    got = text({"token_ids": ref["token_ids"], "padding_mask": ref["attention_mask"]})
    classes = zs.class_embeddings(
        text, tokenizer, zs.class_prompts(["normal", "glaucoma", "cataract"]), caption=CAPTION
    )
    probs = zs.probabilities(vision["embedding"], classes, read_flair_config(out)["logit_scale"])
    values = {
        "vision_features_max_abs_diff": diff(vision["features"], ref["vision_features"]),
        "vision_feature_scale": float(np.max(np.abs(ref["vision_features"]))),
        "image_embedding_max_abs_diff": diff(vision["embedding"], ref["image_embedding"]),
        "text_feature_max_abs_diff": diff(got["features"], ref["text_feature"]),
        "text_embedding_max_abs_diff": diff(got["embedding"], ref["text_embedding"]),
        "class_embeddings_max_abs_diff": diff(classes, ref["class_embeddings"]),
        "zero_shot_probabilities_max_abs_diff": diff(probs, ref["zero_shot_probabilities"]),
        "checkpoint_bytes": checkpoint.stat().st_size,
        "convert_seconds": conversion["seconds"],
        "peak_memory_mb": conversion["peak_memory_mb"],
    }
    record(foundation_dir, "flair", values)
    for key, value in values.items():
        if key.endswith("max_abs_diff"):
            assert value < TOL, key


def test_retclip_vit_b16_bert_base_equal_open_clip_transformers(foundation_dir):
    from kfundus.systems.retclip.model import embedding_models, load_retclip_model

    ref = load(foundation_dir, "retclip_full_reference.npz")
    checkpoint = foundation_dir / "retclip_full.pt"
    out = foundation_dir / "retclip_converted"
    vocab = foundation_dir / "retclip_full_vocab.txt"  # 21128 entries, RoBERTa-wwm-ext's size
    conversion = convert_in_fresh_process("retclip", checkpoint, out, f"vocab={vocab}")
    assert "768-d, 12 blocks, patch 16, 12 heads" in conversion["details"]["vision"]
    towers = embedding_models(load_retclip_model(out))
    z = towers["image"].predict([ref["left_images"], ref["right_images"]], batch_size=1, verbose=0)
    ids = ref["token_ids"].astype("int32")  # 52 tokens, RET-CLIP's tokenize() and the saved text input
    t = towers["text"].predict([ids, ids != 0], verbose=0)
    values = {f"{k}_max_abs_diff": diff(z[k], ref[k]) for k in ("z_left", "z_right", "z_patient")}
    values.update({f"{k}_max_abs_diff": diff(t[k], ref[k]) for k in ("t_left", "t_right", "t_patient")})
    values["f_left_max_abs_diff"] = diff(towers["features"].predict(ref["left_images"], verbose=0), ref["f_left"])
    values.update(
        checkpoint_bytes=checkpoint.stat().st_size,
        convert_seconds=conversion["seconds"],
        peak_memory_mb=conversion["peak_memory_mb"],
    )
    record(foundation_dir, "retclip", values)
    for key, value in values.items():
        if key.endswith("max_abs_diff"):
            assert value < TOL, key
