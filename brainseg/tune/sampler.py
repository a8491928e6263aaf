"""The study's sampler: Optuna's TPE seeded per trial, so resumed studies and side-by-side workers
never replay a point and a study is reproducible without any process id."""

from __future__ import annotations

import hashlib

import optuna


def derive_seed(base_seed: int, study_name: str, n_trials_in_storage: int, worker: int = 0) -> int:
    """Sampler seed of one trial: the study's seed and name, the number of trials stored before it
    (its trial number) and the worker. A resumed study or a second worker gets new trial numbers,
    so it never replays the random points of earlier trials; the same inputs give the same seed.

    >>> derive_seed(0, "s", 0, 0) == derive_seed(0, "s", 0, 0) != derive_seed(0, "s", 2, 0)
    True
    """
    text = f"{base_seed}:{study_name}:{n_trials_in_storage}:{worker}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Optuna's TPE, seeded for each trial from :func:`derive_seed` with the trial's number.

    Trial numbers come from the storage, one per trial, so sessions that resume a study and
    workers that run side by side (even two started at once without ``--worker``) never draw the
    same random numbers, and no process id is involved: a study resumed k times samples the same
    points as one run straight through (given the same objective values).
    """

    def __init__(self, seed: int, study_name: str, worker: int = 0, n_startup_trials: int = 4):
        self.seed, self.study_name, self.worker, self.n_startup_trials = seed, study_name, worker, n_startup_trials
        self._current: tuple[int, optuna.samplers.TPESampler] | None = None

    def _for(self, trial) -> optuna.samplers.TPESampler:
        if self._current is None or self._current[0] != trial.number:
            seed = derive_seed(self.seed, self.study_name, trial.number, self.worker)
            self._current = (trial.number,
                             optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.n_startup_trials))
        return self._current[1]

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._for(trial).after_trial(study, trial, state, values)
