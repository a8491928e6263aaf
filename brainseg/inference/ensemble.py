"""The fold ensemble as one network: the members' probabilities averaged (nnU-Net's default model).

A cross-validation's k fold models become one Keras model whose output is the mean of theirs, so
everything downstream is unchanged: :class:`~brainseg.inference.segmenter.Segmenter` runs it (flip
TTA then averages the members' and the flips' probabilities alike), ``save_model`` writes it as one
``model.h5``, and the served pyfunc, ``brainseg predict``, ``evaluate``, the page and the bench load it
as they load any segmenter: what is served is what was evaluated.
"""

from __future__ import annotations

import brainseg.settings.keras_env  # noqa: F401  (Keras variables before TensorFlow)

import tf_keras as keras

ENSEMBLE_PREFIX = "fold_"


def ensemble_model(members: list[keras.Model], names: list[str] | None = None) -> keras.Model:
    """One network over ``members`` (same input shape): (B, S, S, C) -> the mean of their (B, S, S, 1)
    probabilities. Each member is wrapped under its own name (``fold_0``, ... or ``names``), so the
    saved file keeps them apart. A single member is returned as it is.
    """
    if not members:
        raise ValueError("an ensemble needs at least one member")
    if len(members) == 1:
        return members[0]
    shapes = {tuple(m.input_shape[1:]) for m in members}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members take different inputs: {sorted(shapes)}")
    names = names or [f"{ENSEMBLE_PREFIX}{i}" for i in range(len(members))]
    image = keras.Input(shape=next(iter(shapes)), name="image")
    outputs = [keras.Model(m.inputs, m.outputs, name=name)(image) for m, name in zip(members, names, strict=True)]
    mean = keras.layers.Average(name="fold_mean", dtype="float32")(outputs)
    return keras.Model(image, mean, name=f"ensemble_of_{len(members)}")


def members_of(model: keras.Model) -> list[keras.Model]:
    """The member networks of an :func:`ensemble_model` (``[model]`` for a single network)."""
    inner = [layer for layer in model.layers if isinstance(layer, keras.Model)
             and layer.name.startswith(ENSEMBLE_PREFIX)]
    return inner or [model]
