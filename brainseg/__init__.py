"""brainseg: LGG FLAIR-abnormality segmentation and outcome prediction, tracked in MLflow."""

# imported for its side effect: the Keras variables are set before anything can import TensorFlow
from brainseg.settings import keras_env as _keras_env  # noqa: F401

__version__ = "0.1.0"
