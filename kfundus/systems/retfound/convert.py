"""RETFound checkpoint -> kfundus model folder, and back to Keras layers.

The released files (``RETFound_cfp_weights.pth``, ``RETFound_oct_weights.pth``, and the
Hugging Face ``YukunZhou/RETFound_mae_*`` repositories' ``RETFound_mae_*.pth``) are MAE
pre-training checkpoints, ``{"model": state_dict}``: the ViT-L/16 encoder in timm's key
layout plus the MAE decoder. A RETFound *fine-tuned* classifier (RETFound's
``main_finetune.py``) has the same encoder keys, ``fc_norm`` instead of ``norm``, and a
``head``. Both are read, as are the same keys in a ``.safetensors`` file or a Hugging Face
folder (``model.safetensors`` / ``pytorch_model.bin`` + ``config.json``).

Key mapping (timm -> :class:`kfundus.systems.retfound.vit.RETFoundBackbone`):

=====================================  =============================================
``patch_embed.proj.weight`` (D,3,p,p)   ``patch_embed/kernel`` (p,p,3,D), transposed
``cls_token``, ``pos_embed``            ``embeddings/cls_token``, ``embeddings/pos_embed``
``blocks.i.norm1``, ``norm2``           ``blocks_i/norm1``, ``norm2`` (gamma, beta)
``blocks.i.attn.qkv`` (3D, D)           split in thirds -> ``attn/query``, ``key``, ``value``
                                        kernels (D, heads, D/heads)
``blocks.i.attn.proj`` (D, D)           ``attn/attention_output`` kernel (heads, D/heads, D)
``blocks.i.mlp.fc1``, ``fc2``           ``blocks_i/fc1``, ``fc2`` (kernels transposed)
``fc_norm`` (avg) or ``norm`` (token)   ``pooling/fc_norm`` or ``pooling/norm``
``head`` (classes, D)                   ``head.npz`` (the classifier's ``logits`` layer)
=====================================  =============================================

Dropped and reported: the MAE decoder (``decoder_*``, ``mask_token``), and the encoder's
``norm`` when pooling is ``avg`` (RETFound deletes it for fine-tuning). With ``avg``
pooling and no ``fc_norm`` in the file (a pre-training checkpoint), ``fc_norm`` starts as
the identity (weight 1, bias 0), exactly as RETFound's fine-tuning creates it.

The folder (``kfundus convert --from retfound FILE --out DIR``):

- ``encoder.keras``: images normalised as RETFound does (ImageNet mean/std on [0, 1]
  pixels) -> features, ``keras.saving.load_model`` reads it (with kfundus imported);
- ``config.json``: architecture, pooling, native image size, preprocessing, head classes;
- ``head.npz``: the fine-tuned head (``kernel``, ``bias``), when the file has one;
- ``conversion.json``: source, SHA-256, ignored keys, time and memory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import keras
import numpy as np

from kfundus.convert.base import Converted
from kfundus.convert.checkpoints import Checkpoint, as_float32
from kfundus.convert.keys import check_keys
from kfundus.errors import ConfigError, DataError
from kfundus.systems.retfound.vit import (
    BACKBONE_NAME,
    LAYER_NORM_EPSILON,
    POOLINGS,
    RETFoundBackbone,
    ViTPooling,
    resize_positions,
)

ENCODER_FILE = "encoder.keras"
CONFIG_FILE = "config.json"
HEAD_FILE = "head.npz"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# heads of timm's standard widths (the head count is not in the weights' shapes)
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
IGNORED = (r"^decoder_", r"^mask_token$")
PREPROCESSING = {
    "pixels": "RGB scaled to [0, 1], then (x - mean) / std per channel (timm's IMAGENET_DEFAULT_MEAN/STD)",
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "input_size": 224,
    "resize": "RETFound evaluates at Resize(256, bicubic) + CenterCrop(224); kfundus feeds its own fundus crop, "
    "resized to data.image_size",
}
PARITY = (
    "features and logits equal timm's VisionTransformer (global_pool avg/token) built with random weights in "
    "the released key layout, max abs difference < 1e-4 in float32 (tests/test_retfound.py; full ViT-L/16: "
    "tests/foundation, make test-foundation)"
)


def infer_architecture(state: dict, path, num_heads: int | None = None, config: dict | None = None) -> dict:
    """Encoder sizes from the tensor shapes (heads from ``num_heads``, a Hugging Face
    ``config.json`` or timm's standard widths)."""
    if "patch_embed.proj.weight" not in state or "blocks.0.attn.qkv.weight" not in state:
        return {}
    dim, _, patch, _ = np.shape(state["patch_embed.proj.weight"])
    depth = len({int(m.group(1)) for k in state for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    mlp = int(np.shape(state.get("blocks.0.mlp.fc1.weight", np.zeros((4 * dim, dim))))[0])
    positions = int(np.shape(state.get("pos_embed", np.zeros((1, 1, dim))))[1]) - 1
    grid = int(round(np.sqrt(max(positions, 0))))
    if num_heads is None and config:
        args = config.get("model_args") or config.get("pretrained_cfg", {}).get("model_args") or config
        num_heads = args.get("num_heads") or args.get("num_attention_heads")
    if num_heads is None:
        num_heads = HEADS_BY_WIDTH.get(int(dim))
    if num_heads is None:
        raise ConfigError(
            f"{path}: a {dim}-wide ViT; its number of attention heads is not in the weights: give it "
            f"(e.g. --set num_heads={max(1, dim // 64)})"
        )
    if dim % int(num_heads):
        raise ConfigError(f"num_heads={num_heads} does not divide the width {dim} of {path}")
    return {
        "patch_size": int(patch),
        "hidden_dim": int(dim),
        "num_layers": depth,
        "num_heads": int(num_heads),
        "mlp_dim": mlp,
        "image_size": int(grid * patch),
    }


def expected_keys(arch: dict, pooling: str) -> dict:
    """``{key: shape}`` of a timm ViT with this architecture and pooling (plus the optional head)."""
    d, p, m, n = (
        arch["hidden_dim"],
        arch["patch_size"],
        arch["mlp_dim"],
        (arch["image_size"] // arch["patch_size"]) ** 2,
    )
    keys = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, n + 1, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
        "head.weight": (None, d),
        "head.bias": (None,),
    }
    for i in range(arch["num_layers"]):
        b = f"blocks.{i}."
        keys.update(
            {
                b + "norm1.weight": (d,),
                b + "norm1.bias": (d,),
                b + "attn.qkv.weight": (3 * d, d),
                b + "attn.qkv.bias": (3 * d,),
                b + "attn.proj.weight": (d, d),
                b + "attn.proj.bias": (d,),
                b + "norm2.weight": (d,),
                b + "norm2.bias": (d,),
                b + "mlp.fc1.weight": (m, d),
                b + "mlp.fc1.bias": (m,),
                b + "mlp.fc2.weight": (d, m),
                b + "mlp.fc2.bias": (d,),
            }
        )
    norm = "fc_norm" if pooling == "avg" else "norm"
    keys.update({f"{norm}.weight": (d,), f"{norm}.bias": (d,)})
    return keys


def keras_weights(state: dict, arch: dict, pooling: str):
    """``(Keras variable path, array)`` pairs for :func:`build_encoder`'s model, from a timm
    state dict, one at a time (a ViT-L's transposed copies are never all held at once)."""
    d, h = arch["hidden_dim"], arch["num_heads"]

    def f(key):
        return as_float32(state[key])

    yield "patch_embed/kernel", f("patch_embed.proj.weight").transpose(2, 3, 1, 0)
    yield "patch_embed/bias", f("patch_embed.proj.bias")
    yield "embeddings/cls_token", f("cls_token")
    yield "embeddings/pos_embed", f("pos_embed")
    for i in range(arch["num_layers"]):
        b, k = f"blocks.{i}.", f"blocks_{i}/"
        qkv, qkv_bias = f(b + "attn.qkv.weight"), f(b + "attn.qkv.bias")
        for j, name in enumerate(("query", "key", "value")):
            yield k + f"attn/{name}/kernel", qkv[j * d : (j + 1) * d].T.reshape(d, h, d // h)
            yield k + f"attn/{name}/bias", qkv_bias[j * d : (j + 1) * d].reshape(h, d // h)
        yield k + "attn/attention_output/kernel", f(b + "attn.proj.weight").T.reshape(h, d // h, d)
        yield k + "attn/attention_output/bias", f(b + "attn.proj.bias")
        for norm in ("norm1", "norm2"):
            yield k + f"{norm}/gamma", f(b + f"{norm}.weight")
            yield k + f"{norm}/beta", f(b + f"{norm}.bias")
        for fc in ("fc1", "fc2"):
            yield k + f"{fc}/kernel", f(b + f"mlp.{fc}.weight").T
            yield k + f"{fc}/bias", f(b + f"mlp.{fc}.bias")
    norm = "fc_norm" if pooling == "avg" else "norm"
    if f"{norm}.weight" in state:
        yield f"pooling/{norm}/gamma", f(f"{norm}.weight")
        yield f"pooling/{norm}/beta", f(f"{norm}.bias")
    else:  # a pre-training checkpoint: RETFound's fine-tuning creates fc_norm afresh (LayerNorm init)
        yield f"pooling/{norm}/gamma", np.ones(d, np.float32)
        yield f"pooling/{norm}/beta", np.zeros(d, np.float32)


def build_parts(
    arch: dict,
    pooling: str = "avg",
    *,
    image_size: int | None = None,
    drop_path: float = 0.0,
    layer_norm_epsilon: float = LAYER_NORM_EPSILON,
):
    """``(RETFoundBackbone, ViTPooling)``, built and randomly initialised, not yet called
    (a classifier calls the backbone once per input; Grad-CAM relies on that)."""
    size = int(image_size or arch["image_size"])
    sizes = {k: arch[k] for k in ("patch_size", "hidden_dim", "num_layers", "num_heads", "mlp_dim")}
    backbone = RETFoundBackbone(
        image_size=size, drop_path=drop_path, layer_norm_epsilon=layer_norm_epsilon, name=BACKBONE_NAME, **sizes
    )
    pool = ViTPooling(pooling, layer_norm_epsilon, name="pooling")
    pool.build((None, int(backbone.output.shape[1]), arch["hidden_dim"]))
    return backbone, pool


def build_encoder(
    arch: dict,
    pooling: str = "avg",
    *,
    image_size: int | None = None,
    drop_path: float = 0.0,
    layer_norm_epsilon: float = LAYER_NORM_EPSILON,
    name: str = "retfound_encoder",
) -> keras.Model:
    """Normalised images -> features: :class:`RETFoundBackbone` (nested, ``retfound_backbone``)
    + :class:`ViTPooling` (``pooling``), randomly initialised."""
    backbone, pool = build_parts(
        arch, pooling, image_size=image_size, drop_path=drop_path, layer_norm_epsilon=layer_norm_epsilon
    )
    images = keras.Input(backbone.input.shape[1:], name="images")
    return keras.Model(images, pool(backbone(images)), name=name)


def assign(layers, weights) -> None:
    """Put ``(variable path, array)`` pairs (or a dict) into a model built by
    :func:`build_encoder` (or the layers :func:`build_parts` returns), the position table
    resized to the model's grid; every trainable variable must be covered."""
    layers = layers if isinstance(layers, (list, tuple)) else [layers]
    variables = {v.path: v for layer in layers for v in layer.weights}
    seen = set()
    for path, value in weights.items() if isinstance(weights, dict) else weights:
        variable = variables.get(path)
        if variable is None:
            raise DataError(f"internal: the Keras encoder has no variable {path}")
        if path.endswith("pos_embed") and tuple(value.shape) != tuple(variable.shape):
            grid = int(round(np.sqrt(variable.shape[1] - 1)))
            value = resize_positions(value, grid)
        if tuple(value.shape) != tuple(variable.shape):
            raise DataError(f"internal: {path} is {value.shape}, the encoder needs {tuple(variable.shape)}")
        variable.assign(value)
        seen.add(path)
    missing = sorted(p for p, v in variables.items() if v.trainable and p not in seen)
    if missing:
        raise DataError(f"internal: no weights for {missing[:5]}")


def convert_retfound(
    checkpoint: Checkpoint,
    out_dir: Path,
    *,
    pooling: str = "avg",
    num_heads: int | None = None,
    layer_norm_epsilon: float = LAYER_NORM_EPSILON,
) -> Converted:
    """Convert a RETFound checkpoint (see the module docstring) into ``out_dir``.

    Args:
        checkpoint: the checkpoint, read by ``kfundus.convert``.
        out_dir: the folder to write.
        pooling: ``avg`` (global average pooling + ``fc_norm``, RETFound's fine-tuning) or
            ``token`` (class token after ``norm``, the MAE encoder as pre-trained).
        num_heads: attention heads, when the width is not one of timm's standard ViTs.
        layer_norm_epsilon: LayerNorm epsilon (RETFound: 1e-6).

    Returns:
        What was written (``kfundus.convert.Converted``).
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling={pooling!r}: use one of {list(POOLINGS)} (e.g. --set pooling=avg)")
    state, path = checkpoint.state, checkpoint.path
    model_name = "RETFound (MAE ViT, timm layout)"
    arch = infer_architecture(state, path, num_heads, checkpoint.config)
    if not arch:  # not a ViT at all: let check_keys say what it is
        vit = {"patch_embed.proj.weight": (None,) * 4, "blocks.0.attn.qkv.weight": (None, None)}
        check_keys(state, vit, path=path, model=model_name, kind="retfound")
    expected = expected_keys(arch, pooling)
    other_norm = "norm" if pooling == "avg" else "fc_norm"
    norm = "fc_norm" if pooling == "avg" else "norm"
    ignore = [*IGNORED, rf"^{other_norm}\.(weight|bias)$"] if pooling == "avg" else list(IGNORED)
    optional = ["head.weight", "head.bias"] + ([f"{norm}.weight", f"{norm}.bias"] if pooling == "avg" else [])
    hint = (
        "A fine-tuned checkpoint pooled with the class token has norm.* and no fc_norm.*: --set pooling=token."
        if pooling == "avg"
        else "A checkpoint fine-tuned with global pooling has fc_norm.* and no norm.*: --set pooling=avg."
    )
    report = check_keys(
        state, expected, path=path, model=model_name, kind="retfound", ignore=ignore, optional=optional, hint=hint
    )
    if pooling == "avg" and "head.weight" in state and "fc_norm.weight" not in state:
        raise DataError(
            f"{path} is a classifier fine-tuned on the class token (a head, norm.* and no fc_norm.*): its head "
            "expects class-token features; convert it with --set pooling=token"
        )
    encoder = build_encoder(arch, pooling, layer_norm_epsilon=layer_norm_epsilon)
    assign(encoder, keras_weights(state, arch, pooling))
    encoder.save(out_dir / ENCODER_FILE)
    files = [ENCODER_FILE, CONFIG_FILE]
    head_classes = None
    if "head.weight" in state and "head.bias" in state and np.shape(state["head.weight"])[0] > 0:
        head_classes = int(np.shape(state["head.weight"])[0])
        np.savez(out_dir / HEAD_FILE, kernel=as_float32(state["head.weight"]).T, bias=as_float32(state["head.bias"]))
        files.append(HEAD_FILE)
    fresh_norm = pooling == "avg" and "fc_norm.weight" not in state
    config = {
        "kind": "retfound",
        "architecture": {k: arch[k] for k in ("patch_size", "hidden_dim", "num_layers", "num_heads", "mlp_dim")},
        "layer_norm_epsilon": layer_norm_epsilon,
        "image_size": arch["image_size"],
        "pooling": pooling,
        "fc_norm": "identity (new, as RETFound's fine-tuning starts)" if fresh_norm else "from the checkpoint",
        "head_classes": head_classes,
        "parameters": int(encoder.count_params()),
        "preprocessing": PREPROCESSING,
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    size = {(1024, 24): "ViT-L", (768, 12): "ViT-B"}.get((arch["hidden_dim"], arch["num_layers"]), "ViT")
    return Converted(
        model=f"RETFound {size}/{arch['patch_size']} encoder ({pooling} pooling, {arch['image_size']} px"
        + (f", {head_classes}-class head" if head_classes else "")
        + ")",
        files=files,
        ignored=report.ignored,
        details=config,
        parity=PARITY,
        use=f"model.name: retfound, model.weights: {out_dir} (or transfer.backbones: [{{name: retfound, "
        f"family: retfound, weights: {out_dir}}}])",
    )


# ---------------------------------------------------------------------------
# reading a converted folder


def read_folder(folder) -> dict:
    """The ``config.json`` of a converted RETFound folder (DataError naming what is wrong)."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not (folder / ENCODER_FILE).is_file() or not config_path.is_file():
        raise DataError(
            f"{folder} is not a converted RETFound folder (it needs {ENCODER_FILE} and {CONFIG_FILE}); "
            f"convert the checkpoint with: kfundus convert --from retfound CHECKPOINT --out {folder}"
        )
    config = json.loads(config_path.read_text())
    if config.get("kind") != "retfound":
        raise DataError(f"{folder} holds a converted {config.get('kind')!r} model, not RETFound")
    return config


def load_encoder(folder, image_size: int | None = None, *, drop_path: float = 0.0, pooling: str | None = None):
    """The converted encoder of ``folder`` rebuilt at ``image_size`` (position table
    resized) with stochastic depth ``drop_path``: ``(backbone, pooling layer, config)``.

    Args:
        folder: a folder ``kfundus convert --from retfound`` wrote.
        image_size: input side (None: the checkpoint's).
        drop_path: stochastic-depth rate of the last block (fine-tuning: RETFound uses 0.2).
        pooling: must match the folder's when given.

    Returns:
        ``(RETFoundBackbone, ViTPooling, config dict)``, not yet connected to each other.
    """
    config = read_folder(folder)
    if pooling is not None and pooling != config["pooling"]:
        raise ConfigError(
            f"{folder} was converted with pooling={config['pooling']}; convert it again with "
            f"--set pooling={pooling} (or use model.options.pooling={config['pooling']})"
        )
    import kfundus.systems.retfound.vit  # noqa: F401  (registers the classes for load_model)

    saved = keras.saving.load_model(Path(folder) / ENCODER_FILE, compile=False)
    backbone, pool = build_parts(
        config["architecture"],
        config["pooling"],
        image_size=image_size or config["image_size"],
        drop_path=drop_path,
        layer_norm_epsilon=config.get("layer_norm_epsilon", LAYER_NORM_EPSILON),
    )
    assign([backbone, pool], ((v.path, keras.ops.convert_to_numpy(v)) for v in saved.weights if v.trainable))
    del saved
    return backbone, pool, config


def load_head(folder) -> tuple[np.ndarray, np.ndarray] | None:
    """``(kernel (dim, classes), bias)`` of a converted fine-tuned head, or None."""
    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        return None
    with np.load(path) as data:
        return data["kernel"], data["bias"]
