"""Key diagnostics every converter uses: does a state dict hold the model it was asked to be,
and if not, what is it?

:func:`check_keys` compares a state dict with the keys (and shapes) a model needs. A file
that does not match raises a :class:`kfundus.errors.DataError` naming the file, the model
it was asked to be, the first missing and unexpected keys, the shape mismatches, and which
supported model the file looks like instead (:func:`identify`), with the command that
converts it. Keys a converter knows and drops on purpose (the MAE decoder of a RETFound
pre-training file, an optimizer's leftovers) are returned as ``ignored`` for the
conversion report.

:data:`SIGNATURES` is the table :func:`identify` reads: one entry per layout kfundus knows,
with the keys that give it away. A new converter adds its layout there.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from kfundus.errors import DataError

SHOWN = 5  # keys listed per kind of problem in an error message


@dataclasses.dataclass(frozen=True)
class Signature:
    """A checkpoint layout :func:`identify` recognises.

    Attributes:
        name: short name (``retfound``, ``mae``, ``flair``, ...).
        requires: regular expressions; every one must match at least one key.
        describe: ``state -> str``, what the file is (sizes read from the shapes).
        convert: the ``kfundus convert --from`` kind that reads it (None: not supported).
        excludes: regular expressions none of the keys may match.
    """

    name: str
    requires: tuple
    describe: Callable
    convert: str | None = None
    excludes: tuple = ()

    def matches(self, keys: list[str]) -> bool:
        return all(any(re.search(p, k) for k in keys) for p in self.requires) and not any(
            re.search(p, k) for p in self.excludes for k in keys
        )


def _count(state, pattern: str) -> int:
    found = {m.group(1) for k in state for m in [re.match(pattern, k)] if m}
    return len(found)


def _shape(state, key, axis=0, default="?"):
    value = state.get(key)
    return int(np.shape(value)[axis]) if value is not None and np.ndim(value) > axis else default


def _vit(state, prefix: str = "") -> str:
    dim = _shape(state, f"{prefix}cls_token", -1, _shape(state, f"{prefix}patch_embed.proj.weight"))
    patch = _shape(state, f"{prefix}patch_embed.proj.weight", 2)
    depth = _count(state, rf"{re.escape(prefix)}blocks\.(\d+)\.")
    size = {(384, 12): "ViT-S", (768, 12): "ViT-B", (1024, 24): "ViT-L", (1280, 32): "ViT-H"}.get((dim, depth), "ViT")
    pool = "global-pool + fc_norm" if f"{prefix}fc_norm.weight" in state else "class token + norm"
    head = _shape(state, f"{prefix}head.weight")
    classes = f", a {head}-class head" if head != "?" else ""
    return f"{size}/{patch} ({dim}-d, {depth} blocks, {pool}{classes})"


def _resnet(state, prefix: str) -> str:
    blocks = [_count(state, rf"{re.escape(prefix)}layer{i}\.(\d+)\.") for i in range(1, 5)]
    name = {(3, 4, 6, 3): "ResNet-50", (3, 4, 23, 3): "ResNet-101", (2, 2, 2, 2): "ResNet-18"}.get(
        tuple(blocks), "ResNet"
    )
    return f"{name} (torchvision layout, blocks {blocks})"


def _bert(state, prefix: str) -> str:
    layers = _count(state, rf"{re.escape(prefix)}encoder\.layer\.(\d+)\.")
    hidden = _shape(state, f"{prefix}embeddings.word_embeddings.weight", 1)
    vocab = _shape(state, f"{prefix}embeddings.word_embeddings.weight", 0)
    return f"BERT ({layers} layers, {hidden}-d, vocabulary {vocab})"


def _clip_visual(state, prefix: str = "visual.") -> str:
    width = _shape(state, f"{prefix}conv1.weight")
    patch = _shape(state, f"{prefix}conv1.weight", 2)
    layers = _count(state, rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    return f"ViT ({width}-d, {layers} layers, patch {patch})"


SIGNATURES: list[Signature] = [
    Signature(
        "mae",
        (r"^blocks\.0\.attn\.qkv\.weight$", r"^(decoder_embed|decoder_blocks|mask_token|decoder_pred)"),
        lambda s: (
            f"a RETFound/MAE pre-training checkpoint: a {_vit(s)} encoder plus the MAE decoder "
            "(the decoder is dropped on conversion)"
        ),
        "retfound",
    ),
    Signature(
        "retfound",
        (r"^patch_embed\.proj\.weight$", r"^blocks\.0\.attn\.qkv\.weight$", r"^pos_embed$"),
        lambda s: f"a RETFound / timm VisionTransformer checkpoint, {_vit(s)}",
        "retfound",
        excludes=(r"^blocks\.0\.ls1\.", r"^register_tokens$"),
    ),
    Signature(
        "dinov2",
        (r"^(backbone\.)?blocks\.0\.(ls1\.gamma|attn\.qkv\.weight)$", r"^(backbone\.)?(blocks\.0\.ls1|mask_token)"),
        lambda s: (
            "a DINOv2-style ViT (layer scale; RETFound_dinov2 is such a checkpoint), which kfundus does not convert"
        ),
        None,
    ),
    Signature(
        "hf_vit",
        (r"(^|\.)embeddings\.patch_embeddings\.projection\.weight$", r"encoder\.layer\.0\.attention\."),
        lambda s: (
            "a Hugging Face transformers ViT / ViTMAE checkpoint (embeddings.patch_embeddings..., "
            "encoder.layer.N...), which kfundus does not convert; use the timm-layout .pth file"
        ),
        None,
    ),
    Signature(
        "flair",
        (r"^vision_model\.model\.conv1\.weight$",),
        lambda s: (
            f"a FLAIR checkpoint: a {_resnet(s, 'vision_model.model.')} vision encoder"
            + (
                f" and a {_bert(s, 'text_model.model.')} text encoder"
                if any(k.startswith("text_model.model.") for k in s)
                else ""
            )
        ),
        "flair",
    ),
    Signature(
        "retclip",
        (
            r"^visual\.(conv1|transformer\.resblocks\.0)\.",
            r"^bert\.",
            r"^(global_feature_mapping|text_projection_left)",
        ),
        lambda s: (
            f"a RET-CLIP checkpoint: a {_clip_visual(s)} image encoder, a {_bert(s, 'bert.')} text encoder "
            "and the left/right/patient projections"
        ),
        "retclip",
    ),
    Signature(
        "chinese_clip",
        (r"^visual\.(conv1|transformer\.resblocks\.0)\.", r"^bert\."),
        lambda s: (
            f"a Chinese-CLIP checkpoint ({_clip_visual(s)} + {_bert(s, 'bert.')}) without RET-CLIP's "
            "left/right/patient projections"
        ),
        None,
    ),
    Signature(
        "openai_clip",
        (r"^visual\.conv1\.weight$", r"^token_embedding\.weight$"),
        lambda s: (
            f"an OpenAI-CLIP / open_clip checkpoint ({_clip_visual(s)} image tower + its own text "
            "transformer), which kfundus does not convert"
        ),
        None,
    ),
    Signature(
        "torchvision_resnet",
        (r"^conv1\.weight$", r"^layer1\.0\.conv1\.weight$"),
        lambda s: f"a {_resnet(s, '')} image classifier (ImageNet-style)",
        None,
    ),
    Signature(
        "bert",
        (r"^(bert\.)?embeddings\.word_embeddings\.weight$", r"encoder\.layer\.0\.attention\.self\.query\.weight$"),
        lambda s: (
            "a Hugging Face "
            + _bert(s, "bert." if any(k.startswith("bert.") for k in s) else "")
            + " text encoder alone"
        ),
        None,
    ),
]


def identify(state: Mapping) -> list[tuple[str, str, str | None]]:
    """What a state dict looks like: ``[(signature name, description, convert kind)]``,
    most specific first (empty when nothing matches)."""
    keys = list(state)
    return [(s.name, s.describe(state), s.convert) for s in SIGNATURES if s.matches(keys)][:1] or []


def looks_like(state: Mapping) -> str:
    """One sentence: what the file appears to be, and the command for it."""
    found = identify(state)
    if not found:
        keys = list(state)[:3]
        return f"it matches no layout kfundus knows (its first keys: {keys})"
    name, description, kind = found[0]
    fix = f" (convert it with: kfundus convert --from {kind} FILE --out DIR)" if kind else ""
    return f"it looks like {description}{fix}"


@dataclasses.dataclass
class KeyReport:
    """What :func:`check_keys` found in a matching state dict.

    Attributes:
        used: keys the model takes.
        ignored: keys present and dropped on purpose (``ignore`` patterns).
        missing_optional: optional keys the file does not have.
    """

    used: list
    ignored: list
    missing_optional: list


def _first(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def check_keys(
    state: Mapping,
    expected: Mapping[str, tuple],
    *,
    path,
    model: str,
    kind: str,
    ignore: Iterable[str] = (),
    optional: Iterable[str] = (),
    hint: str = "",
) -> KeyReport:
    """Check a state dict against the keys and shapes a model needs.

    Args:
        state: ``{key: array}``.
        expected: ``{key: shape}`` the model needs (a shape entry of None: any size there).
        path: the checkpoint, for messages.
        model: what it was asked to be, e.g. ``"RETFound ViT-L/16"``.
        kind: the ``kfundus convert --from`` kind that was asked for.
        ignore: regular expressions of keys that may be present and are dropped (reported).
        optional: keys of ``expected`` that may be absent (a classifier head).
        hint: one more sentence for the error message (e.g. an option to set).

    Returns:
        A :class:`KeyReport`.

    Raises:
        DataError: keys missing, unexpected keys, or shapes that differ; the message names
            the file, the model, the first keys of each kind and what the file looks like.
    """
    optional = set(optional)
    patterns = [re.compile(p) for p in ignore]
    present = set(state)
    ignored = sorted(k for k in present - set(expected) if any(p.search(k) for p in patterns))
    missing = sorted(set(expected) - present - optional)
    unexpected = sorted(present - set(expected) - set(ignored))
    mismatched = []
    for key in sorted(present & set(expected)):
        want, got = tuple(expected[key]), tuple(np.shape(state[key]))
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
            mismatched.append(f"{key} is {list(got)}, needs {[w if w is not None else '*' for w in want]}")
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched[:SHOWN])}")
        raise DataError(
            f"{path} is not a {model} checkpoint (kfundus convert --from {kind}): {'; '.join(problems)}. "
            f"{looks_like(state)[0].upper()}{looks_like(state)[1:]}." + (f" {hint}" if hint else "")
        )
    return KeyReport(
        used=sorted(present & set(expected)),
        ignored=ignored,
        missing_optional=sorted(optional - present),
    )
