"""RET-CLIP: a retinal image-text model with the tripartite contrastive loss (Du et al.,
MICCAI 2024).

The model::

    left_image  ─ normalise ─ V ─ CLS ─ f_L ─ W_L ─────────────── z_L ─┐
    right_image ─ normalise ─ V ─ CLS ─ f_R ─ W_R ─────────────── z_R ─┤  L2-normalised,
                         [f_L; f_R] ─ W_P ──────────────────────── z_P ─┤  512-d by default
    token_ids ─ T ─ hidden state at the end token ─ t ─ MLP_L ──── t_L ─┤
                                                      ─ MLP_R ──── t_R ─┤
                                                      ─ MLP_P ──── t_P ─┘
    logits_k = min(exp(s_k), 100) * z_k @ t_k^T   for k in (left, right, patient)
    loss = InfoNCE_sym(logits_left) + InfoNCE_sym(logits_right) + InfoNCE_sym(logits_patient)

``V`` is one keras-hub ``CLIPVisionEncoder`` shared by both eyes (its weights from a preset
name, a local preset folder, or random from ``vision_config``: see
``kfundus.systems.clip_lora.encoders.load_encoder``), with CLIP's input normalisation as a layer in
front, so images enter as float32 RGB in [0, 255] like everywhere in kfundus. ``W_*`` are
bias-free ``Dense`` projections (512 -> 512 and 1024 -> 512 at ViT-B sizes). ``T`` is a
keras-hub ``CLIPTextEncoder`` (random from ``text_config``, or the text tower of a CLIP
preset) or any keras-hub text backbone preset (BERT and the like, for other languages) fed
``token_ids`` and ``padding_mask``. The report is encoded once; three MLP heads (hidden
-> hidden, ReLU, -> embed) give the three text embeddings.

Choices where the paper leaves room:
- the text feature is the hidden state at the end token (position ``sum(padding_mask) - 1``;
  the packer in ``kfundus.text`` always keeps that token), which is CLIP's choice and works
  for any tokenizer, unlike CLIP's "largest token id" trick;
- the logit scales start at 1/0.07 (CLIP) and are clamped at 100 in the forward pass;
- the training model outputs the three (batch, batch) logit matrices, named ``left``,
  ``right`` and ``patient``, and the engine trains them with ``SymmetricInfoNCE`` and loss
  weights 1:1:1 (Keras sums them), so no custom train step is needed. Identical reports in a
  batch (common: "normal fundus" in both eyes) count as negatives, as in RET-CLIP.

``embedding_models(model)`` cuts the image and text towers out of a trained model for
zero-shot classification, retrieval and linear probing (``kfundus.workflows.pretrain``).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kfundus.errors import ConfigError
from kfundus.systems.clip_lora.encoders import ENCODER_NAME, input_normalization, load_encoder, token_pooling

BRANCHES = ("left", "right", "patient")
TEXT_ENCODER_NAME = "text_encoder"
TINY_TEXT = {"embedding_dim": 32, "hidden_dim": 32, "num_layers": 2, "num_heads": 2, "intermediate_dim": 64}
CLIP_TEXT_B = {"embedding_dim": 512, "hidden_dim": 512, "num_layers": 12, "num_heads": 8, "intermediate_dim": 2048}


@keras.saving.register_keras_serializable(package="kfundus")
class EndTokenPooling(keras.layers.Layer):
    """``(sequence (B, L, D), padding_mask (B, L))`` -> the vector at each row's last
    non-padding position (the end token)."""

    def call(self, sequence, padding_mask):
        last = ops.maximum(ops.sum(ops.cast(padding_mask, "int32"), axis=1) - 1, 0)
        pick = ops.one_hot(last, ops.shape(sequence)[1], dtype=sequence.dtype)  # (B, L)
        return ops.einsum("bl,bld->bd", pick, sequence)

    def compute_output_shape(self, sequence_shape, padding_mask_shape=None):
        return (sequence_shape[0], sequence_shape[2])


@keras.saving.register_keras_serializable(package="kfundus")
class TripartiteLogits(keras.layers.Layer):
    """Three learnable temperatures; returns ``{branch: scale_k * z_k @ t_k^T}`` with
    ``scale_k = min(exp(s_k), max_scale)`` (CLIP's clamp at 100), computed in float32."""

    def __init__(self, init_scale: float = 1 / 0.07, max_scale: float = 100.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.init_scale = float(init_scale)
        self.max_scale = float(max_scale)

    def build(self, *shapes):
        self.log_scales = self.add_weight(
            shape=(len(BRANCHES),), initializer=keras.initializers.Constant(np.log(self.init_scale)), name="log_scales"
        )

    def scales(self):
        return ops.minimum(ops.exp(self.log_scales), self.max_scale)

    def call(self, z_left, z_right, z_patient, t_left, t_right, t_patient):
        scales = self.scales()
        pairs = ((z_left, t_left), (z_right, t_right), (z_patient, t_patient))
        return {
            branch: scales[i] * ops.matmul(ops.cast(z, "float32"), ops.transpose(ops.cast(t, "float32")))
            for i, (branch, (z, t)) in enumerate(zip(BRANCHES, pairs))
        }

    def get_config(self):
        return {**super().get_config(), "init_scale": self.init_scale, "max_scale": self.max_scale}


def load_text_encoder(weights: str | None, text_config: dict | None, vocabulary_size: int, sequence_length: int):
    """The text tower: a random ``CLIPTextEncoder`` from ``text_config`` (needs the
    tokenizer's ``vocabulary_size``), the text tower of a CLIP preset, or any keras-hub text
    backbone preset / local preset folder."""
    import keras_hub

    if weights is None:
        config = {**CLIP_TEXT_B, **(text_config or {})}
        try:
            return keras_hub.models.CLIPTextEncoder(
                vocabulary_size=int(vocabulary_size), max_sequence_length=int(sequence_length), **config
            )
        except TypeError as exc:
            raise ConfigError(
                f"model.text_config={text_config}: {exc}; CLIPTextEncoder takes embedding_dim, "
                "hidden_dim, num_layers, num_heads, intermediate_dim, intermediate_activation"
            ) from exc
    if text_config:
        raise ConfigError(f"model.text_weights={weights!r} and model.text_config are both set: give one of them")
    try:
        backbone = keras_hub.models.Backbone.from_preset(weights)
    except Exception as exc:  # network, unknown name, missing folder
        raise ConfigError(
            f"could not load the text preset {weights!r} ({exc.__class__.__name__}: {str(exc)[:300]}). Offline, "
            "save it where a network exists (keras_hub.models.Backbone.from_preset(NAME).save_to_preset(FOLDER)) "
            "and set model.text_weights to that folder, or model.text_weights=null for a random text encoder "
            "with a vocabulary built from the reports."
        ) from exc
    return getattr(backbone, "text_encoder", backbone)


def _text_features(encoder, token_ids, padding_mask):
    """Run any keras-hub text encoder on (token_ids, padding_mask); the end-token state."""
    wanted = set(encoder.input) if isinstance(encoder.input, dict) else {"token_ids"}
    feed = {"token_ids": token_ids}
    if "padding_mask" in wanted:
        feed["padding_mask"] = padding_mask
    if "segment_ids" in wanted:
        feed["segment_ids"] = keras.layers.Lambda(lambda t: ops.zeros_like(t), name="segment_ids")(token_ids)
    out = encoder(feed)
    sequence = out["sequence_output"] if isinstance(out, dict) else out
    return EndTokenPooling(name="end_token")(sequence, padding_mask)


def build_retclip(
    *,
    image_size: int = 224,
    vocabulary_size: int,
    sequence_length: int = 77,
    vision_weights: str | None = None,
    vision_config: dict | None = None,
    text_weights: str | None = None,
    text_config: dict | None = None,
    embed_dim: int = 512,
    text_head_dim: int | None = None,
    init_scale: float = 1 / 0.07,
    max_scale: float = 100.0,
) -> keras.Model:
    """The RET-CLIP training model (see the module docstring).

    Args:
        image_size: input side (a multiple of the patch size).
        vocabulary_size: the tokenizer's vocabulary size (random text encoder only).
        sequence_length: token sequence length L.
        vision_weights / vision_config: CLIP vision encoder preset name or folder / random
            sizes (``kfundus.systems.clip_lora.encoders.CLIP_B16`` keys).
        text_weights / text_config: text backbone preset / ``CLIPTextEncoder`` sizes.
        embed_dim: joint embedding size (512 in RET-CLIP).
        text_head_dim: hidden size of the three text MLP heads (default: the text
            encoder's width, 768 -> 768 in RET-CLIP).

    Inputs ``left_image``, ``right_image`` (float32 RGB [0, 255]), ``token_ids`` (int32),
    ``padding_mask`` (bool); outputs ``{"left", "right", "patient"}`` logit matrices.
    """
    vision = load_encoder("clip", vision_weights, image_size, vision_config)
    vision.name = ENCODER_NAME
    text = load_text_encoder(text_weights, text_config, vocabulary_size, sequence_length)
    text.name = TEXT_ENCODER_NAME
    normalise = input_normalization("clip")
    pool = token_pooling("cls", int(vision.output.shape[1]))
    shape = (image_size, image_size, 3)
    left = keras.Input(shape, name="left_image")
    right = keras.Input(shape, name="right_image")
    token_ids = keras.Input((sequence_length,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((sequence_length,), dtype="bool", name="padding_mask")

    f_left, f_right = (pool(vision({"images": normalise(x)})) for x in (left, right))
    unit = {}
    for branch, feature in (
        ("left", f_left),
        ("right", f_right),
        ("patient", keras.layers.Concatenate(name="patient_features")([f_left, f_right])),
    ):
        z = keras.layers.Dense(embed_dim, use_bias=False, name=f"image_projection_{branch}")(feature)
        unit[f"z_{branch}"] = keras.layers.UnitNormalization(name=f"image_embedding_{branch}")(z)
    t = _text_features(text, token_ids, padding_mask)
    hidden = int(text_head_dim or t.shape[-1])
    for branch in BRANCHES:
        h = keras.layers.Dense(hidden, activation="relu", name=f"text_head_{branch}_hidden")(t)
        h = keras.layers.Dense(embed_dim, name=f"text_head_{branch}")(h)
        unit[f"t_{branch}"] = keras.layers.UnitNormalization(name=f"text_embedding_{branch}")(h)
    logits = TripartiteLogits(init_scale, max_scale, name="logit_scales")(
        unit["z_left"], unit["z_right"], unit["z_patient"], unit["t_left"], unit["t_right"], unit["t_patient"]
    )
    outputs = {b: keras.layers.Activation("linear", name=b, dtype="float32")(logits[b]) for b in BRANCHES}
    return keras.Model([left, right, token_ids, padding_mask], outputs, name="retclip")


def embedding_models(model: keras.Model) -> dict:
    """Sub-models of a trained RET-CLIP model sharing its weights:

    - ``"image"``: ``{left_image, right_image}`` -> ``{z_left, z_right, z_patient}``;
    - ``"eye"``: one image ``left_image`` -> ``z_left`` and ``right_image`` -> ``z_right``
      (``"eye_left"``, ``"eye_right"``) for per-eye zero-shot and probing;
    - ``"text"``: ``{token_ids, padding_mask}`` -> ``{t_left, t_right, t_patient}``;
    - ``"features"``: ``left_image`` -> the vision encoder's pooled feature ``f`` (what a
      linear probe reads; the same encoder serves both eyes).
    """
    inputs = {t.name.split(":")[0]: t for t in model.inputs}

    def out(name):
        return model.get_layer(name).output

    image = keras.Model(
        [inputs["left_image"], inputs["right_image"]],
        {f"z_{b}": out(f"image_embedding_{b}") for b in BRANCHES},
        name="retclip_image",
    )
    text = keras.Model(
        [inputs["token_ids"], inputs["padding_mask"]],
        {f"t_{b}": out(f"text_embedding_{b}") for b in BRANCHES},
        name="retclip_text",
    )
    eye_left = keras.Model(inputs["left_image"], out("image_embedding_left"), name="retclip_eye_left")
    eye_right = keras.Model(inputs["right_image"], out("image_embedding_right"), name="retclip_eye_right")
    features = keras.Model(
        inputs["left_image"], model.get_layer("image_projection_left").input, name="retclip_features"
    )
    return {"image": image, "text": text, "eye_left": eye_left, "eye_right": eye_right, "features": features}


def logit_scales(model: keras.Model) -> dict:
    """The current (clamped) temperature of each branch."""
    layer = model.get_layer("logit_scales")
    return dict(zip(BRANCHES, (float(s) for s in ops.convert_to_numpy(layer.scales()))))
