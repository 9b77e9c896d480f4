"""kfundus: retinal-image deep learning with TensorFlow and Keras 3."""

__version__ = "0.2.0"
