"""Cross-validation over patients, pure: the folds, each fold's split, choices on the pooled
out-of-fold predictions, and the spread across folds.

The protocol (nnU-Net's): the non-test patients are cut into the split's ``fold`` groups; fold ``k``'s
model trains on the other groups and is scored on group ``k`` only, which it never saw and on which it
chooses nothing (it keeps its last epoch). Every non-test patient thus gets out-of-fold probabilities
from exactly one model. Post-processing is then chosen on the pooled out-of-fold predictions (all
non-test patients instead of one validation subset). Test patients are in no fold and read by no choice.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from brainseg.evaluation.evaluate import postprocess_candidates, score
from brainseg.evaluation.metrics import bootstrap_ci
from brainseg.inference.segmenter import InferenceSettings, final_masks


class FoldError(ValueError):
    """A split that cannot be cross-validated as asked (too few folds, a fold without patients)."""


@dataclasses.dataclass(frozen=True)
class Fold:
    k: int
    train: tuple[str, ...]     # patients the fold model trains on (every other fold)
    held_out: tuple[str, ...]  # patients it is scored on (never seen, nothing chosen on them)


def folds_of(split: pd.DataFrame) -> list[Fold]:
    """The folds of the non-test patients of ``split`` (columns patient, subset, fold).

    >>> s = pd.DataFrame({"patient": list("abcdefg"), "subset": ["train"] * 3 + ["val"] * 3 + ["test"],
    ...                   "fold": [0, 1, 2, 0, 1, 2, 0]})
    >>> [(f.k, f.train, f.held_out) for f in folds_of(s)][0]
    (0, ('b', 'c', 'e', 'f'), ('a', 'd'))
    """
    if "fold" not in split.columns:
        raise FoldError("the split has no 'fold' column (run `brainseg data split`)")
    pool = split[split["subset"] != "test"]
    ks = sorted(int(k) for k in pool["fold"].unique())
    if len(ks) < 2:
        raise FoldError(f"cross-validation needs at least 2 folds of non-test patients, the split has {len(ks)} "
                        "(split.folds, or --folds)")
    out = []
    for k in ks:
        held = pool.loc[pool["fold"] == k, "patient"]
        rest = pool.loc[pool["fold"] != k, "patient"]
        out.append(Fold(k, tuple(sorted(rest)), tuple(sorted(held))))
    return out


def fold_split(split: pd.DataFrame, fold: Fold) -> pd.DataFrame:
    """``split`` as fold ``fold`` sees it: its training patients ``train``, its held-out ones ``val``
    (watched during training, scored after it, chosen on never), the test patients ``test``."""
    out = split.copy()
    test = out["subset"] == "test"
    out.loc[~test, "subset"] = np.where(out.loc[~test, "patient"].isin(fold.held_out), "val", "train")
    return out


def check_partition(split: pd.DataFrame, folds: list[Fold]) -> None:
    """Every non-test patient held out by exactly one fold and trained on by all the others."""
    pool = set(split.loc[split["subset"] != "test", "patient"])
    held = [p for f in folds for p in f.held_out]
    if sorted(held) != sorted(pool) or len(held) != len(set(held)):
        raise FoldError("the folds do not partition the non-test patients")
    for f in folds:
        if set(f.train) & set(f.held_out) or set(f.train) | set(f.held_out) != pool:
            raise FoldError(f"fold {f.k}: training and held-out patients overlap or miss some")


# ------------------------------------------------------------------ choices on the pooled predictions
def choose_on_pooled(manifest: pd.DataFrame, probs_by_tta: dict[bool, np.ndarray], shapes: list, boxes: list,
                     truths: list[np.ndarray], base: InferenceSettings, folds: pd.Series,
                     grid: dict | None = None) -> tuple[InferenceSettings, pd.DataFrame]:
    """Choose TTA and post-processing by mean per-patient Dice on the pooled out-of-fold slices.

    ``probs_by_tta[tta]``: (N, S, S) out-of-fold probabilities of ``manifest``'s rows (each row's
    from the model of its own fold); ``folds``: the fold of each patient (index = patient). Returns
    the best settings (the first reaching the best mean: simplest first) and a table of every
    candidate with its mean, median, 95% bootstrap interval over patients and the spread of its
    per-fold means (``fold_dice_sd``), so a difference can be read against its noise.
    """
    groups = manifest["patient"].tolist()
    rows, best, best_value = [], None, -np.inf
    for cand in postprocess_candidates(base, grid):
        if cand.tta not in probs_by_tta:
            continue
        masks = final_masks(probs_by_tta[cand.tta], shapes, boxes, cand, groups)
        ev = score(manifest, masks, truths, boundary=False)  # Dice decides; boundary figures for the chosen one
        spread = fold_spread(ev.patients, folds)
        s = ev.summary
        rows.append({"tta": cand.tta, "min_component_px": cand.min_component_px,
                     "component_confidence": cand.component_confidence, "threshold": cand.threshold,
                     "patient_dice_mean": s["patient_dice_mean"], "patient_dice_median": s["patient_dice_median"],
                     "patient_dice_ci_low": s["patient_dice_ci_low"], "patient_dice_ci_high": s["patient_dice_ci_high"],
                     "fold_dice_sd": spread["fold_dice_sd"], "empty_slice_fp_rate": s["empty_slice_fp_rate"],
                     "n_patients": s["n_patients"]})
        value = s["patient_dice_mean"] if s["patient_dice_mean"] == s["patient_dice_mean"] else -1.0
        if value > best_value + 1e-9:
            best, best_value = cand, value
    if best is None:
        raise FoldError("no post-processing candidate could be scored (no out-of-fold probabilities)")
    return best, pd.DataFrame(rows)


def fold_spread(patients: pd.DataFrame, folds: pd.Series) -> dict:
    """The spread of the per-fold mean per-patient Dice (``patients``: a patient table with
    ``patient`` and ``volume_dice``; ``folds``: fold per patient). Patients without tumor count in no mean.

    >>> pt = pd.DataFrame({"patient": list("abcd"), "volume_dice": [0.8, 0.6, 0.9, np.nan]})
    >>> s = fold_spread(pt, pd.Series({"a": 0, "b": 0, "c": 1, "d": 1}))
    >>> round(s["fold_dice_mean_0"], 2), round(s["fold_dice_mean_1"], 2), round(s["fold_dice_sd"], 3)
    (0.7, 0.9, 0.141)
    """
    per = patients.assign(fold=patients["patient"].map(folds)).dropna(subset=["volume_dice"])
    means = per.groupby("fold")["volume_dice"].mean()
    out = {f"fold_dice_mean_{int(k)}": float(v) for k, v in means.items()}
    out["fold_dice_sd"] = float(means.std(ddof=1)) if len(means) > 1 else float("nan")
    out["fold_dice_min"] = float(means.min()) if len(means) else float("nan")
    out["fold_dice_max"] = float(means.max()) if len(means) else float("nan")
    return out


def paired_difference(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """Mean per-patient Dice difference ``a - b`` over the patients both score, with its 95%
    bootstrap interval: whether a choice (a candidate, a configuration) beats another beyond the noise.

    >>> a = pd.DataFrame({"patient": list("abc"), "volume_dice": [0.9, 0.8, 0.7]})
    >>> b = pd.DataFrame({"patient": list("abc"), "volume_dice": [0.8, 0.8, 0.6]})
    >>> d = paired_difference(a, b); round(d["diff_mean"], 3), d["n_patients"]
    (0.067, 3)
    """
    m = a[["patient", "volume_dice"]].merge(b[["patient", "volume_dice"]], on="patient", suffixes=("_a", "_b"))
    diff = (m["volume_dice_a"] - m["volume_dice_b"]).dropna()
    lo, hi = bootstrap_ci(diff.to_numpy())
    return {"diff_mean": float(diff.mean()) if len(diff) else float("nan"), "diff_ci_low": lo, "diff_ci_high": hi,
            "n_patients": int(len(diff))}
