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

The released RET-CLIP checkpoint (``kfundus convert --from retclip``,
:mod:`kfundus.systems.retclip.convert`) differs from kfundus' own pre-training in two places,
each an option of :func:`build_retclip` whose default keeps kfundus' model:

- ``vision_projection``: RET-CLIP's visual tower ends in OpenAI-CLIP's ``proj`` (768 -> 512, no
  bias) after the final layer norm of the class token, so ``f`` is 512-d and ``W_L``, ``W_R``
  are 512 -> 512, ``W_P`` 1024 -> 512 (default None: no projection, ``f`` is the class token);
- ``text_pooling: cls``: the text feature is BERT's last hidden state at ``[CLS]`` (position 0),
  as Chinese-CLIP's ``encode_text`` takes it (default ``end``: the end token).

:func:`build_retclip_classifier` (``model.name: retclip_classifier``) is RET-CLIP's downstream
classifier: the vision tower of a converted (or kfundus-pretrained) RET-CLIP model up to ``f``,
both eyes through it, ``concat(f_L, f_R)`` and a dense head, as RET-CLIP's ODIR evaluation.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kfundus.convert.bert import ZeroSegments
from kfundus.errors import ConfigError
from kfundus.systems.base import eye_inputs, head_logits, probability_output
from kfundus.systems.clip_lora.encoders import (
    ENCODER_NAME,
    input_normalization,
    load_encoder,
    resize_encoder,
    token_pooling,
)

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
class FirstTokenPooling(keras.layers.Layer):
    """``sequence (B, L, D)`` -> the vector at position 0 (BERT's ``[CLS]``)."""

    def call(self, sequence):
        return sequence[:, 0, :]

    def compute_output_shape(self, sequence_shape):
        return (sequence_shape[0], sequence_shape[2])


TEXT_POOLING = ("end", "cls")


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


def _text_features(encoder, token_ids, padding_mask, pooling: str = "end"):
    """Run any keras-hub text encoder on (token_ids, padding_mask); the end-token state
    (``pooling="end"``) or the first token's (``"cls"``)."""
    wanted = set(encoder.input) if isinstance(encoder.input, dict) else {"token_ids"}
    feed = {"token_ids": token_ids}
    if "padding_mask" in wanted:
        feed["padding_mask"] = padding_mask
    if "segment_ids" in wanted:
        feed["segment_ids"] = ZeroSegments(name="segment_ids")(token_ids)
    out = encoder(feed)
    sequence = out["sequence_output"] if isinstance(out, dict) else out
    if pooling == "cls":
        return FirstTokenPooling(name="cls_token_text")(sequence)
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
    vision_projection: int | None = None,
    text_pooling: str = "end",
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
        init_scale: initial temperature of each branch (CLIP's 1/0.07).
        max_scale: the clamp of the temperatures (CLIP's 100).
        vision_projection: size of a bias-free projection of the class token before the
            image heads (the released RET-CLIP: 512, OpenAI-CLIP's ``proj``); None: none.
        text_pooling: ``end`` (the end-token state, kfundus' pre-training) or ``cls`` (the
            ``[CLS]`` state, the released RET-CLIP).

    Inputs ``left_image``, ``right_image`` (float32 RGB [0, 255]), ``token_ids`` (int32),
    ``padding_mask`` (bool); outputs ``{"left", "right", "patient"}`` logit matrices.
    """
    if text_pooling not in TEXT_POOLING:
        raise ConfigError(f"model.options.text_pooling={text_pooling!r}: use one of {list(TEXT_POOLING)}")
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
    if vision_projection:
        project = keras.layers.Dense(int(vision_projection), use_bias=False, name="vision_projection")
        f_left, f_right = project(f_left), project(f_right)
    unit = {}
    for branch, feature in (
        ("left", f_left),
        ("right", f_right),
        ("patient", keras.layers.Concatenate(name="patient_features")([f_left, f_right])),
    ):
        z = keras.layers.Dense(embed_dim, use_bias=False, name=f"image_projection_{branch}")(feature)
        unit[f"z_{branch}"] = keras.layers.UnitNormalization(name=f"image_embedding_{branch}")(z)
    t = _text_features(text, token_ids, padding_mask, text_pooling)
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


# ---------------------------------------------------------------------------
# the downstream classifier


RETCLIP_FILE = "retclip.keras"  # the whole model in a converted folder (kfundus convert --from retclip)


def load_retclip_model(weights) -> keras.Model:
    """The whole RET-CLIP model of a converted folder (``retclip.keras``; or ``retclip:/path/file.pt``,
    converted on first use) or of a finished ``kfundus pretrain`` run (``model.keras``).

    Raises:
        ConfigError: neither file is there, with the commands that make one.
    """
    from pathlib import Path

    from kfundus.convert import resolve_converted

    folder = Path(str(weights)).expanduser()
    if not (folder / "model.keras").is_file():  # not a pre-training run: a converted folder or retclip:PATH
        folder = resolve_converted(weights, "retclip")
    for name in (RETCLIP_FILE, "model.keras"):
        if (folder / name).is_file():
            return keras.saving.load_model(folder / name)
    raise ConfigError(
        f"model.weights={weights!r}: no RET-CLIP model there ({RETCLIP_FILE} or model.keras); convert the released "
        "checkpoint (kfundus convert --from retclip CHECKPOINT --out DIR) or pre-train one (kfundus pretrain), "
        "and set model.weights to that folder"
    )


def _freeze_encoder(encoder, trainable_blocks: int) -> None:
    """-1: train the whole encoder; 0: freeze it; N: its last N blocks and the final layer norm."""
    encoder.trainable = trainable_blocks != 0
    if trainable_blocks <= 0:
        return
    for layer in encoder.layers:
        layer.trainable = False
    blocks = list(encoder.encoder_layers)
    for layer in blocks[max(0, len(blocks) - trainable_blocks) :] + [encoder.layer_norm]:
        layer.trainable = True


def build_retclip_classifier(
    num_outputs: int,
    *,
    image_size: int = 224,
    weights: str | None = None,
    trainable_blocks: int = -1,
    dropout: float = 0.0,
    activation: str = "sigmoid",
    two_eye: bool = True,
    bn_momentum: float | None = None,
    vision_config: dict | None = None,
    vision_projection: int | None = None,
) -> keras.Model:
    """RET-CLIP's downstream classifier (``model.name: retclip_classifier``): the image tower of
    a RET-CLIP model up to the feature ``f`` (class token after the final layer norm, then the
    released model's ``proj``), both eyes through the one tower, ``concat(f_L, f_R)``, dropout
    and a dense head (RET-CLIP's ODIR evaluation: ``Linear(1024, 8)`` and a sigmoid).

    Args:
        num_outputs: number of labels.
        image_size: input side (224 in RET-CLIP); another size resizes the position embeddings.
        weights: a folder ``kfundus convert --from retclip`` wrote, or a ``kfundus pretrain``
            run folder; None: a random encoder (``vision_config``; tests).
        trainable_blocks: -1 fine-tunes everything (RET-CLIP), 0 freezes the encoder (a linear
            probe), N the last N transformer blocks.
        dropout: dropout before the head (RET-CLIP: none).
        activation: ``sigmoid`` (multi-label) or ``softmax``.
        two_eye: inputs ``left_image`` and ``right_image`` (patient level, RET-CLIP's use);
            False: one input ``image``.
        bn_momentum: unused (no BatchNorm); must stay None.
        vision_config: random-encoder sizes (``weights`` None only).
        vision_projection: a random ``proj`` of this size (``weights`` None only).

    Returns:
        A Keras model with one float32 output, ``probabilities``.
    """
    if bn_momentum is not None:
        raise ConfigError("model.bn_momentum is for BatchNorm networks; RET-CLIP's ViT has none: leave it null")
    if weights is None:
        encoder = load_encoder("clip", None, image_size, vision_config)
        normalise = input_normalization("clip")
        project = (
            keras.layers.Dense(int(vision_projection), use_bias=False, name="vision_projection")
            if vision_projection
            else None
        )
    else:
        if vision_config or vision_projection:
            raise ConfigError(
                "model.weights names a RET-CLIP model: leave model.options vision_config/vision_projection unset"
            )
        source = load_retclip_model(weights)
        encoder = source.get_layer(ENCODER_NAME)
        normalise = source.get_layer("clip_normalization")
        names = {layer.name for layer in source.layers}
        project = source.get_layer("vision_projection") if "vision_projection" in names else None
        if int(encoder.image_shape[0]) != int(image_size):
            encoder = resize_encoder(encoder, "clip", int(image_size))
    encoder.name = ENCODER_NAME
    _freeze_encoder(encoder, int(trainable_blocks))
    pool = token_pooling("cls", int(encoder.output.shape[1]))

    def feature(x):
        f = pool(encoder({"images": normalise(x)}))
        return project(f) if project is not None else f

    inputs, x = eye_inputs(image_size, two_eye, feature)
    outputs = probability_output(head_logits(x, num_outputs, dropout), activation)
    return keras.Model(inputs, outputs, name="retclip_classifier")
