"""brainseg: LGG FLAIR-abnormality segmentation and outcome prediction, tracked in MLflow."""

from brainseg import keras_env as _keras_env  # noqa: F401  (must run before any tf.keras use)

__version__ = "0.1.0"
