"""Out-of-fold predicted masks: every patient segmented by a model that never saw that patient.

The split's ``fold`` column (brainseg.data.split: k folds over all patients) drives it. For fold
``k`` a cheap segmenter is trained on the other folds except ``k + 1`` (its validation fold, for
epoch selection) and predicts fold ``k`` through :class:`brainseg.inference.segmenter.Segmenter`, the same
path predict, the served model and the page use. The outcome model fitted on features of these
masks sees in training the kind of features it is served.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from brainseg.data.arrays import load_arrays, load_full_images
from brainseg.settings.config import Train


@dataclasses.dataclass
class FoldReport:
    fold: int
    train_patients: int
    val_patients: int
    test_patients: int
    best_epoch: int
    val_patient_dice: float
    seconds: float


def fold_plan(split: pd.DataFrame) -> list[tuple[int, list[str], list[str], list[str]]]:
    """[(fold, train patients, val patients, test patients)] from a split with a ``fold`` column.

    Validation is the next fold (cyclically); training is every other fold. Needs >= 3 folds.

    >>> s = pd.DataFrame({"patient": list("abcdef"), "fold": [0, 1, 2, 0, 1, 2]})
    >>> [(k, tr, va, te) for k, tr, va, te in fold_plan(s)][0]
    (0, ['c', 'f'], ['b', 'e'], ['a', 'd'])
    """
    if "fold" not in split.columns:
        raise ValueError("split has no 'fold' column (run `brainseg data split`)")
    folds = sorted(int(f) for f in split["fold"].unique())
    if len(folds) < 3:
        raise ValueError(f"out-of-fold masks need at least 3 folds, the split has {len(folds)} "
                         "(split.folds in params.yaml)")
    plan = []
    for i, k in enumerate(folds):
        val_fold = folds[(i + 1) % len(folds)]
        def members(keep):
            return sorted(split.loc[keep, "patient"].astype(str))
        plan.append((k, members(~split["fold"].isin([k, val_fold])), members(split["fold"] == val_fold),
                     members(split["fold"] == k)))
    return plan


def oof_masks(manifest: pd.DataFrame, split: pd.DataFrame, cfg: Train, inference: dict | None = None, *,
              cache_dir=None, version: str = "", verbose: int = 0,
              on_fold: Callable[[FoldReport], None] | None = None) -> tuple[list[np.ndarray], list[FoldReport]]:
    """Out-of-fold (H, W) bool masks aligned with ``manifest``'s rows, and one report per fold.

    ``cfg``: the cheap segmenter's training settings; ``inference``: InferenceSettings fields
    (threshold defaults to ``cfg.threshold``). Patients of ``manifest`` missing from the split
    are refused. Models are discarded after predicting their fold.
    """
    from brainseg.inference.segmenter import InferenceSettings, Segmenter
    from brainseg.training.train import Arrays, train

    missing = sorted(set(manifest["patient"]) - set(split["patient"].astype(str)))
    if missing:
        raise ValueError(f"{len(missing)} patient(s) of the dataset are not in the split, e.g. {missing[0]} "
                         "(rerun `brainseg data split`)")
    settings = InferenceSettings.from_dict({"threshold": cfg.threshold, **(inference or {})})
    masks: list[np.ndarray | None] = [None] * len(manifest)
    reports = []
    rows_of = manifest.reset_index(drop=True)
    for k, train_p, val_p, test_p in fold_plan(split):
        start = time.perf_counter()
        subsets = [rows_of[rows_of["patient"].isin(p)] for p in (train_p, val_p, test_p)]
        arrays = []
        for rows in subsets[:2]:
            X, Y = load_arrays(rows.reset_index(drop=True), cfg.prep, cache_dir=cache_dir, version=version)
            arrays.append(Arrays(X, Y, rows["patient"].tolist()))
        result = train(cfg, arrays[0], arrays[1], verbose=verbose)
        test_rows = subsets[2]
        if len(test_rows):
            segmented = Segmenter(result.model, cfg, settings).segment(
                load_full_images(test_rows), groups=test_rows["patient"].tolist())
            for i, mask in zip(test_rows.index, segmented.masks):
                masks[i] = mask
        report = FoldReport(k, len(train_p), len(val_p), len(test_p), result.best_epoch + 1,
                            float(result.best_value), time.perf_counter() - start)
        reports.append(report)
        if on_fold:
            on_fold(report)
    return masks, reports
