"""Grad-CAM explanations for kfundus CNN classifiers, measured rather than only drawn.

``gradcam`` / ``GradCAM`` (Selvaraju et al. 2017) explain any Keras CNN, flat or with its
backbone nested as one layer (kfundus EfficientNet-B0: ``efficientnetb0`` /
``top_activation``), mixed-precision models included (maps computed in float32), and
two-eye models per eye (one map per input, through the shared backbone's call on that
eye). ``save_overlays`` writes image | heat-map PNGs captioned ``"<label> p=0.93"``;
``kfundus explain`` is its command. Images are read as the model sees them everywhere else
(``load_images``: rounded to 8 bits, as the training cache and the serving signature
make them), so a caption's probability is the one ``kfundus evaluate`` and ``kfundus
predict`` report. How well the maps fall on lesions, and whether they depend on the
trained weights at all, is measured in ``kfundus.explain.saliency``.

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
    if "logits" in [layer.name for layer in model.layers]:
        return model.get_layer("logits").output
    if len(model.outputs) != 1:
        raise ConfigError(f"model {model.name} has {len(model.outputs)} outputs: Grad-CAM needs one")
    return model.layers[-1].input if isinstance(model.layers[-1], keras.layers.Activation) else model.outputs[0]


def _probability_output(model: keras.Model):
    """The label-probability output of a model (``probabilities`` of a multi-output one)."""
    if len(model.outputs) == 1:
        return model.outputs[0]
    if isinstance(model.output, dict) and "probabilities" in model.output:
        return model.output["probabilities"]
    raise ConfigError(
        f"model {model.name} has outputs {list(model.output) if isinstance(model.output, dict) else len(model.outputs)}"
        ": explain one head of it (kfundus.systems.dual_stream.objective.primary_model)"
    )


def _shared_nested(model: keras.Model):
    """The nested model (backbone or encoder) that a multi-input model calls once per input."""
    n = len(model.inputs)
    found = [x for x in model.layers if isinstance(x, keras.Model) and len(x._inbound_nodes) == n]
    return found[-1] if found else None


def _input_of_call(model: keras.Model, call_input):
    """``(index of the model input one call of a nested model reads, the model from that
    input to the call's input, or None when the call reads the input itself)``."""
    for j, x in enumerate(model.inputs):
        if call_input is x:
            return j, None
    for j, x in enumerate(model.inputs):
        try:
            return j, keras.Model(x, call_input)
        except ValueError:  # the call does not depend on this input alone
            continue
    raise ConfigError(f"model {model.name}: cannot tell which input feeds its shared backbone")


def _per_call_forward(model: keras.Model, nested: keras.Model, tapped, logits):
    """``forward([x per input]) -> ([tapped activation per input], logits)`` for a model whose
    nested backbone / encoder is called once per input (one call for a single-eye model,
    one per eye for a two-eye model): each call is re-run from its own input, so the
    gradient of the logit reaches each eye's activation separately."""
    nodes = nested._inbound_nodes
    n = len(model.inputs)
    if len(nodes) != n:
        raise ConfigError(
            f"the backbone {nested.name} is called {len(nodes)} times in {model.name}, which has {n} input(s): "
            "Grad-CAM needs one call per input"
        )
    inner = keras.Model(nested.inputs, [tapped, keras.tree.flatten(nested.outputs)[0]])
    calls = {}
    for node in nodes:
        call_input = keras.tree.flatten(node.input_tensors)[0]
        call_output = keras.tree.flatten(node.output_tensors)[0]
        j, pre = _input_of_call(model, call_input)
        calls[j] = (pre, call_output)
    if sorted(calls) != list(range(n)):
        raise ConfigError(f"model {model.name}: its inputs do not each go through {nested.name} once")
    head = keras.Model([calls[j][1] for j in range(n)] if n > 1 else calls[0][1], logits)

    def forward(xs, training=False):
        activations, features = [], []
        for j, x in enumerate(xs):
            pre = calls[j][0]
            a, f = inner(x if pre is None else pre(x, training=training), training=training)
            activations.append(a)
            features.append(f)
        return activations, head(features if n > 1 else features[0], training=training)

    return forward


class GradCAM:
    """A reusable Grad-CAM explainer for one model and layer (see ``gradcam``): built and
    traced once, then called on any number of batches.

    A **two-eye model** (inputs ``left_image`` and ``right_image`` through one shared
    backbone or encoder, as kfundus' patient-level models are) is explained **per eye**:
    the gradient of the patient's class logit is taken at each eye's own activation (the
    shared backbone's call on that eye), giving one map per input. Both maps of a patient
    are divided by their common maximum, so an eye with little evidence stays dim. Call it
    with ``{input name: images}``; it returns ``{input name: maps}``.

    >>> maps = GradCAM(model)(images, class_index=1)  # doctest: +SKIP
    >>> maps = GradCAM(two_eye)({"left_image": left, "right_image": right}, 1)  # doctest: +SKIP
    """

    def __new__(cls, model: keras.Model = None, layer: str | None = None):
        # A transformer (ViT / CLIP) classifier gets Grad-CAM on its patch-token grid instead.
        if cls is GradCAM and model is not None and _token_encoder(model) is not None:
            cls = TokenGradCAM
        return super().__new__(cls)

    def __init__(self, model: keras.Model, layer: str | None = None):
        self.model = model
        self.input_names = [t.name for t in model.inputs]
        logits = _logits_tensor(model)
        self.num_classes = int(logits.shape[-1])
        self._probabilities = keras.Model(model.inputs, _probability_output(model))
        if len(model.inputs) == 1:
            self.backbone, self.layer = find_target_layer(model, layer)
            if self.backbone is None:
                both = keras.Model(model.inputs, [self.layer.output, logits])

                def forward(xs, training=False):
                    activation, scores = both(list(xs), training=training)
                    return [activation], scores

                self._forward = forward
            else:
                self._forward = _per_call_forward(model, self.backbone, self.layer.output, logits)
        else:
            self.backbone = _shared_nested(model)
            if self.backbone is None:
                raise ConfigError(
                    f"model {model.name} has inputs {self.input_names}: a two-eye model is explained per eye "
                    "when its eyes go through one shared nested backbone or encoder (as kfundus' models do); "
                    "this one has none. Explain a single-eye model"
                )
            name = layer.split("/", 1)[-1] if layer else None
            if name is not None and name not in [x.name for x in self.backbone.layers]:
                raise ConfigError(f"layer {layer!r} is not in the shared backbone {self.backbone.name}")
            self.layer = self.backbone.get_layer(name) if name else _last_4d_layer(self.backbone)
            if self.layer is None:
                raise ConfigError(f"the shared backbone {self.backbone.name} has no layer with a 4-D output")
            self._forward = _per_call_forward(model, self.backbone, self.layer.output, logits)
        self._step = None

    def _map(self, activation, grads, size):
        """Grad-CAM: channel weights = spatial means of the gradients, ReLU of the weighted sum."""
        weights = tf.reduce_mean(grads, axis=(1, 2))
        cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", activation, weights))
        return tf.image.resize(cam[..., None], size, method="bilinear")[..., 0]

    def _compute(self, images, classes):
        images = [tf.convert_to_tensor(x, tf.float32) for x in images]
        with tf.GradientTape() as tape:
            for x in images:
                tape.watch(x)  # records the graph even when every weight is frozen
            activations, logits = self._forward(images, training=False)
            score = tf.gather(tf.cast(logits, tf.float32), classes[:, None], batch_dims=1)
        grads = tape.gradient(score, activations)
        cams = [
            self._map(tf.cast(a, tf.float32), tf.cast(g, tf.float32), tf.shape(x)[1:3])
            for a, g, x in zip(activations, grads, images)
        ]
        peak = tf.reduce_max(tf.stack([tf.reduce_max(c, axis=(1, 2)) for c in cams]), axis=0)[:, None, None]
        return [tf.clip_by_value(tf.math.divide_no_nan(c, peak), 0.0, 1.0) for c in cams]

    def _inputs(self, images) -> list[np.ndarray]:
        """Images as one float32 array per model input, shapes checked."""
        if len(self.input_names) > 1:
            if isinstance(images, dict):
                missing = [n for n in self.input_names if n not in images]
                if missing:
                    raise ConfigError(
                        f"model {self.model.name} needs images for {self.input_names}; got {list(images)}"
                    )
                images = [images[n] for n in self.input_names]
            elif not isinstance(images, (list, tuple)) or len(images) != len(self.input_names):
                raise ConfigError(
                    f"model {self.model.name} has inputs {self.input_names}: pass {{name: images}} for each"
                )
        else:
            images = [images[self.input_names[0]] if isinstance(images, dict) else images]
        out = []
        for tensor, x in zip(self.model.inputs, images):
            x = np.asarray(x, dtype=np.float32)
            x = x[None] if x.ndim == 3 else x
            expected = tuple(tensor.shape[1:])
            if x.ndim != 4 or any(e is not None and e != g for e, g in zip(expected, x.shape[1:])):
                raise ConfigError(
                    f"images of shape {x.shape[1:]} given to model {self.model.name}, "
                    f"which takes {expected}: preprocess them to its image size"
                )
            out.append(x)
        if len({len(x) for x in out}) > 1:
            raise ConfigError(f"model {self.model.name}: give the same number of images for each of {self.input_names}")
        return out

    def _batch(self, images) -> np.ndarray:
        return self._inputs(images)[0]

    def __call__(self, images, class_index, *, batch_size: int = 32):
        xs = self._inputs(images)
        n = len(xs[0])
        classes = np.broadcast_to(np.asarray(class_index, dtype=np.int32), (n,))
        if ((classes < 0) | (classes >= self.num_classes)).any():
            raise ConfigError(
                f"class index out of range in {sorted(set(classes.tolist()))}: model "
                f"{self.model.name} has {self.num_classes} outputs"
            )
        if self._step is None:  # one trace for every batch size and class list
            specs = [tf.TensorSpec([None, *t.shape[1:]], tf.float32) for t in self.model.inputs]
            # (a partial, so that TF's retracing detector counts each explainer apart)
            self._step = tf.function(
                functools.partial(type(self)._compute, self), input_signature=[specs, tf.TensorSpec([None], tf.int32)]
            )
        parts = [
            self._step([x[i : i + batch_size] for x in xs], tf.constant(classes[i : i + batch_size]))
            for i in range(0, n, batch_size)
        ]
        maps = [
            np.concatenate([p[j].numpy() for p in parts]) if parts else np.zeros((0,) + x.shape[1:3], np.float32)
            for j, x in enumerate(xs)
        ]
        return maps[0] if len(maps) == 1 else dict(zip(self.input_names, maps))

    def predict(self, images) -> np.ndarray:
        """The model's label probabilities for a batch, float32 (``{input: images}`` for a
        two-eye model)."""
        xs = self._inputs(images)
        return np.asarray(self._probabilities(xs, training=False), dtype=np.float32)


def gradcam(model: keras.Model, images, class_index, *, layer: str | None = None, batch_size: int = 32):
    """Grad-CAM maps of ``model`` for one class per image.

    Args:
        model: a CNN classifier, flat or with a nested backbone, any dtype policy
            (mixed_float16 models are explained in float32); a two-eye model with a shared
            backbone is explained per eye.
        images: (N, H, W, 3) or (H, W, 3) model inputs (kfundus: float32 RGB in [0, 255]);
            ``{input name: images}`` for a two-eye model.
        class_index: the output index explained, one int or one per image.
        layer: the convolutional layer (see ``find_target_layer``); None: the last one.
        batch_size: images per gradient computation.

    Returns:
        float32 (N, H, W) in [0, 1], each map divided by its maximum (all zeros when no
        location has positive evidence); ``{input name: maps}`` for a two-eye model (a
        patient's two maps divided by their common maximum).
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
        try:  # the encoder's own output: defined however often the model calls it (two eyes)
            rank = len(keras.tree.flatten(layer.outputs)[0].shape)
        except (AttributeError, ValueError, IndexError, TypeError):
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
    detect a bright square, AUROC 1.0) the share of the map on the square was about 0.6
    on the first block's input, 0.002 on the last block's input (where ViT Grad-CAM is
    often taken) and 0 on the last block's output (the class token does not read the last
    block's patch tokens at all). That was for 3 of 6 initial seeds; on the others the
    model's evidence for the square had a negative gradient x activation, which the ReLU
    drops, and the map pointed elsewhere. ``GradCAM(model)`` returns this explainer for such
    models, so ``save_overlays``, ``kfundus explain`` and the evaluation gallery work
    unchanged.

    A two-eye model (one shared encoder over ``left_image`` and ``right_image``, the
    patient-level CLIP / ViT systems) is explained per eye, as ``GradCAM`` explains
    two-eye CNNs: the tokens of each eye's encoder call, one map per eye.

    >>> maps = TokenGradCAM(model)(images, class_index=0)  # doctest: +SKIP
    """

    def __init__(self, model: keras.Model, layer: str | None = None):
        encoder = _token_encoder(model)
        if encoder is None:
            raise ConfigError(f"model {model.name} has no nested transformer encoder")
        if layer is not None:
            raise ConfigError(
                "choosing the layer is not supported for transformer encoders (the input of "
                "the first transformer block is used)"
            )
        self.model, self.backbone = model, encoder
        self.input_names = [t.name for t in model.inputs]
        blocks = [
            x
            for x in encoder.layers
            if any(isinstance(s, keras.layers.MultiHeadAttention) for s in x._flatten_layers())
        ]
        self.layer = blocks[0]
        tokens = keras.tree.flatten(self.layer.input)[0]
        logits = _logits_tensor(model)
        self.num_classes = int(logits.shape[-1])
        self._probabilities = keras.Model(model.inputs, _probability_output(model))
        self.patch_grid = int(round(np.sqrt(int(tokens.shape[1]) - 1)))
        self._forward = _per_call_forward(model, encoder, tokens, logits)
        self._step = None

    def _map(self, tokens, grads, size):
        tokens, grads = tokens[:, 1:], grads[:, 1:]  # drop the class token
        cam = tf.nn.relu(tf.reduce_sum(grads * tokens, axis=-1))  # per-token weights, not a patch mean
        g = self.patch_grid
        cam = tf.reshape(cam, (-1, g, g, 1))
        return tf.image.resize(cam, size, method="bilinear")[..., 0]


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
    from kfundus.data.images import preprocess_image

    # rounded to 8 bits: the training cache stores uint8 and serving rounds the same way
    return tf.function(lambda contents: tf.round(preprocess_image(contents, config)))


def load_images(paths, preprocess) -> np.ndarray:
    """Files read as the model sees them in training, evaluation and serving:
    ``preprocess_image`` rounded to 8 bits (the training cache stores uint8), as float32
    (N, S, S, 3). An unreadable file is a DataError naming it."""
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


def _eye(input_name: str) -> str:
    return input_name.removesuffix("_image")


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
    """Write one PNG per (image, class): the image as the model sees it next to its
    Grad-CAM overlay, captioned ``"<label> p=0.93"``, named ``<stem>__<label>_<p>.png``
    (e.g. ``123_left__G_0.93.png``; the parent folder prefixes stems that two images share).
    The probability is the model's on exactly that input (8-bit, as in training and
    serving), so it equals the one ``kfundus evaluate`` and ``kfundus predict`` report.

    A two-eye model is explained per eye: ``image_paths`` is then a table with one column
    per model input (``left_image``, ``right_image``) and optionally ``id``; each patient
    and class gives one PNG per eye, ``<id>_<eye>__<label>_<p>.png``, captioned with the
    patient's probability and the eye (see ``GradCAM``).

    Args:
        model: a classifier (see ``gradcam``); ``labels``: its output names.
        image_paths: image files (single-input model), or a DataFrame of paths by input name.
        out_dir: the folder to write (created).
        preprocess: the ``Preprocess`` the model was trained with.
        classes: ``"predicted"`` (every class whose probability exceeds ``threshold``),
            a label, an output index, or a list of them (explained for every image).
        threshold: one decision threshold, or one per label (e.g. a run's thresholds).
        batch_size, layer: see ``gradcam``; ``alpha``: see ``overlay``;
        progress: a tqdm progress bar.

    Returns:
        A DataFrame with columns image, input (the model input: ``image``, ``left_image``,
        ...), label, probability, file (one row per PNG).
    """
    from tqdm.auto import tqdm

    labels = list(labels)
    explainer = GradCAM(model, layer)
    if explainer.num_classes != len(labels):
        raise ConfigError(f"{len(labels)} labels {labels} given for a model with {explainer.num_classes} outputs")
    chosen = _class_ids(classes, labels)
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=float), (len(labels),))
    inputs = explainer.input_names
    if isinstance(image_paths, pd.DataFrame):
        missing = [n for n in inputs if n not in image_paths]
        if missing:
            raise ConfigError(f"model {model.name} reads {inputs}; the image table has {list(image_paths.columns)}")
        table = image_paths.reset_index(drop=True)
    elif len(inputs) > 1:
        raise ConfigError(f"model {model.name} reads {inputs}: give a table of paths with those columns")
    else:
        table = pd.DataFrame({inputs[0]: [str(p) for p in image_paths]})
    if table.empty:
        raise DataError("no images to explain: the list of image paths is empty")
    paths = {n: [Path(p) for p in table[n]] for n in inputs}
    if len(inputs) == 1:
        names = {inputs[0]: _output_names(paths[inputs[0]])}
    else:
        ids = table["id"].astype(str) if "id" in table else pd.Series([Path(p).stem for p in table[inputs[0]]])
        names = {n: [_safe(f"{i}_{_eye(n)}") for i in ids] for n in inputs}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for start in tqdm(range(0, len(table), batch_size), desc="Grad-CAM", unit="batch", disable=not progress):
        images = {n: load_images(paths[n][start : start + batch_size], preprocess) for n in inputs}
        probs = explainer.predict(images)
        pairs = [
            (i, int(c))
            for i in range(len(probs))
            for c in (chosen if chosen is not None else np.flatnonzero(probs[i] > thresholds))
        ]
        if not pairs:
            continue
        index = np.array([i for i, _ in pairs])
        maps = explainer({n: images[n][index] for n in inputs}, [c for _, c in pairs])
        maps = maps if isinstance(maps, dict) else {inputs[0]: maps}
        for k, (i, c) in enumerate(pairs):
            p = float(probs[i, c])
            for n in inputs:
                file = out_dir / f"{names[n][start + i]}__{_safe(labels[c])}_{p:.2f}.png"
                caption = f"{labels[c]} p={p:.2f}" + (f" ({_eye(n)} eye)" if len(inputs) > 1 else "")
                _panel(images[n][i], maps[n][k], caption, alpha).save(file)
                rows.append(
                    {
                        "image": str(paths[n][start + i]),
                        "input": n,
                        "label": labels[c],
                        "probability": p,
                        "file": str(file),
                    }
                )
    return pd.DataFrame(rows, columns=["image", "input", "label", "probability", "file"])


# ---------------------------------------------------------------------------
# Command line: kfundus explain
