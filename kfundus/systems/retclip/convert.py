"""The released RET-CLIP checkpoint -> kfundus' RET-CLIP model.

    kfundus convert --from retclip RET-CLIP_vit-b-16.pt --out models/retclip \\
        --set vocab=RET-CLIP/RET_CLIP/clip/vocab.txt

The released file (sStonemason/RET-CLIP, ``RET_CLIP/training/main.py``) is what its training
script saves: ``{"epoch", "step", "name", "state_dict"[, "optimizer"]}`` with ``module.``
prefixes (DistributedDataParallel), or the bare state dict; both are read without unpickling
code (:mod:`kfundus.convert.checkpoints`). Its keys (``RET_CLIP/clip/model.py``, ViT-B-16 +
RoBERTa-wwm-ext-base-chinese):

- ``visual.*``: an OpenAI-CLIP ``VisualTransformer``: ``conv1`` (no bias), ``class_embedding``,
  ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N.{ln_1, attn.in_proj_weight,
  attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_post`` and ``proj``
  (768 x 512, applied as ``x @ proj``); QuickGELU, LayerNorm eps 1e-5, 64-wide heads;
- ``bert.*``: Chinese-CLIP's BERT (Hugging Face key names, no pooler), exact GELU, eps 1e-12;
- ``global_feature_mapping`` (1024 -> 512), ``left_feature_mapping``, ``right_feature_mapping``
  (512 -> 512), all without bias: the patient, left and right image projections;
- ``text_projection``, ``text_projection_left``, ``text_projection_right``: each
  ``Linear(768, 768), ReLU, Linear(768, 512)`` (keys ``.0.`` and ``.2.``) on the ``[CLS]`` state;
- ``logit_scale``, ``logit_scale_left``, ``logit_scale_right``: log temperatures.

They go into :func:`kfundus.systems.retclip.model.build_retclip` with the released model's
options (``vision_projection=512``, ``text_pooling="cls"``). The folder it writes:

- the vision encoder as a keras-hub ``CLIPVisionEncoder`` preset at its root (``config.json``,
  ``model.weights.h5``), so ``model.weights: DIR`` works wherever a CLIP encoder is named
  (``clip_lora``, a ``retclip`` transfer backbone);
- ``retclip.keras``: the whole model (both towers, the heads, the temperatures) for
  ``model.name: retclip_classifier`` and zero-shot;
- ``tokenizer/``: a keras-hub ``BertTokenizer`` on RET-CLIP's ``vocab.txt`` (21128 tokens,
  lower-cased), and ``retclip.json`` (preprocessing, sizes).

The vocabulary ships with RET-CLIP's code (``RET_CLIP/clip/vocab.txt``), not in the
checkpoint: give it with ``--set vocab=FILE`` or put it beside the checkpoint.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np

from kfundus.convert.base import Converted
from kfundus.convert.bert import (
    bert_config,
    bert_keys,
    build_bert,
    find_vocabulary,
    layer_norm_names,
    save_vocabulary,
)
from kfundus.convert.checkpoints import as_float32
from kfundus.convert.keys import check_keys
from kfundus.systems.retclip.model import BRANCHES, RETCLIP_FILE, build_retclip

MODEL = "RET-CLIP (ViT-B/16 + Chinese RoBERTa)"
CONFIG_FILE = "retclip.json"
TOKENIZER_DIR = "tokenizer"
HEAD_WIDTH = 64  # Chinese-CLIP: vision heads = width // 64
IMAGE_HEADS = {"left": "left_feature_mapping", "right": "right_feature_mapping", "patient": "global_feature_mapping"}
TEXT_HEADS = {"left": "text_projection_left", "right": "text_projection_right", "patient": "text_projection"}
LOGIT_SCALES = {"left": "logit_scale_left", "right": "logit_scale_right", "patient": "logit_scale"}
IGNORED = (r"^bert\.pooler\.", r"embeddings\.position_ids$")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PARITY = (
    "tests/test_retclip_release.py compares the converted model with an open_clip VisionTransformer (OpenAI-CLIP "
    "layout) + transformers BertModel reference in the released key layout (random weights): max abs difference "
    "below 1e-4 in float32 on the image and text embeddings; tests/foundation does the same at full size "
    "(ViT-B/16 + BERT-base)"
)


def visual_layout(state: dict, num_heads: int | None = None) -> dict:
    """Sizes of the released visual tower from its shapes (``kfundus.systems.clip_lora.encoders``
    encoder arguments plus ``image_size`` and ``embed_dim``)."""
    width, _, patch, _ = np.shape(state["visual.conv1.weight"])
    positions = int(np.shape(state["visual.positional_embedding"])[0])
    grid = int(round(np.sqrt(positions - 1)))
    layers = {int(m.group(1)) for k in state for m in [re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k)] if m}
    return {
        "patch_size": int(patch),
        "hidden_dim": int(width),
        "num_layers": max(layers) + 1 if layers else 0,
        "num_heads": int(num_heads or max(1, int(width) // HEAD_WIDTH)),
        "intermediate_dim": int(np.shape(state["visual.transformer.resblocks.0.mlp.c_fc.weight"])[0]),
        "intermediate_activation": "quick_gelu",
        "image_size": grid * int(patch),
        "embed_dim": int(np.shape(state["visual.proj"])[1]),
    }


def expected_keys(state: dict, layout: dict, text: dict) -> dict:
    """``{key: shape}`` of a released RET-CLIP file with these sizes."""
    w, p, e, i = layout["hidden_dim"], layout["patch_size"], layout["embed_dim"], layout["intermediate_dim"]
    n = (layout["image_size"] // p) ** 2 + 1
    keys = {
        "visual.conv1.weight": (w, 3, p, p),
        "visual.class_embedding": (w,),
        "visual.positional_embedding": (n, w),
        "visual.ln_pre.weight": (w,),
        "visual.ln_pre.bias": (w,),
        "visual.ln_post.weight": (w,),
        "visual.ln_post.bias": (w,),
        "visual.proj": (w, e),
    }
    for b in range(layout["num_layers"]):
        r = f"visual.transformer.resblocks.{b}."
        keys.update(
            {
                f"{r}ln_1.weight": (w,),
                f"{r}ln_1.bias": (w,),
                f"{r}attn.in_proj_weight": (3 * w, w),
                f"{r}attn.in_proj_bias": (3 * w,),
                f"{r}attn.out_proj.weight": (w, w),
                f"{r}attn.out_proj.bias": (w,),
                f"{r}ln_2.weight": (w,),
                f"{r}ln_2.bias": (w,),
                f"{r}mlp.c_fc.weight": (i, w),
                f"{r}mlp.c_fc.bias": (i,),
                f"{r}mlp.c_proj.weight": (w, i),
                f"{r}mlp.c_proj.bias": (w,),
            }
        )
    names = layer_norm_names(state, "bert.")
    for key in bert_keys(text["num_layers"], "bert.", pooler=False, layer_norm=names):
        keys[key] = tuple(np.shape(state[key])) if key in state else (None,)
    h = text["hidden_dim"]
    for name in TEXT_HEADS.values():
        keys.update(
            {f"{name}.0.weight": (h, h), f"{name}.0.bias": (h,), f"{name}.2.weight": (e, h), f"{name}.2.bias": (e,)}
        )
    keys.update({"global_feature_mapping.weight": (e, 2 * e), "left_feature_mapping.weight": (e, e)})
    keys["right_feature_mapping.weight"] = (e, e)
    keys.update(dict.fromkeys(LOGIT_SCALES.values(), ()))
    return keys


def load_visual_weights(encoder, state: dict, layout: dict) -> None:
    """The OpenAI-CLIP visual tower into keras-hub's ``CLIPVisionEncoder``."""
    f = as_float32
    w, heads = layout["hidden_dim"], layout["num_heads"]
    embedding = encoder.embedding
    embedding.patch_embedding.kernel.assign(np.transpose(f(state["visual.conv1.weight"]), (2, 3, 1, 0)))
    embedding.class_embedding.assign(f(state["visual.class_embedding"]))
    embedding.position_embedding.embeddings.assign(f(state["visual.positional_embedding"]))
    encoder.pre_layer_norm.gamma.assign(f(state["visual.ln_pre.weight"]))
    encoder.pre_layer_norm.beta.assign(f(state["visual.ln_pre.bias"]))
    for b, block in enumerate(encoder.encoder_layers):
        r = f"visual.transformer.resblocks.{b}."
        block.layer_norm_1.gamma.assign(f(state[f"{r}ln_1.weight"]))
        block.layer_norm_1.beta.assign(f(state[f"{r}ln_1.bias"]))
        qkv, qkv_bias = f(state[f"{r}attn.in_proj_weight"]), f(state[f"{r}attn.in_proj_bias"])
        attention = block.attention
        for part, dense in enumerate((attention.query_dense, attention.key_dense, attention.value_dense)):
            rows = slice(part * w, (part + 1) * w)
            dense.kernel.assign(qkv[rows].T.reshape(w, heads, w // heads))
            dense.bias.assign(qkv_bias[rows].reshape(heads, w // heads))
        attention.output_dense.kernel.assign(f(state[f"{r}attn.out_proj.weight"]).T.reshape(heads, w // heads, w))
        attention.output_dense.bias.assign(f(state[f"{r}attn.out_proj.bias"]))
        block.layer_norm_2.gamma.assign(f(state[f"{r}ln_2.weight"]))
        block.layer_norm_2.beta.assign(f(state[f"{r}ln_2.bias"]))
        block.dense_1.kernel.assign(f(state[f"{r}mlp.c_fc.weight"]).T)
        block.dense_1.bias.assign(f(state[f"{r}mlp.c_fc.bias"]))
        block.dense_2.kernel.assign(f(state[f"{r}mlp.c_proj.weight"]).T)
        block.dense_2.bias.assign(f(state[f"{r}mlp.c_proj.bias"]))
    encoder.layer_norm.gamma.assign(f(state["visual.ln_post.weight"]))
    encoder.layer_norm.beta.assign(f(state["visual.ln_post.bias"]))


def load_head_weights(model, state: dict) -> None:
    """``proj``, the image projections, the text heads and the temperatures."""
    f = as_float32
    model.get_layer("vision_projection").kernel.assign(f(state["visual.proj"]))  # used as x @ proj
    for branch in BRANCHES:
        model.get_layer(f"image_projection_{branch}").kernel.assign(f(state[f"{IMAGE_HEADS[branch]}.weight"]).T)
        head = TEXT_HEADS[branch]
        hidden, out = model.get_layer(f"text_head_{branch}_hidden"), model.get_layer(f"text_head_{branch}")
        hidden.kernel.assign(f(state[f"{head}.0.weight"]).T)
        hidden.bias.assign(f(state[f"{head}.0.bias"]))
        out.kernel.assign(f(state[f"{head}.2.weight"]).T)
        out.bias.assign(f(state[f"{head}.2.bias"]))
    scales = [float(np.asarray(state[LOGIT_SCALES[b]])) for b in BRANCHES]
    model.get_layer("logit_scales").log_scales.assign(np.asarray(scales, dtype="float32"))


def convert_retclip(
    checkpoint,
    out_dir: Path,
    *,
    vocab: str | None = None,
    num_heads: int | None = None,
    text_heads: int | None = None,
    sequence_length: int = 52,
) -> Converted:
    """Convert a released RET-CLIP checkpoint into ``out_dir``.

    Args:
        checkpoint: the checkpoint as :func:`kfundus.convert.read_checkpoint` read it.
        out_dir: the folder to write.
        vocab: RET-CLIP's ``vocab.txt`` (or its folder); default: one beside the checkpoint.
        num_heads: attention heads of the vision tower (default width / 64: 12 for ViT-B/16).
        text_heads: attention heads of the BERT (default hidden / 64: 12).
        sequence_length: token sequence length of the saved text input (52: RET-CLIP's
            ``tokenize`` default; its training script uses 100). With ``[CLS]`` pooling and
            masked padding the length does not change the text embedding.

    Returns:
        What was written (:class:`kfundus.convert.base.Converted`).
    """
    import keras

    from kfundus.systems.clip_lora.encoders import build_encoder

    state, path = checkpoint.state, checkpoint.path
    if (
        "visual.conv1.weight" not in state
        or "visual.proj" not in state
        or "bert.embeddings.word_embeddings.weight" not in state
    ):
        check_keys(
            state,
            {"visual.conv1.weight": (None, 3, None, None), "bert.embeddings.word_embeddings.weight": (None, None)},
            path=path,
            model=MODEL,
            kind="retclip",
        )
    layout = visual_layout(state, num_heads)
    text = bert_config(state, "bert.", num_heads=text_heads)
    report = check_keys(
        state,
        expected_keys(state, layout, text),
        path=path,
        model=MODEL,
        kind="retclip",
        ignore=IGNORED,
        hint="kfundus convert --from retclip takes the checkpoint RET-CLIP's README links (ViT-B/16 + RoBERTa).",
    )
    out_dir = Path(out_dir)
    size = layout["image_size"]
    encoder_config = {k: layout[k] for k in ("patch_size", "hidden_dim", "num_layers", "num_heads", "intermediate_dim")}
    encoder = build_encoder("clip", size, {**encoder_config, "intermediate_activation": "quick_gelu"})
    load_visual_weights(encoder, state, layout)
    encoder.save_to_preset(str(out_dir))
    bert, _ = build_bert(
        {k: as_float32(v) for k, v in state.items() if k.startswith("bert.")}, "bert.", num_heads=text_heads
    )
    with tempfile.TemporaryDirectory(prefix="kfundus-retclip-") as tmp:
        bert.save_to_preset(str(Path(tmp) / "text_encoder"))
        model = build_retclip(
            image_size=size,
            vocabulary_size=text["vocabulary_size"],
            sequence_length=int(sequence_length),
            vision_weights=str(out_dir),
            text_weights=str(Path(tmp) / "text_encoder"),
            embed_dim=layout["embed_dim"],
            text_head_dim=text["hidden_dim"],
            init_scale=90.0,
            vision_projection=layout["embed_dim"],
            text_pooling="cls",
        )
    load_head_weights(model, state)
    model.save(out_dir / RETCLIP_FILE)
    files = ["config.json", "model.weights.h5", "metadata.json", RETCLIP_FILE]
    info = {
        "image_size": size,
        "mean": CLIP_MEAN,
        "std": CLIP_STD,
        "resize": "RET-CLIP squashes each eye to image_size x image_size (bicubic, no crop); kfundus crops the "
        "field of view, pads to a square and resizes (bilinear)",
        "vision": {**encoder_config, "embed_dim": layout["embed_dim"]},
        "text": text,
        "text_pooling": "cls",
        "sequence_length": int(sequence_length),
        "lowercase": True,
        "tokenizer": None,
        "language": "Chinese (RoBERTa-wwm-ext-base-chinese vocabulary): prompts in Chinese",
    }
    vocabulary = find_vocabulary(vocab, Path(path), "RET-CLIP's RET_CLIP/clip/vocab.txt (21128 tokens)")
    if vocabulary is not None:
        save_vocabulary(
            vocabulary,
            out_dir / TOKENIZER_DIR,
            lowercase=True,
            vocabulary_size=text["vocabulary_size"],
            checkpoint=path,
            expected="RET-CLIP's own RET_CLIP/clip/vocab.txt",
        )
        files.append(f"{TOKENIZER_DIR}/")
        info["tokenizer"] = TOKENIZER_DIR
    (out_dir / CONFIG_FILE).write_text(json.dumps(info, indent=1, ensure_ascii=False))
    files.append(CONFIG_FILE)
    keras.backend.clear_session()
    return Converted(
        model="RET-CLIP ViT-B/16 image encoder, Chinese RoBERTa text encoder, tripartite projections and text heads",
        files=files,
        ignored=report.ignored,
        details={
            "vision": f"ViT {layout['hidden_dim']}-d, {layout['num_layers']} blocks, patch {layout['patch_size']}, "
            f"{layout['num_heads']} heads, QuickGELU, proj {layout['hidden_dim']} -> {layout['embed_dim']}",
            "text": f"BERT {text['num_layers']} layers, {text['hidden_dim']}-d, vocabulary {text['vocabulary_size']}",
            "preprocessing": f"RGB / 255, CLIP mean {CLIP_MEAN} / std {CLIP_STD}, {size} px",
            "tokenizer": str(vocabulary) if vocabulary else "none (give --set vocab=RET_CLIP/clip/vocab.txt)",
        },
        parity=PARITY,
        use=f"model.weights: {out_dir} (a CLIP encoder preset: clip_lora, transfer backbones); model.name: "
        "retclip_classifier, model.weights: DIR (patient-level two-eye); zero-shot: kfundus zero-shot "
        "--config retclip_odir --set model.weights=DIR",
    )
