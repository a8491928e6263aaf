"""What a registered segmenter's score rests on, and whether two such scores can be compared (pure).

Two kinds of evidence choose models here, never the test patients:
- ``val``: the validation patients of the current data version (a single-split model; the gate
  evaluates challenger and champion on them, about 13 patients on the real data);
- ``cv``: the pooled out-of-fold predictions of a cross-validation (``brainseg cv``; every non-test
  patient, about 75), keyed by the data version and the fold assignment. A CV ensemble cannot be
  scored on validation patients: its members trained on them.

The gate compares like with like only: two ``val`` versions on the same validation patients, two ``cv``
versions on the same folds of the same data. Evidence of different kinds (or CV on other folds) is not
compared: the gate says so and keeps the champion; ``--force`` decides explicitly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

EVIDENCE_TAG = "brainseg.evidence"
KEY_TAG = "cv_evidence_key"
CV_METRIC = "cv_patient_dice_mean"


@dataclasses.dataclass(frozen=True)
class Evidence:
    kind: str                  # "val" | "cv"
    key: str | None = None     # cv: data version + fold assignment; val: None (the gate evaluates)
    score: float | None = None
    n_patients: int | None = None

    def describe(self) -> str:
        if self.kind == "cv":
            n = f"{self.n_patients} " if self.n_patients else ""
            return f"cross-validated ({n}out-of-fold patients, folds {str(self.key)[:8]})"
        return "single split (the validation patients)"


def cv_key(data_version: str, folds: dict[str, int]) -> str:
    """The identity of a CV's evidence: the data version and which fold held out each patient.

    >>> cv_key("v1", {"a": 0, "b": 1}) == cv_key("v1", {"b": 1, "a": 0}) != cv_key("v1", {"a": 1, "b": 0})
    True
    """
    text = data_version + ";" + ";".join(f"{p}={int(k)}" for p, k in sorted(folds.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def of_tags(tags: dict) -> Evidence:
    """A version's (or a run's) evidence from its tags; versions registered before this tag are ``val``."""
    if tags.get(EVIDENCE_TAG) != "cv":
        return Evidence("val")
    try:
        score = float(tags.get(CV_METRIC, "nan"))
    except ValueError:
        score = math.nan
    n = tags.get("cv_n_patients")
    return Evidence("cv", tags.get(KEY_TAG), None if math.isnan(score) else score,
                    int(float(n)) if n not in (None, "") else None)


def comparison(challenger: Evidence, champion: Evidence) -> tuple[bool, str]:
    """(comparable, why not). Like with like: val with val, cv with cv on the same folds and data.

    >>> comparison(Evidence("cv", "k1", 0.8, 75), Evidence("val"))[0]
    False
    >>> comparison(Evidence("cv", "k1", 0.8, 75), Evidence("cv", "k1", 0.7, 75))
    (True, '')
    >>> comparison(Evidence("cv", "k1", 0.8), Evidence("cv", "k2", 0.7))[1]
    'out-of-fold scores on other folds or another data version are not comparable'
    """
    if challenger.kind != champion.kind:
        return False, (f"evidence of different kinds: the challenger's is {challenger.describe()}, the "
                       f"champion's {champion.describe()}; not compared")
    if challenger.kind == "cv" and challenger.key != champion.key:
        return False, "out-of-fold scores on other folds or another data version are not comparable"
    return True, ""
