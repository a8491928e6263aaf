"""brainseg: LGG FLAIR-abnormality segmentation and outcome prediction, tracked in MLflow."""

from brainseg.settings import keras_env as _keras_env

__version__ = "0.1.0"
