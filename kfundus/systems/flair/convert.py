"""The released FLAIR checkpoint (or a torchvision ResNet) -> a converted FLAIR folder.

    kfundus convert --from flair flair_resnet.pth --out models/flair \\
        --set vocab=/models/Bio_ClinicalBERT/vocab.txt

Accepted files (read by :mod:`kfundus.convert.checkpoints`, never unpickled):

- ``flair_resnet.pth``, the file FLAIR's README links (``torch.save(model.state_dict())``), and
  the Hugging Face ``jusiro2/FLAIR`` folder (``model.safetensors`` + ``config.json``, the same
  keys): ``vision_model.model.*`` (torchvision ResNet-50, ``fc`` replaced by Identity, so no
  ``fc`` keys), ``vision_model.projection_head_vision.projection.weight`` (512 x 2048),
  ``text_model.model.*`` (Bio_ClinicalBERT, a ``transformers.BertModel``; files written with
  transformers < 4.31 also hold ``embeddings.position_ids``, ignored),
  ``text_model.projection_head_text.projection.weight`` (512 x 768), ``logit_scale``;
- a torchvision ResNet state dict (``conv1.weight``, ``layer1.0...``, ``fc.*`` ignored), e.g.
  torchvision's ImageNet ``resnet50-0676ba61.pth`` (FLAIR's ImageNet initialisation,
  ``IMAGENET1K_V1``): the vision encoder alone, for the architecture-matched ImageNet arm of
  the transfer study.

The folder holds ``vision.keras`` (image -> features, embedding), ``text.keras`` (tokens ->
features, embedding), ``tokenizer/`` (a keras-hub ``BertTokenizer`` preset from ``vocab.txt``)
and ``flair.json`` (caption, logit scale, sizes, preprocessing). BatchNorm counters
(``num_batches_tracked``) are ignored: they do not enter the forward pass.

The tokenizer vocabulary is not in FLAIR's checkpoint (FLAIR downloads Bio_ClinicalBERT's
tokenizer at run time): give the ``vocab.txt`` of ``emilyalsentzer/Bio_ClinicalBERT`` with
``--set vocab=FILE_OR_FOLDER``, or put it beside the checkpoint. Without it the towers are
converted and zero-shot says what is missing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from kfundus.convert.base import Converted
from kfundus.convert.bert import (
    bert_config,
    bert_keys,
    build_bert,
    find_vocabulary,
    layer_norm_names,
    lowercase_of,
    save_vocabulary,
)
from kfundus.convert.checkpoints import as_float32
from kfundus.convert.keys import check_keys
from kfundus.errors import DataError
from kfundus.systems.flair.model import (
    CAPTION,
    CONFIG_FILE,
    IMAGE_SIZE,
    MAX_TOKENS,
    TEXT_FILE,
    TOKENIZER_DIR,
    VISION_FILE,
    build_flair_text,
    build_flair_vision,
    flair_resnet,
)

MODEL = "FLAIR (ResNet-50 + Bio_ClinicalBERT)"
VISION_PREFIX = "vision_model.model."
TEXT_PREFIX = "text_model.model."
VISION_HEAD = "vision_model.projection_head_vision.projection.weight"
TEXT_HEAD = "text_model.projection_head_text.projection.weight"
IGNORED = (r"num_batches_tracked$", r"embeddings\.position_ids$", r"^(vision_model\.model\.)?fc\.(weight|bias)$")
PARITY = (
    "tests/test_flair.py compares converted FLAIR towers with torchvision ResNet + transformers BertModel "
    "references (random weights, FLAIR's key layout): max abs difference below 1e-4 in float32 on features and "
    "embeddings; tests/foundation does the same at full size (ResNet-50, BERT-base)"
)


# ---------------------------------------------------------------------------
# the ResNet


def resnet_layout(state: dict, prefix: str) -> dict:
    """ResNetBackbone arguments read from a torchvision ResNet state dict's shapes.

    Raises:
        DataError: not a bottleneck ResNet under ``prefix``.
    """
    blocks = []
    for stage in range(1, 5):
        found = {
            int(m.group(1)) for k in state for m in [re.match(rf"{re.escape(prefix)}layer{stage}\.(\d+)\.", k)] if m
        }
        blocks.append(max(found) + 1 if found else 0)
    if 0 in blocks or f"{prefix}layer1.0.conv3.weight" not in state:
        raise DataError(
            f"no torchvision bottleneck ResNet under {prefix!r} (blocks per stage {blocks}; FLAIR's vision "
            "encoder is a ResNet-50, blocks [3, 4, 6, 3])"
        )
    filters = [int(np.shape(state[f"{prefix}layer{s}.0.conv1.weight"])[0]) for s in range(1, 5)]
    stem = int(np.shape(state[f"{prefix}conv1.weight"])[0])
    return {
        "stackwise_num_filters": filters,
        "stackwise_num_blocks": blocks,
        "stackwise_num_strides": [1, 2, 2, 2],
        "block_type": "bottleneck_block",
        "use_pre_activation": False,
        "input_conv_filters": [stem],
        "input_conv_kernel_sizes": [int(np.shape(state[f"{prefix}conv1.weight"])[-1])],
    }


def _pairs(layout: dict, prefix: str):
    """``(keras layer name, torch prefix, kind)`` for every conv and batch norm of the ResNet."""
    yield "conv1_conv", f"{prefix}conv1", "conv"
    yield "conv1_bn", f"{prefix}bn1", "bn"
    for s, blocks in enumerate(layout["stackwise_num_blocks"]):
        for b in range(blocks):
            keras_name, torch_name = f"stack{s}_block{b}", f"{prefix}layer{s + 1}.{b}"
            if b == 0:
                yield f"{keras_name}_0_conv", f"{torch_name}.downsample.0", "conv"
                yield f"{keras_name}_0_bn", f"{torch_name}.downsample.1", "bn"
            for i in (1, 2, 3):
                yield f"{keras_name}_{i}_conv", f"{torch_name}.conv{i}", "conv"
                yield f"{keras_name}_{i}_bn", f"{torch_name}.bn{i}", "bn"


BN_FIELDS = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"), ("moving_variance", "running_var"))


def resnet_expected(backbone, layout: dict, prefix: str) -> dict:
    """``{torch key: shape}`` the converted ResNet takes."""
    expected = {}
    for keras_name, torch_name, kind in _pairs(layout, prefix):
        layer = backbone.get_layer(keras_name)
        if kind == "conv":
            kh, kw, cin, cout = layer.kernel.shape
            expected[f"{torch_name}.weight"] = (cout, cin, kh, kw)
        else:
            for _, field in BN_FIELDS:
                expected[f"{torch_name}.{field}"] = (int(layer.gamma.shape[0]),)
    return expected


def load_resnet_weights(backbone, state: dict, layout: dict, prefix: str) -> None:
    """Copy torchvision conv (``(out, in, kh, kw)`` -> ``(kh, kw, in, out)``) and BatchNorm
    (weight, bias, running mean and variance) weights into the keras-hub ResNet."""
    for keras_name, torch_name, kind in _pairs(layout, prefix):
        layer = backbone.get_layer(keras_name)
        if kind == "conv":
            layer.kernel.assign(np.transpose(as_float32(state[f"{torch_name}.weight"]), (2, 3, 1, 0)))
        else:
            for keras_field, torch_field in BN_FIELDS:
                getattr(layer, keras_field).assign(as_float32(state[f"{torch_name}.{torch_field}"]))


# ---------------------------------------------------------------------------
# the converter


def convert_flair(
    checkpoint,
    out_dir: Path,
    *,
    vocab: str | None = None,
    num_heads: int | None = None,
    image_size: int = IMAGE_SIZE,
    lowercase: bool | None = None,
) -> Converted:
    """Convert a FLAIR (or torchvision ResNet) checkpoint into ``out_dir``.

    Args:
        checkpoint: the checkpoint as :func:`kfundus.convert.read_checkpoint` read it.
        out_dir: the folder to write.
        vocab: the text encoder's ``vocab.txt`` (or its folder); default: one beside the
            checkpoint.
        num_heads: attention heads of the text encoder (default hidden / 64: 12 for
            Bio_ClinicalBERT).
        image_size: the input size the saved vision tower is built for (FLAIR: 512; the
            classifier builders rebuild it at any size).
        lowercase: lower-case prompts (default: the vocabulary folder's
            ``tokenizer_config.json``, else True, as ``transformers.BertTokenizer``).

    Returns:
        What was written (:class:`kfundus.convert.base.Converted`).
    """
    import keras

    state, path = checkpoint.state, checkpoint.path
    flair = f"{VISION_PREFIX}conv1.weight" in state
    prefix = VISION_PREFIX if flair else ""
    if not flair and "conv1.weight" not in state:
        check_keys(state, {f"{VISION_PREFIX}conv1.weight": (None, 3, None, None)}, path=path, model=MODEL, kind="flair")
    layout = resnet_layout(state, prefix)
    backbone = flair_resnet(layout)
    expected = resnet_expected(backbone, layout, prefix)
    vision_dim = int(layout["stackwise_num_filters"][-1]) * 4
    has_text = flair and any(k.startswith(TEXT_PREFIX) for k in state)
    proj_dim = int(np.shape(state[VISION_HEAD])[0]) if VISION_HEAD in state else None
    optional = []
    if flair:
        expected[VISION_HEAD] = (None, vision_dim)
        expected["logit_scale"] = ()
        optional += ["logit_scale"]
    if has_text:
        names = layer_norm_names(state, TEXT_PREFIX)
        config = bert_config(state, TEXT_PREFIX, num_heads=num_heads)
        for key in bert_keys(config["num_layers"], TEXT_PREFIX, layer_norm=names):
            expected[key] = tuple(np.shape(state[key])) if key in state else (None,)
        expected[TEXT_HEAD] = (proj_dim, config["hidden_dim"])
        optional += [f"{TEXT_PREFIX}pooler.dense.weight", f"{TEXT_PREFIX}pooler.dense.bias"]
    report = check_keys(
        state,
        expected,
        path=path,
        model=MODEL,
        kind="flair",
        ignore=IGNORED,
        optional=optional,
        hint="kfundus convert --from flair takes FLAIR's flair_resnet.pth, its Hugging Face folder, or a torchvision "
        "ResNet state dict.",
    )
    load_resnet_weights(backbone, state, layout, prefix)
    vision = build_flair_vision(backbone, image_size=int(image_size), proj_dim=proj_dim)
    if proj_dim:
        vision.get_layer("vision_projection").kernel.assign(as_float32(state[VISION_HEAD]).T)
    out_dir = Path(out_dir)
    vision.save(out_dir / VISION_FILE)
    files = [VISION_FILE]
    details = {
        "vision": f"ResNet (torchvision layout) blocks {layout['stackwise_num_blocks']}, "
        f"widths {layout['stackwise_num_filters']}, {vision_dim}-d pooled feature",
        "projection": f"{vision_dim} -> {proj_dim}, no bias, L2 before and after" if proj_dim else None,
        "preprocessing": "RGB / 255, no mean/std normalisation; FLAIR resizes the long side to 512 and pads "
        "bottom/right with zeros (kfundus pads centred, see docs/systems/flair.md)",
        "image_size": int(image_size),
    }
    flair_config = {
        "source_kind": "flair" if flair else "torchvision_resnet",
        "caption": CAPTION,
        "image_size": int(image_size),
        "vision_dim": vision_dim,
        "proj_dim": proj_dim,
        "logit_scale": float(np.asarray(state["logit_scale"])) if "logit_scale" in state else None,
        "max_tokens": MAX_TOKENS,
        "resnet": layout,
        "vision": VISION_FILE,
        "text": None,
        "tokenizer": None,
    }
    if has_text:
        text_state = {k: as_float32(v) for k, v in state.items() if k.startswith(TEXT_PREFIX)}
        bert, _ = build_bert(text_state, TEXT_PREFIX, num_heads=num_heads)
        text = build_flair_text(bert, proj_dim=proj_dim)
        text.get_layer("text_projection").kernel.assign(as_float32(state[TEXT_HEAD]).T)
        text.save(out_dir / TEXT_FILE)
        files.append(TEXT_FILE)
        flair_config["text"] = TEXT_FILE
        details["text"] = f"BERT {config['num_layers']} layers, {config['hidden_dim']}-d, {config['num_heads']} heads"
        vocabulary = find_vocabulary(vocab, Path(path), "Bio_ClinicalBERT's vocab.txt (FLAIR's text encoder)")
        if vocabulary is not None:
            lower = lowercase_of(vocabulary.parent) if lowercase is None else bool(lowercase)
            save_vocabulary(
                vocabulary,
                out_dir / TOKENIZER_DIR,
                lowercase=lower,
                vocabulary_size=config["vocabulary_size"],
                checkpoint=path,
                expected="the vocab.txt it was trained with (Bio_ClinicalBERT's)",
            )
            files.append(f"{TOKENIZER_DIR}/")
            flair_config["tokenizer"] = TOKENIZER_DIR
            details["tokenizer"] = f"{vocabulary} ({'lower-cased' if lower else 'cased'})"
        else:
            details["tokenizer"] = "none (no vocab.txt given): zero-shot needs --set vocab=FILE"
    (out_dir / CONFIG_FILE).write_text(json.dumps(flair_config, indent=1))
    files.append(CONFIG_FILE)
    keras.backend.clear_session()
    use = f"model.name: flair, model.weights: {out_dir}; transfer backbone {{family: flair, weights: {out_dir}}}" + (
        "; zero-shot: kfundus zero-shot --config flair_zero_shot --set model.weights=DIR" if has_text else ""
    )
    return Converted(
        model="FLAIR ResNet-50 vision encoder + projection" + (" and Bio_ClinicalBERT text encoder" if has_text else "")
        if flair
        else "torchvision ResNet vision encoder (no FLAIR projection)",
        files=files,
        ignored=report.ignored,
        details=details,
        parity=PARITY,
        use=use,
    )
