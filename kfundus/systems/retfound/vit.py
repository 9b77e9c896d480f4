"""RETFound's encoder in Keras: the Vision Transformer as timm builds it (RETFound's
``models_vit.VisionTransformer`` subclasses timm's), written with Keras layers so that a
converted checkpoint computes the same function.

Why not keras-hub's ``ViTBackbone``: it always applies a final LayerNorm to every token,
while RETFound fine-tunes with global average pooling of the patch tokens followed by a
*separate* LayerNorm (``fc_norm``), the encoder's ``norm`` removed. So the encoder here
(:class:`RETFoundBackbone`) stops after the last block and returns all tokens, and the
pooling (:class:`ViTPooling`) holds the norm:

- ``avg`` (RETFound's fine-tuning, ``global_pool=True`` in its code, timm's
  ``global_pool="avg"``): mean of the patch tokens (class token excluded), then ``fc_norm``;
- ``token`` (MAE/timm default, ``--cls_token`` in RETFound): ``norm`` over the tokens, then
  the class token.

The layers, in timm's order and with its constants:

- ``patch_embed``: a ``p x p`` convolution with stride ``p`` (timm's ``patch_embed.proj``),
  patches flattened row by row;
- ``embeddings`` (:class:`ClassTokenPosition`): the class token prepended and the learned
  position table added (``cls_token``, ``pos_embed``; no dropout at inference);
- ``blocks_<i>`` (:class:`ViTBlock`): pre-norm blocks, ``x + attn(norm1(x))`` then
  ``x + mlp(norm2(x))``; LayerNorm epsilon 1e-6; attention is Keras' ``MultiHeadAttention``
  (timm's fused ``qkv`` split into query/key/value on conversion, scale ``head_dim**-0.5``);
  the MLP is Dense -> exact (erf) GELU -> Dense; **drop path** (stochastic depth,
  :class:`DropPath`) on both residual branches, its rate rising linearly from 0 at the first
  block to ``drop_path`` at the last, as timm's ``torch.linspace(0, drop_path_rate, depth)``.

Inputs are images already normalised (RETFound: ImageNet mean and standard deviation on
pixels scaled to [0, 1]); the classifier (``kfundus.systems.retfound.model``) puts that
normalisation in front, so exported models take plain [0, 255] pixels. The position table
of a checkpoint trained at one size is resized to another by :func:`resize_positions`,
bicubically as RETFound's ``util/pos_embed.interpolate_pos_embed`` does (PyTorch's
``interpolate(mode="bicubic", align_corners=False)``, reproduced in NumPy).
"""

from __future__ import annotations

import keras
import keras_hub
import numpy as np
from keras import ops

# ViT-L/16, RETFound's encoder (models_vit.RETFound_mae / vit_large_patch16).
VIT_L16 = {"patch_size": 16, "hidden_dim": 1024, "num_layers": 24, "num_heads": 16, "mlp_dim": 4096}
LAYER_NORM_EPSILON = 1e-6
POOLINGS = ("avg", "token")
BACKBONE_NAME = "retfound_backbone"


@keras.saving.register_keras_serializable(package="kfundus")
class DropPath(keras.layers.Layer):
    """Stochastic depth (Huang et al. 2016), per sample, as timm's ``DropPath``: while
    training, each sample's branch is zeroed with probability ``rate`` and the survivors
    scaled by ``1 / (1 - rate)``; identity at inference.

    Args:
        rate: probability of dropping a sample's branch.
        seed: seed of the layer's random stream.
    """

    def __init__(self, rate: float = 0.0, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)  # always: the same weights at every rate

    def call(self, x, training=None):
        if not training or self.rate <= 0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        mask = ops.floor(keep + keras.random.uniform(shape, dtype=x.dtype, seed=self.seed_generator))
        return x / keep * mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package="kfundus")
class ClassTokenPosition(keras.layers.Layer):
    """Prepend the class token and add the learned position embeddings (timm's
    ``cls_token`` and ``pos_embed``): ``(batch, patches, dim) -> (batch, 1 + patches, dim)``."""

    def build(self, input_shape):
        patches, dim = int(input_shape[1]), int(input_shape[2])
        init = keras.initializers.TruncatedNormal(stddev=0.02)
        self.cls_token = self.add_weight(shape=(1, 1, dim), initializer=init, name="cls_token")
        self.pos_embed = self.add_weight(shape=(1, patches + 1, dim), initializer=init, name="pos_embed")

    def call(self, x):
        cls = ops.broadcast_to(ops.cast(self.cls_token, x.dtype), (ops.shape(x)[0], 1, ops.shape(x)[2]))
        return ops.concatenate([cls, x], axis=1) + ops.cast(self.pos_embed, x.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], None if input_shape[1] is None else input_shape[1] + 1, input_shape[2])


@keras.saving.register_keras_serializable(package="kfundus")
class ViTBlock(keras.layers.Layer):
    """One pre-norm transformer block of timm's VisionTransformer.

    Args:
        hidden_dim: token width.
        num_heads: attention heads.
        mlp_dim: hidden width of the MLP.
        drop_path: stochastic-depth rate of this block.
        layer_norm_epsilon: LayerNorm epsilon (1e-6 in RETFound).
    """

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        mlp_dim: int,
        drop_path: float = 0.0,
        layer_norm_epsilon: float = LAYER_NORM_EPSILON,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim, self.num_heads, self.mlp_dim = int(hidden_dim), int(num_heads), int(mlp_dim)
        self.drop_path, self.layer_norm_epsilon = float(drop_path), float(layer_norm_epsilon)
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not a multiple of num_heads {num_heads}")
        policy = self.dtype_policy
        self.norm1 = keras.layers.LayerNormalization(epsilon=self.layer_norm_epsilon, name="norm1", dtype=policy)
        self.attn = keras.layers.MultiHeadAttention(
            self.num_heads, self.hidden_dim // self.num_heads, name="attn", dtype=policy
        )
        self.norm2 = keras.layers.LayerNormalization(epsilon=self.layer_norm_epsilon, name="norm2", dtype=policy)
        self.fc1 = keras.layers.Dense(self.mlp_dim, name="fc1", dtype=policy)
        self.fc2 = keras.layers.Dense(self.hidden_dim, name="fc2", dtype=policy)
        self.drop_path1 = DropPath(self.drop_path, name="drop_path1", dtype=policy)
        self.drop_path2 = DropPath(self.drop_path, name="drop_path2", dtype=policy)

    def build(self, input_shape):
        self.norm1.build(input_shape)
        self.attn.build(input_shape, input_shape)
        self.norm2.build(input_shape)
        self.fc1.build(input_shape)
        self.fc2.build((*input_shape[:-1], self.mlp_dim))

    def call(self, x, training=None):
        y = self.norm1(x)
        x = x + self.drop_path1(self.attn(y, y, training=training), training=training)
        y = self.fc2(keras.activations.gelu(self.fc1(self.norm2(x)), approximate=False))
        return x + self.drop_path2(y, training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "drop_path": self.drop_path,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }


@keras.saving.register_keras_serializable(package="kfundus")
class ViTPooling(keras.layers.Layer):
    """Tokens -> one feature vector, as RETFound does it.

    Args:
        pooling: ``"avg"``: mean of the patch tokens (class token excluded), then the
            LayerNorm ``fc_norm``; ``"token"``: the LayerNorm ``norm`` on every token, then
            the class token.
        layer_norm_epsilon: LayerNorm epsilon.
    """

    def __init__(self, pooling: str = "avg", layer_norm_epsilon: float = LAYER_NORM_EPSILON, **kwargs):
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}: use one of {list(POOLINGS)}")
        self.pooling, self.layer_norm_epsilon = pooling, float(layer_norm_epsilon)
        self.norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, name="fc_norm" if pooling == "avg" else "norm", dtype=self.dtype_policy
        )

    def build(self, input_shape):
        self.norm.build((input_shape[0], input_shape[-1]) if self.pooling == "avg" else input_shape)

    def call(self, tokens):
        if self.pooling == "avg":
            return self.norm(ops.mean(tokens[:, 1:, :], axis=1))
        return self.norm(tokens)[:, 0, :]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "pooling": self.pooling, "layer_norm_epsilon": self.layer_norm_epsilon}


@keras.saving.register_keras_serializable(package="kfundus")
class RETFoundBackbone(keras_hub.models.Backbone):
    """RETFound's ViT encoder up to the last block: normalised images ``(batch, size,
    size, 3)`` -> tokens ``(batch, 1 + (size / patch)^2, hidden_dim)`` (class token first).

    Args:
        image_size: input side in pixels (a multiple of ``patch_size``).
        patch_size: patch side (16 for RETFound).
        hidden_dim: token width (1024).
        num_layers: transformer blocks (24).
        num_heads: attention heads (16).
        mlp_dim: MLP width (4096).
        drop_path: stochastic-depth rate of the last block (0 at the first, linear between).
        layer_norm_epsilon: LayerNorm epsilon (1e-6).
        dtype: Keras dtype policy of the layers.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        hidden_dim: int = 1024,
        num_layers: int = 24,
        num_heads: int = 16,
        mlp_dim: int = 4096,
        drop_path: float = 0.0,
        layer_norm_epsilon: float = LAYER_NORM_EPSILON,
        dtype=None,
        **kwargs,
    ):
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch_size}")
        grid = image_size // patch_size
        images = keras.Input((image_size, image_size, 3), name="images")
        x = keras.layers.Conv2D(hidden_dim, patch_size, strides=patch_size, name="patch_embed", dtype=dtype)(images)
        x = keras.layers.Reshape((grid * grid, hidden_dim), name="patch_tokens", dtype=dtype)(x)
        x = ClassTokenPosition(name="embeddings", dtype=dtype)(x)
        rates = np.linspace(0.0, float(drop_path), num_layers) if num_layers > 1 else [float(drop_path)]
        for i in range(num_layers):
            x = ViTBlock(
                hidden_dim,
                num_heads,
                mlp_dim,
                drop_path=float(rates[i]),
                layer_norm_epsilon=layer_norm_epsilon,
                name=f"blocks_{i}",
                dtype=dtype,
            )(x)
        super().__init__(inputs=images, outputs=x, dtype=dtype, **kwargs)
        self.image_size, self.patch_size, self.hidden_dim = int(image_size), int(patch_size), int(hidden_dim)
        self.num_layers, self.num_heads, self.mlp_dim = int(num_layers), int(num_heads), int(mlp_dim)
        self.drop_path, self.layer_norm_epsilon = float(drop_path), float(layer_norm_epsilon)

    def get_config(self):
        return {
            **super().get_config(),
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_dim": self.hidden_dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "drop_path": self.drop_path,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }

    def architecture(self) -> dict:
        """The sizes that define the encoder (its config without name, size and drop path)."""
        return {
            "patch_size": self.patch_size,
            "hidden_dim": self.hidden_dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }


# ---------------------------------------------------------------------------
# position embeddings at another image size


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel with PyTorch's ``a = -0.75``."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` weights of PyTorch's 1-D bicubic resize with
    ``align_corners=False`` and no antialiasing: source ``(i + 0.5) * in / out - 0.5`` (not
    clamped), four taps at ``floor(src) - 1 .. + 2`` clamped to the border."""
    weights = np.zeros((size_out, size_in), dtype=np.float64)
    scale = size_in / size_out
    for i in range(size_out):
        src = (i + 0.5) * scale - 0.5
        base = int(np.floor(src))
        t = src - base
        for offset, w in zip((-1, 0, 1, 2), _cubic(np.array([t + 1, t, 1 - t, 2 - t]))):
            weights[i, min(max(base + offset, 0), size_in - 1)] += w
    return weights


def resize_positions(table: np.ndarray, grid: int, extra_tokens: int = 1) -> np.ndarray:
    """Resize a ``(1, extra + g*g, dim)`` position table to a ``grid x grid`` patch grid,
    the class token's row kept, as RETFound's ``interpolate_pos_embed``."""
    table = np.asarray(table)
    old = int(round(np.sqrt(table.shape[1] - extra_tokens)))
    if old * old != table.shape[1] - extra_tokens:
        raise ValueError(f"position table of {table.shape[1]} rows is not {extra_tokens} + a square grid")
    if old == grid:
        return table
    dim = table.shape[-1]
    patches = table[0, extra_tokens:].reshape(old, old, dim).astype(np.float64)
    m = bicubic_matrix(old, grid)
    resized = np.einsum("ih,hwd,jw->ijd", m, patches, m).reshape(1, grid * grid, dim)
    return np.concatenate([table[:, :extra_tokens], resized.astype(table.dtype)], axis=1)
