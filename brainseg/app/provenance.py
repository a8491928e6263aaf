"""Where a model comes from, for the page: registry version, run, data version and kind, the model
card's validation figure, and the lines the page shows for them (no Streamlit here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from brainseg.registry import modelcard

SMOKE_MAX_SIZE = 64  # a network input this small is the smoke profile's test model

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")
_RUNS_URI = re.compile(r"^runs:/(?P<run>[^/]+)/")


def empty_provenance(uri: str) -> dict:
    """The provenance fields, unknown: model, version, run_id, data_version, data_kind ("real",
    "synthetic" or ""), val_dice / val_n_patients (the model card's validation per-patient Dice),
    size (network input px, or None), card (markdown), resolved_uri."""
    return {"model": uri, "version": "", "run_id": "", "data_version": "", "data_kind": "",
            "val_dice": "", "val_n_patients": "", "size": None, "card": "", "resolved_uri": uri}


def _int_or_none(value):
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def card_fields(tags: dict) -> dict:
    """Provenance fields from a model version's ``card.*`` tags (see :mod:`brainseg.registry.modelcard`)."""
    return {"data_kind": tags.get("card.data_kind", ""),
            "val_dice": tags.get("card.val_patient_dice_mean") or tags.get("val_patient_dice_mean", ""),
            "val_n_patients": tags.get("card.val_n_patients") or tags.get("val_n_patients", ""),
            "size": _int_or_none(tags.get("card.size"))}


def model_provenance(uri: str) -> dict:
    """Which model ``uri`` is: registry version, run, data version and its model card's facts.

    A ``models:/NAME@ALIAS`` is resolved to its version now, and ``resolved_uri`` names that
    exact version (load it, so what is shown is what runs). Lookup failures leave fields empty.
    """
    out = empty_provenance(uri)
    path = Path(uri)
    if path.exists():
        out.update(local_provenance(path))
        return out
    try:
        from brainseg.tracking import mlflow_runs

        client = mlflow_runs.client()
        if m := _MODELS_URI.match(uri):
            mv = (client.get_model_version_by_alias(m["name"], m["alias"]) if m["alias"]
                  else client.get_model_version(m["name"], m["version"]))
            out.update(version=str(mv.version), run_id=mv.run_id or "",
                       data_version=mv.tags.get("card.data_version") or mv.tags.get("data_version", ""),
                       resolved_uri=f"models:/{m['name']}/{mv.version}", card=mv.description or "",
                       **card_fields(mv.tags))
        elif m := _RUNS_URI.match(uri):
            run = client.get_run(m["run"])
            metrics = run.data.metrics
            out.update(run_id=m["run"], data_version=run.data.tags.get("data_version", ""),
                       size=_int_or_none(run.data.params.get("size")),
                       val_dice=f"{metrics['val_patient_dice_mean']:.4f}" if "val_patient_dice_mean" in metrics else "",
                       val_n_patients=str(int(metrics["val_n_patients"])) if "val_n_patients" in metrics else "")
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for unknown names
        out["note"] = f"registry lookup failed ({exc})"
    return out


def local_provenance(path: Path) -> dict:
    """From a model folder/.h5: ``brainseg.json`` (meta: run_id, data_version; train: size) and a
    ``model_card.json`` beside it if one was written."""
    found = sorted(path.rglob("brainseg.json")) if path.is_dir() else [path.with_name("brainseg.json")]
    if not found or not found[0].is_file():
        return {"version": "local file"}
    doc = json.loads(found[0].read_text())
    meta = doc.get("meta", {})
    out = {"version": "local file", "run_id": meta.get("run_id", ""), "data_version": meta.get("data_version", ""),
           "size": _int_or_none(doc.get("train", {}).get("size"))}
    card = found[0].with_name(modelcard.FACTS_FILE)
    if card.is_file():
        facts = json.loads(card.read_text())
        out.update(card_fields(modelcard.card_tags(facts)))
        out["data_version"] = out["data_version"] or facts.get("data", {}).get("version", "")
        if card.with_name(modelcard.CARD_FILE).is_file():
            out["card"] = card.with_name(modelcard.CARD_FILE).read_text()
    return out


def provenance_line(d: dict) -> str:
    """One line naming the model version and the data version behind a result."""
    if not (d.get("version") or d.get("run_id") or d.get("data_version")):
        return f"{d.get('model', '?')} (version and data version not known yet)"
    version = f"version {d['version']}" if d.get("version") else "version unknown"
    run = f", run {d['run_id'][:12]}" if d.get("run_id") else ""
    data = d.get("data_version") or "unknown"
    return f"{d.get('model', '?')} ({version}{run}); trained on data version {data[:12]}"


def card_lines(d: dict) -> list[tuple[str, str]]:
    """(level, text) lines for the page from the model card: ``info`` facts, ``warning`` caveats.

    Says whether the training data was real or synthetic, the validation per-patient Dice with its
    count, and when the network is the 64-px smoke model.
    """
    lines = []
    kind = d.get("data_kind")
    if kind == "synthetic":
        lines.append(("warning", "Trained on SYNTHETIC data (made by brainseg data synth): its "
                                 "masks say nothing about real MRI."))
    elif kind == "real":
        lines.append(("info", f"Trained on real data (TCGA-LGG), data version {d.get('data_version', '')[:12]}."))
    else:
        lines.append(("info", "Whether the training data was real or synthetic is not recorded "
                              "(no model card for this model)."))
    if d.get("val_dice"):
        n = f" (n={d['val_n_patients']} patients)" if d.get("val_n_patients") else ""
        try:
            dice = f"{float(d['val_dice']):.3f}"
        except ValueError:
            dice = str(d["val_dice"])
        lines.append(("info", f"Validation per-patient volume Dice {dice}{n}, from the model card."))
    else:
        lines.append(("info", "No validation Dice recorded for this model."))
    if d.get("size") is not None and int(d["size"]) <= SMOKE_MAX_SIZE:
        lines.append(("warning", f"This is a {d['size']}-px smoke-test model (the smoke profile): fast, "
                                 "but too coarse for real use."))
    return lines
