"""Tuning: an Optuna study that searches from the hand-set recipe and hands over a model.

``space`` (the search space YAML), ``plan`` (fidelity, pruner, storage, the checked inputs),
``budget`` (a study on a wall-clock budget: pure arithmetic), ``sampler`` (TPE seeded per trial),
``clock`` (the throughput probe and the session's deadlines), ``runs`` (the study as MLflow runs,
the objective, progress) and ``session`` (one ``brainseg tune``: trials, summary, refit).
"""
