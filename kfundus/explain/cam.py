"""Grad-CAM explanations for kfundus CNN classifiers, measured rather than only drawn.

``gradcam`` / ``GradCAM`` (Selvaraju et al. 2017) explain any single-input Keras CNN, flat
or with its backbone nested as one layer (kfundus EfficientNet-B0: ``efficientnetb0`` /
``top_activation``), mixed-precision models included (maps computed in float32).
``save_overlays`` writes image | heat-map PNGs captioned ``"<label> p=0.93"``;
``kfundus explain`` is its command. How well the maps fall on lesions, and
whether they depend on the trained weights at all, is measured in ``kfundus.explain.saliency``.

Choices where the paper leaves room:

- The gradient is that of the class **logit**, as in the paper: the output of a layer
  named ``logits`` (every kfundus model has one), else the input of a final
  ``Activation`` layer, else the model output. For a sigmoid the probability would give
  the same normalised map (the gradients differ by the factor p(1-p) > 0) except where it
  saturates and its gradient vanishes; for a softmax the two differ.
- Channel weights are the spatial means of the gradients; the map ``ReLU(sum_k w_k A_k)``
  is upsampled bilinearly to the input size and divided by its maximum, so it lies in
  [0, 1]; a map without positive evidence is all zeros. Dropout and BatchNormalization run
  in inference mode.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from kfundus.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


# ---------------------------------------------------------------------------
# Grad-CAM


def _last_4d_layer(model):
    for layer in reversed(model.layers):
        try:  # .output raises for a layer never called, or called more than once
            if not isinstance(layer, keras.layers.InputLayer) and len(layer.output.shape) == 4:
                return layer
        except (AttributeError, ValueError):
            continue
    return None


def find_target_layer(model: keras.Model, layer: str | None = None):
    """``(backbone, layer)``: the layer Grad-CAM reads and the nested model holding it
    (None when the layer is in ``model`` itself).

    ``layer`` is a name searched in the model, then in its nested models
    (``"backbone/layer"`` picks the backbone); a nested model's name means its last 4-D
    layer. None: the model's last layer with a 4-D output, or, when that is a nested
    backbone, the backbone's last one (``top_activation`` for EfficientNet-B0).
    """
    names = [x.name for x in model.layers]
    nested = [x for x in model.layers if isinstance(x, keras.Model)]
    if layer is None or (layer in names and isinstance(model.get_layer(layer), keras.Model)):
        found = _last_4d_layer(model) if layer is None else model.get_layer(layer)
        inner = _last_4d_layer(found) if isinstance(found, keras.Model) else found
        if inner is None:
            raise ConfigError(
                f"model {model.name} has no layer with a 4-D output where Grad-CAM looked "
                f"({(found or model).name}): it needs a CNN, or name its layer"
            )
        return (found if inner is not found else None), inner
    if "/" in layer:
        outer, layer = layer.split("/", 1)
        nested = [m for m in nested if m.name == outer]
    elif layer in names:
        return None, model.get_layer(layer)
    for backbone in nested:
        if layer in [x.name for x in backbone.layers]:
            return backbone, backbone.get_layer(layer)
    raise ConfigError(
        f"layer {layer!r} is not in model {model.name} nor in its nested models "
        f"{[m.name for m in nested]}; the model's layers are {names}"
    )


def _logits_tensor(model: keras.Model):
    """The symbolic class scores the gradient is taken of (see the module docstring)."""
    if len(model.outputs) != 1:
        raise ConfigError(f"model {model.name} has {len(model.outputs)} outputs: Grad-CAM needs one")
    if "logits" in [layer.name for layer in model.layers]:
        return model.get_layer("logits").output
    return model.layers[-1].input if isinstance(model.layers[-1], keras.layers.Activation) else model.outputs[0]


class GradCAM:
    """A reusable Grad-CAM explainer for one model and layer (see ``gradcam``): built and
    traced once, then called on any number of batches.

    >>> maps = GradCAM(model)(images, class_index=1)  # doctest: +SKIP
    """

    def __new__(cls, model: keras.Model = None, layer: str | None = None):
        # A transformer (ViT / CLIP) classifier gets Grad-CAM on its patch-token grid instead.
        if cls is GradCAM and model is not None and _token_encoder(model) is not None:
            cls = TokenGradCAM
        return super().__new__(cls)

    def __init__(self, model: keras.Model, layer: str | None = None):
        if len(model.inputs) != 1:
            raise ConfigError(
                f"model {model.name} has inputs {[t.name for t in model.inputs]}: two-eye "
                "models are not supported by Grad-CAM yet; explain a single-eye model"
            )
        self.model = model
        self.backbone, self.layer = find_target_layer(model, layer)
        logits = _logits_tensor(model)
        self.num_classes = int(logits.shape[-1])
        if self.backbone is None:
            self._forward = keras.Model(model.inputs, [self.layer.output, logits])
        else:
            self._forward = self._nested_forward(model, self.backbone, self.layer, logits)
        self._step = None

    @staticmethod
    def _nested_forward(model, backbone, layer, logits):
        """inputs -> (inner activation, logits) through a backbone nested as one layer."""
        nodes = backbone._inbound_nodes
        if len(nodes) != 1:
            raise ConfigError(
                f"the backbone {backbone.name} is called {len(nodes)} times in {model.name} "
                "(a shared two-eye backbone?): Grad-CAM needs one call"
            )
        (call_input,), (call_output,) = nodes[0].input_tensors, nodes[0].output_tensors
        inner = keras.Model(backbone.inputs[0], [layer.output, backbone.outputs[0]])
        head = keras.Model(call_output, logits)
        pre = None if call_input is model.inputs[0] else keras.Model(model.inputs[0], call_input)

        def forward(x, training=False):
            activation, features = inner(x if pre is None else pre(x, training=training), training=training)
            return activation, head(features, training=training)

        return forward

    def _compute(self, images, classes):
        images = tf.convert_to_tensor(images, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(images)  # records the graph even when every weight is frozen
            activation, logits = self._forward(images, training=False)
            score = tf.gather(tf.cast(logits, tf.float32), classes[:, None], batch_dims=1)
        grads = tape.gradient(score, activation)
        activation, grads = tf.cast(activation, tf.float32), tf.cast(grads, tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2))
        cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", activation, weights))
        cam = tf.image.resize(cam[..., None], tf.shape(images)[1:3], method="bilinear")[..., 0]
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        return tf.clip_by_value(tf.math.divide_no_nan(cam, peak), 0.0, 1.0)

    def _batch(self, images) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        images = images[None] if images.ndim == 3 else images
        expected = tuple(self.model.inputs[0].shape[1:])
        if images.ndim != 4 or any(e is not None and e != g for e, g in zip(expected, images.shape[1:])):
            raise ConfigError(
                f"images of shape {images.shape[1:]} given to model {self.model.name}, "
                f"which takes {expected}: preprocess them to its image size"
            )
        return images

    def __call__(self, images, class_index, *, batch_size: int = 32) -> np.ndarray:
        images = self._batch(images)
        classes = np.broadcast_to(np.asarray(class_index, dtype=np.int32), (len(images),))
        if ((classes < 0) | (classes >= self.num_classes)).any():
            raise ConfigError(
                f"class index out of range in {sorted(set(classes.tolist()))}: model "
                f"{self.model.name} has {self.num_classes} outputs"
            )
        if self._step is None:  # one trace for every batch size and class list
            spec = tf.TensorSpec([None, *self.model.inputs[0].shape[1:]], tf.float32)
            # (a partial, so that TF's retracing detector counts each explainer apart)
            self._step = tf.function(
                functools.partial(GradCAM._compute, self), input_signature=[spec, tf.TensorSpec([None], tf.int32)]
            )
        out = [
            self._step(images[i : i + batch_size], tf.constant(classes[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate([o.numpy() for o in out]) if out else np.zeros((0,) + images.shape[1:3], np.float32)

    def predict(self, images) -> np.ndarray:
        """The model's output (probabilities) for a batch, float32."""
        return np.asarray(self.model(self._batch(images), training=False), dtype=np.float32)


def gradcam(model: keras.Model, images, class_index, *, layer: str | None = None, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM maps of ``model`` for one class per image.

    Args:
        model: a single-input CNN classifier, flat or with a nested backbone, any dtype
            policy (mixed_float16 models are explained in float32).
        images: (N, H, W, 3) or (H, W, 3) model inputs (kfundus: float32 RGB in [0, 255]).
        class_index: the output index explained, one int or one per image.
        layer: the convolutional layer (see ``find_target_layer``); None: the last one.
        batch_size: images per gradient computation.

    Returns:
        float32 (N, H, W) in [0, 1], each map divided by its maximum (all zeros when no
        location has positive evidence).
    """
    return GradCAM(model, layer)(images, class_index, batch_size=batch_size)


# ---------------------------------------------------------------------------
# Grad-CAM for vision transformers (CLIP / ViT encoders): on the patch-token grid


def _token_encoder(model: keras.Model):
    """The nested transformer encoder of ``model`` (a nested model with a
    ``(batch, tokens, dim)`` output and attention layers inside), or None."""
    for layer in model.layers:
        if not isinstance(layer, keras.Model):
            continue
        try:
            rank = len(keras.tree.flatten(layer.output)[0].shape)
        except (AttributeError, ValueError):
            continue
        if rank == 3 and any(isinstance(x, keras.layers.MultiHeadAttention) for x in layer._flatten_layers()):
            return layer
    return None


class TokenGradCAM(GradCAM):
    """Grad-CAM for a ViT / CLIP classifier, on the grid of patch tokens.

    The map is taken on the tokens **entering the first transformer block** (patch +
    position embeddings, after CLIP's pre-layer-norm): ``cam_t = ReLU(sum_d G_td T_td)``
    for each patch token ``T_t`` (class token dropped), ``G`` the gradient of the class
    logit, on the ``(H/p, W/p)`` patch grid; then upsampled bilinearly and divided by its
    maximum, as for CNNs. The weights are per token (gradient x activation, as LayerCAM,
    Jiang et al. 2021, does per location), not Grad-CAM's mean over locations.

    Why there: every attention layer mixes the tokens, so deeper tokens no longer belong
    to their patch. In ``tests/test_clip_lora.py`` (a tiny CLIP encoder that learned to
    detect a bright square, AUROC 1.0) the share of the map on the square's patch was
    1.0 on the first block's input, 0.002 on the last block's input (where ViT Grad-CAM
    is often taken) and 0 on the last block's output (the class token does not read the
    last block's patch tokens at all). ``GradCAM(model)`` returns this explainer for such
    models, so ``save_overlays``, ``kfundus explain`` and the evaluation gallery work
    unchanged.

    >>> maps = TokenGradCAM(model)(images, class_index=0)  # doctest: +SKIP
    """

    def __init__(self, model: keras.Model, layer: str | None = None):
        if len(model.inputs) != 1:
            raise ConfigError(
                f"model {model.name} has inputs {[t.name for t in model.inputs]}: two-eye "
                "models are not supported by Grad-CAM yet; explain a single-eye model"
            )
        encoder = _token_encoder(model)
        if encoder is None:
            raise ConfigError(f"model {model.name} has no nested transformer encoder")
        if layer is not None:
            raise ConfigError(
                "choosing the layer is not supported for transformer encoders (the input of "
                "the last transformer block is used)"
            )
        self.model, self.backbone = model, encoder
        blocks = [
            x
            for x in encoder.layers
            if any(isinstance(s, keras.layers.MultiHeadAttention) for s in x._flatten_layers())
        ]
        self.layer = blocks[0]
        tokens = keras.tree.flatten(self.layer.input)[0]
        names = [x.name for x in model.layers]
        logits = model.get_layer("logits").output if "logits" in names else _logits_tensor(model)
        self.num_classes = int(logits.shape[-1])
        nodes = encoder._inbound_nodes
        if len(nodes) != 1:
            raise ConfigError(
                f"the encoder {encoder.name} is called {len(nodes)} times in {model.name}: "
                "Grad-CAM needs a single-eye model"
            )
        call_input = keras.tree.flatten(nodes[0].input_tensors)[0]
        call_output = keras.tree.flatten(nodes[0].output_tensors)[0]
        inner = keras.Model(encoder.inputs, [tokens, keras.tree.flatten(encoder.outputs)[0]])
        head = keras.Model(call_output, logits)
        pre = keras.Model(model.inputs[0], call_input)
        self.patch_grid = int(round(np.sqrt(int(tokens.shape[1]) - 1)))

        def forward(x, training=False):
            activation, features = inner(pre(x, training=training), training=training)
            return activation, head(features, training=training)

        self._forward = forward
        spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)
        self._step = tf.function(
            functools.partial(TokenGradCAM._compute, self), input_signature=[spec, tf.TensorSpec([None], tf.int32)]
        )

    def _compute(self, images, classes):
        images = tf.convert_to_tensor(images, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(images)
            tokens, logits = self._forward(images, training=False)
            score = tf.gather(tf.cast(logits, tf.float32), classes[:, None], batch_dims=1)
        grads = tape.gradient(score, tokens)
        tokens, grads = tf.cast(tokens[:, 1:], tf.float32), tf.cast(grads[:, 1:], tf.float32)  # drop the class token
        cam = tf.nn.relu(tf.reduce_sum(grads * tokens, axis=-1))  # per-token weights, not a patch mean
        g = self.patch_grid
        cam = tf.reshape(cam, (-1, g, g, 1))
        cam = tf.image.resize(cam, tf.shape(images)[1:3], method="bilinear")[..., 0]
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        return tf.clip_by_value(tf.math.divide_no_nan(cam, peak), 0.0, 1.0)

    def predict(self, images) -> np.ndarray:
        out = self.model(self._batch(images), training=False)
        out = out["probabilities"] if isinstance(out, dict) else out
        return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------
# Overlays


def overlay(image, cam, *, alpha: float = 0.4) -> np.ndarray:
    """``(1 - alpha) * image + alpha * jet(cam)`` as uint8 (H, W, 3).

    ``image``: (H, W, 3) RGB in [0, 255]; ``cam``: in [0, 1], resized bilinearly to the
    image when its size differs.
    """
    from matplotlib import colormaps
    from PIL import Image

    image = np.clip(np.asarray(image, dtype=np.float32), 0, 255)
    cam = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float32)), 0, 1)
    if cam.shape != image.shape[:2]:
        cam = np.asarray(Image.fromarray(cam).resize(image.shape[1::-1], Image.BILINEAR))
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * image + alpha * heat + 0.5, 0, 255).astype(np.uint8)


def _panel(image, cam, caption: str, alpha: float, min_side: int = 256):
    """The preprocessed image and its overlay side by side, the caption underneath."""
    from PIL import Image, ImageDraw, ImageFont

    scale = max(1, -(-min_side // image.shape[0]))  # small inputs are enlarged (nearest)
    left = Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8))
    right = Image.fromarray(overlay(image, cam, alpha=alpha))
    w, h = left.width * scale, left.height * scale
    font = ImageFont.load_default(size=max(12, h // 16))
    canvas = Image.new("RGB", (2 * w + 4, h + max(18, h // 12)), "white")
    canvas.paste(left.resize((w, h), Image.NEAREST), (0, 0))
    canvas.paste(right.resize((w, h), Image.NEAREST), (w + 4, 0))
    ImageDraw.Draw(canvas).text((4, h + 1), caption, fill="black", font=font)
    return canvas


@functools.lru_cache(maxsize=8)
def _compiled_preprocess(config):
    from kfundus.data.pipeline import preprocess_image

    return tf.function(lambda contents: preprocess_image(contents, config))


def load_images(paths, preprocess) -> np.ndarray:
    """Files read through ``preprocess_image``: float32 (N, S, S, 3); an unreadable file is
    a DataError naming it."""
    fn, out = _compiled_preprocess(preprocess), []
    for path in paths:
        try:
            out.append(fn(tf.io.read_file(str(path))).numpy())
        except tf.errors.OpError as exc:
            raise DataError(f"cannot read image {path}: {exc.message.split('[Op:')[0].strip()}") from None
    size = preprocess.image_size
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.float32)


def _class_ids(classes, labels) -> np.ndarray | None:
    """``"predicted"`` -> None; a label, an index or a list of either -> indices."""
    if isinstance(classes, str) and classes == "predicted":
        return None
    items = [classes] if isinstance(classes, (str, int, np.integer)) else list(classes)
    items = [int(c) if isinstance(c, str) and c not in labels and c.isdigit() else c for c in items]
    bad = [c for c in items if c not in labels and not (isinstance(c, (int, np.integer)) and 0 <= c < len(labels))]
    if bad:
        raise ConfigError(f"class {bad[0]!r} is not one of the model's labels {labels} (or 'predicted')")
    return np.asarray([labels.index(c) if c in labels else int(c) for c in items], dtype=int)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text))


def _output_names(paths) -> list[str]:
    """Image stems, prefixed with the parent folder where two files share a stem."""
    stems = [Path(p).stem for p in paths]
    dupes = {s for s in stems if stems.count(s) > 1}
    return [_safe(f"{Path(p).parent.name}_{s}" if s in dupes else s) for p, s in zip(paths, stems)]


def save_overlays(
    model,
    image_paths,
    out_dir,
    *,
    labels,
    preprocess,
    classes="predicted",
    threshold=0.5,
    batch_size: int = 16,
    layer: str | None = None,
    alpha: float = 0.4,
    progress: bool = True,
) -> pd.DataFrame:
    """Write one PNG per (image, class): the preprocessed image next to its Grad-CAM
    overlay, captioned ``"<label> p=0.93"``, named ``<stem>__<label>_<p>.png`` (e.g.
    ``123_left__G_0.93.png``; the parent folder prefixes stems that two images share).

    Args:
        model: a single-input classifier (see ``gradcam``); ``labels``: its output names.
        image_paths: image files, each read through ``preprocess_image``.
        out_dir: the folder to write (created).
        preprocess: the ``Preprocess`` the model was trained with.
        classes: ``"predicted"`` (every class whose probability exceeds ``threshold``),
            a label, an output index, or a list of them (explained for every image).
        threshold: one decision threshold, or one per label (e.g. a run's thresholds).
        batch_size, layer: see ``gradcam``; ``alpha``: see ``overlay``;
        progress: a tqdm progress bar.

    Returns:
        A DataFrame with columns image, label, probability, file (one row per PNG).
    """
    from tqdm.auto import tqdm

    labels = list(labels)
    explainer = GradCAM(model, layer)
    if explainer.num_classes != len(labels):
        raise ConfigError(f"{len(labels)} labels {labels} given for a model with {explainer.num_classes} outputs")
    chosen = _class_ids(classes, labels)
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=float), (len(labels),))
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise DataError("no images to explain: the list of image paths is empty")
    names, out_dir = _output_names(paths), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for start in tqdm(range(0, len(paths), batch_size), desc="Grad-CAM", unit="batch", disable=not progress):
        images = load_images(paths[start : start + batch_size], preprocess)
        probs = explainer.predict(images)
        pairs = [
            (i, int(c))
            for i in range(len(images))
            for c in (chosen if chosen is not None else np.flatnonzero(probs[i] > thresholds))
        ]
        if not pairs:
            continue
        index = np.array([i for i, _ in pairs])
        maps = explainer(images[index], [c for _, c in pairs])
        for (i, c), cam in zip(pairs, maps):
            p = float(probs[i, c])
            file = out_dir / f"{names[start + i]}__{_safe(labels[c])}_{p:.2f}.png"
            _panel(images[i], cam, f"{labels[c]} p={p:.2f}", alpha).save(file)
            rows.append({"image": str(paths[start + i]), "label": labels[c], "probability": p, "file": str(file)})
    return pd.DataFrame(rows, columns=["image", "label", "probability", "file"])


# ---------------------------------------------------------------------------
# Command line: kfundus explain
