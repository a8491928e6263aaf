"""Keras framework variables. Imported first by every entry point (see STACK notes).

segmentation-models 1.0.1 predates Keras 3: it needs ``SM_FRAMEWORK=tf.keras`` and TensorFlow
must hand out the legacy Keras 2 (``tf_keras``) via ``TF_USE_LEGACY_KERAS=1``. Both must be set
before anything touches ``tf.keras``; a later setting silently gives Keras 3.
"""

import os

os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
