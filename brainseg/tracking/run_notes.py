"""Run descriptions: the MLflow UI shows a run's ``mlflow.note.content`` tag as its description.

Every run brainseg starts gets one (:func:`brainseg.tracking.mlflow_runs.with_note`): what the run is (from its
name's prefix), its data version (and kind) and its budget profile.
"""

from __future__ import annotations

NOTE_TAG = "mlflow.note.content"  # the MLflow UI shows it as the run's description
_RUN_KINDS = (  # run-name prefix -> what the run is
    ("survival-final", "Final death01 survival model: the pipeline declared in params.yaml (`survival.final`) "
                       "fitted on all patients (imaging features from {features_from} masks); its "
                       "cross-validated figures are in the candidate runs of its parent."),
    ("postprocessing-trial-", "TTA and post-processing of tuning trial {rest}'s network chosen on the validation "
                              "patients (`val_postprocessing_candidates.csv`); the same network, logged with the "
                              "chosen settings as the model the study hands on."),
    ("refit-trial-", "Full-fidelity refit of the best tuning trial ({rest}) on the train patients; the "
                     "epoch and post-processing chosen on validation patients."),
    ("trial-", "Optuna tuning trial {rest}: a segmenter trained at low fidelity, scored by the best "
               "epoch's per-patient validation Dice (`best_val_patient_dice`)."),
    ("study-", "Optuna study {rest}: the parent of its trial runs (compare them on "
               "`best_val_patient_dice`); tagged with the best trial."),
    ("train-", "Training of one segmenter ({rest}) on the train patients; the epoch and "
               "post-processing chosen on validation patients (`best_val_patient_dice`, `val_*`)."),
    ("evaluate-folder", "Evaluation of a segmenter on all patients of a folder outside the split (its "
                        "`subset` tag names the folder; `folder_*` metrics, with the all-empty baseline)."),
    ("evaluate-", "Evaluation of a segmenter on the {rest} patients (`{rest}_*` metrics, with the "
                  "all-empty baseline)."),
    ("promote-", "Promotion gate of {rest}: challenger against champion on validation patients."),
    ("register-", "Registration of {rest}."),
)


def run_note(name: str, tags: dict) -> str:
    """The run's description: what it is, its data version (and kind) and budget profile.

    >>> run_note("evaluate-val", {"data_version": "0123456789abcdef", "profile": "smoke"}).split("\\n\\n")
    ... # doctest: +NORMALIZE_WHITESPACE
    ['Evaluation of a segmenter on the val patients (`val_*` metrics, with the all-empty baseline).',
     'Data version `0123456789ab`; profile `smoke`.']
    """
    what = f"Run {name}."
    for prefix, template in _RUN_KINDS:
        if name.startswith(prefix):
            what = template.format(rest=name[len(prefix):] or "?", features_from=tags.get("features_from", "?"))
            break
    else:
        if tags.get("features_from") or name.startswith(("survival", "death01")):
            what = f"death01 survival model run {name} (imaging features from {tags.get('features_from', '?')} masks)."
    data = f"Data version `{(tags.get('data_version') or 'unknown')[:12]}`"
    if tags.get("fitted_on"):
        data += f" ({tags['fitted_on']})"
    profile = tags.get("profile") or ""
    return f"{what}\n\n{data}" + (f"; profile `{profile}`." if profile else ".")


def with_note(name: str, tags: dict) -> dict:
    """``tags`` plus the run's description (``mlflow.note.content``) unless one is given."""
    return tags if NOTE_TAG in tags else {**tags, NOTE_TAG: run_note(name, tags)}


UI_ROOT = "http://127.0.0.1:5000"  # where `mlflow ui` / `mlflow server` listen by default


def ui_link(experiment_id: str, root: str = UI_ROOT) -> str:
    """The experiment's page in the MLflow UI, opened on runs and models: MLflow 3.17 starts a fresh
    browser in its GenAI workflow unless the link asks for ``workflowType=machine_learning``.

    >>> ui_link("3")
    'http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning'
    """
    return f"{root.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"
