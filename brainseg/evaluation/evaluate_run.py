"""``brainseg evaluate`` as an MLflow run: a stored model (folder, ``runs:/`` or ``models:/`` URI)
scored on one subset of the current data version, with its stored inference settings.

Used by the ``evaluate`` command, the test report and the registry gate (:mod:`brainseg.registry.promotion`),
so it imports neither the workflows nor the gate.
"""

from __future__ import annotations

import json
from pathlib import Path

from brainseg.data.arrays import load_full_images
from brainseg.data.context import DataContext
from brainseg.data.manifest import patient_spacing, with_volumes_ml
from brainseg.evaluation.evaluate import evaluate
from brainseg.registry import model_registry
from brainseg.settings.config import Settings
from brainseg.tracking import mlflow_runs, run_context


class MasksUnavailable(ValueError):
    """The masks of a subset are missing or unreadable (e.g. sequestered test labels)."""


def subset_truths(ctx: DataContext, subset: str, rows, described: str | None = None) -> list:
    """The subset's masks at full size, or :class:`MasksUnavailable` naming how many are missing
    (and the subset as ``described``, default its name)."""
    described = described or subset
    missing = [p for p in rows["mask_path"] if not Path(p).is_file()]
    if missing:
        raise MasksUnavailable(f"{described} masks unavailable: {len(missing)} of {len(rows)} mask files missing "
                               f"(e.g. {missing[0]})")
    try:
        return ctx.truths(subset)
    except (OSError, ValueError) as exc:
        raise MasksUnavailable(f"{described} masks unavailable: {exc}") from exc


def scored_name(subset: str, folder: Path | None = None) -> tuple[str, str]:
    """(label, description) of what an evaluation scores: the run is ``evaluate-<label>``, its
    metrics ``<label>_*``, its ``subset`` tag the description. A folder outside the split (all its
    patients in the context's subset ``test``) is ``("folder", "folder:<its name>")``, never ``test``.

    >>> scored_name("val"), scored_name("test", Path("/data/site_b/"))
    (('val', 'val'), ('folder', 'folder:site_b'))
    """
    if folder is None:
        return subset, subset
    return "folder", f"folder:{Path(folder).resolve().name}"


def tracked_evaluation(settings: Settings, model_uri: str, ctx: DataContext, subset: str,
                       overrides: dict | None = None, out_dir: Path | None = None,
                       tags: dict | None = None, folder: Path | None = None) -> dict:
    """Evaluate a model, with its stored inference settings (``overrides`` on top), on ``subset``
    as an MLflow run; writes metrics.json and per-patient CSV.

    Metrics are logged (and written to metrics.json) under the split's name, ``{subset}_*``
    (``test_patient_dice_mean``, ``val_patient_dice_mean``), or ``folder_*`` for a context built
    from ``folder`` (:func:`scored_name`); the returned ``metrics`` are unprefixed.
    The run starts only once the model, the rows and the masks are loaded and scored, and the
    report files are written inside it: a failure before scoring leaves no run, one after it a
    FAILED run, never a FINISHED one.
    Raises :class:`MasksUnavailable` when the subset's masks are missing or unreadable.
    """
    label, described = scored_name(subset, folder)
    segmenter = model_registry.load_segmenter(model_uri, **(overrides or {}))
    rows = ctx.rows(subset)
    if rows.empty:
        raise ValueError(f"evaluate: subset {described!r} has no slices")
    truths = subset_truths(ctx, subset, rows, described)
    images = load_full_images(rows)
    spacing = patient_spacing(rows)  # an imported dataset's mm (HD95 in mm, volumes in mL); else None: voxels
    result = evaluate(segmenter, rows, images, truths, spacing=spacing)
    result.patients = with_volumes_ml(result.patients, spacing)
    all_tags = {**run_context.lineage_tags(ctx.version, settings.profile), "model_uri": model_uri, "subset": described,
                **(tags or {})}
    with mlflow_runs.run(f"evaluate-{label}", all_tags) as active:
        mlflow_runs.log_params({f"inference.{k}": v for k, v in segmenter.settings.to_dict().items()}
                            | {"subset": described, "model_uri": model_uri})
        mlflow_runs.log_dataset_input(rows, ctx.root, ctx.version, label)
        metrics = mlflow_runs.log_evaluation(result, f"{label}_", images, truths)
        metrics = {k: (None if isinstance(v, float) and v != v else v) for k, v in metrics.items()}
        if out_dir is not None:
            write_report(Path(out_dir), label, metrics, result)
    return {"run_id": active.info.run_id, "metrics": metrics, "result": result}


def write_report(out_dir: Path, label: str, metrics: dict, result) -> None:
    """metrics.json (``<label>_*``), per_patient.csv and per_slice.csv of one evaluation."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps({f"{label}_{k}": v for k, v in metrics.items()}, indent=2))
    result.patients.to_csv(out_dir / "per_patient.csv", index=False)
    result.slices.drop(columns=["image_path"]).to_csv(out_dir / "per_slice.csv", index=False)


def write_unavailable_report(output: Path, subset: str, reason: str) -> None:
    """The report's files when the masks are unavailable: a flag as metric, empty tables, the reason."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps({f"{subset}_masks_available": False}, indent=2))
    (output / "per_patient.csv").write_text("patient,volume_dice\n")
    (output / "per_slice.csv").write_text("patient,slice\n")
    (output / "unavailable.txt").write_text(reason + "\n")
