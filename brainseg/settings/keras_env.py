"""Keras framework variables and the quiet console. Imported first by every entry point (see
STACK notes); the package's ``__init__`` imports it, so ``import brainseg.anything`` runs it.

segmentation-models 1.0.1 predates Keras 3: it needs ``SM_FRAMEWORK=tf.keras`` and TensorFlow
must hand out the legacy Keras 2 (``tf_keras``) via ``TF_USE_LEGACY_KERAS=1``. Both must be set
before anything touches ``tf.keras``; a later setting silently gives Keras 3.

Library start-up noise (TensorFlow/absl C++ lines, the cuInit error, the segmentation-models
banner, harmless MLflow warnings) is silenced here too, before TensorFlow loads, unless
``BRAINSEG_VERBOSE=1`` (``brainseg --verbose``): see :mod:`brainseg.settings.quiet`. This covers the CLI,
``python -m brainseg`` (``mlflow run``), DVC stages and the served model alike.
"""

import os

from brainseg.settings import quiet

os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
if not quiet.verbose_requested():
    quiet.install()
