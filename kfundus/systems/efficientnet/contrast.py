"""Ben Graham's local colour normalisation of fundus photographs, as a model layer.

The preprocessing of the Kaggle Diabetic Retinopathy winner (B. Graham, "Kaggle Diabetic
Retinopathy Detection competition report", 2015), widely reused for fundus models:
subtract the local average colour, ``4 * (x - G_sigma * x) + 128`` with ``sigma`` = 1/30 of
the field radius. It evens out illumination and camera colour casts and brings up vessels,
haemorrhages, exudates and the optic cup. The black background becomes the neutral 128.
Graham also painted everything outside 90 % of the field radius grey, to hide the bright
ring the subtraction leaves at the field's edge; kfundus does not. That mask needs a
comparison and a select, which full-integer TFLite cannot run (the int8 interpreter
aborted on them), and the ring is the same in every image, so a CNN learns to ignore it.

It is a layer at the model's input, not a pipeline step, so the SavedModel and every
TFLite file apply it exactly as training did, with no extra step for the deployer. The
blur is a separable depthwise convolution with ``keras.ops`` (any backend).
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian, truncated at 3 sigma (as ``scipy.ndimage``)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


@keras.saving.register_keras_serializable(package="kfundus")
class LocalContrast(keras.layers.Layer):
    """``gain * (x - blur(x)) + 128``, clipped to [0, 255]; ``blur`` is a Gaussian with zero
    padding at the image border.

    Args:
        sigma: Gaussian standard deviation in pixels (Graham: field radius / 30; kfundus'
            crop makes the field fill the image, so ``image_size / 60``).
        gain: Graham's 4.

    Input and output: float RGB in [0, 255], shape (batch, height, width, 3).
    """

    def __init__(self, sigma: float, gain: float = 4.0, **kwargs):
        kwargs.setdefault("dtype", "float32")  # blur sums many terms: not in float16
        super().__init__(**kwargs)
        if not sigma > 0:
            raise ValueError(f"LocalContrast sigma must be > 0, got {sigma}")
        self.sigma, self.gain = float(sigma), float(gain)
        self._kernel = gaussian_kernel(self.sigma)

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        k = self._kernel
        rows = ops.convert_to_tensor(np.tile(k[:, None, None, None], (1, 1, 3, 1)), dtype=x.dtype)
        cols = ops.convert_to_tensor(np.tile(k[None, :, None, None], (1, 1, 3, 1)), dtype=x.dtype)
        blur = ops.depthwise_conv(ops.depthwise_conv(x, rows, padding="same"), cols, padding="same")
        return ops.clip(self.gain * (x - blur) + 128.0, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma, "gain": self.gain}
