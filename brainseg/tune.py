"""Optuna tuning: one function maps a trial to a config; each trial is a nested MLflow run.

The search space is YAML in ``experiments/`` (no code). Each parameter is one of::

    name: {type: categorical, choices: [...]}
    name: {type: float, low: 1e-4, high: 1e-2, log: true}
    name: {type: int, low: 1, high: 3}
    name: {type: ..., when: {arch: [unet, fpn]}}     # conditional: only for those values

Names are ``train`` settings (``lr``, ``arch``, ``encoder``, ...) or loss weights ``loss.bce``,
``loss.dice``, ``loss.focal``, ``loss.tversky``, ``loss.jaccard``.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import optuna
import yaml

from brainseg.config import ConfigError, TrainConfig

PRUNERS = ("hyperband", "median", "none")
OBJECTIVE = "val_patient_dice"


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    spec: dict

    def applies(self, chosen: dict) -> bool:
        when = self.spec.get("when") or {}
        return all(chosen.get(k) in (v if isinstance(v, list) else [v]) for k, v in when.items())

    def suggest(self, trial: optuna.Trial):
        s, t = self.spec, self.spec["type"]
        if t == "categorical":
            return trial.suggest_categorical(self.name, s["choices"])
        if t == "float":
            return trial.suggest_float(self.name, float(s["low"]), float(s["high"]), log=bool(s.get("log", False)))
        return trial.suggest_int(self.name, int(s["low"]), int(s["high"]), log=bool(s.get("log", False)))


def load_search_space(path: Path) -> list[Param]:
    """Read and check a search-space YAML; errors name the file and the parameter."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: search space file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of parameter name to spec")
    params = []
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, spec in raw.items():
        where = f"{path}: parameter {name!r}"
        if not isinstance(spec, dict) or spec.get("type") not in ("categorical", "float", "int"):
            raise ConfigError(f"{where}: needs type categorical, float or int")
        base = name.split(".")[0]
        if base not in train_fields:
            raise ConfigError(f"{where}: not a train setting (known: {sorted(train_fields)})")
        if spec["type"] == "categorical" and not spec.get("choices"):
            raise ConfigError(f"{where}: categorical needs a non-empty `choices` list")
        if spec["type"] in ("float", "int"):
            if "low" not in spec or "high" not in spec or float(spec["low"]) > float(spec["high"]):
                raise ConfigError(f"{where}: needs low <= high")
        params.append(Param(name, spec))
    check_choices(params, path)
    return params


def check_choices(params: list[Param], path: Path) -> None:
    """Unknown architecture / encoder / loss names fail before any trial starts."""
    from brainseg.models.factory import ARCHS, ENCODERS
    from brainseg.models.losses import LOSS_NAMES

    for p in params:
        choices = p.spec.get("choices") or []
        bad = {"arch": [c for c in choices if c not in ARCHS],
               "encoder": [c for c in choices if c not in ENCODERS]}.get(p.name, [])
        if p.name.startswith("loss.") and p.name.split(".", 1)[1] not in LOSS_NAMES:
            bad = [p.name]
        if bad:
            raise ConfigError(f"{path}: parameter {p.name!r} has unknown name(s) {bad}")


def trial_config(trial: optuna.Trial, base: dict, space: list[Param]) -> TrainConfig:
    """Map a trial to a TrainConfig: ``base`` train settings with the suggested values on top.

    Suggested loss weights (``loss.NAME``) replace the base loss as a whole.
    """
    d = copy.deepcopy(base)
    chosen: dict = {}
    loss: dict = {}
    for p in space:
        if not p.applies(chosen):
            continue
        chosen[p.name] = value = p.suggest(trial)
        if p.name.startswith("loss."):
            loss[p.name.split(".", 1)[1]] = value
        else:
            d[p.name] = value
    if loss:
        d["loss"] = loss
    return TrainConfig.from_dict(d)


def make_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(max_epochs, 1), reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"tune.pruner: {name!r} is not one of {', '.join(PRUNERS)}")


def make_storage(url: str, heartbeat: int = 60, on_stale=None):
    """An Optuna storage: SQLAlchemy URL (SQLite, PostgreSQL) or ``journal:PATH`` (journal file).

    Heartbeats let a restarted worker mark trials of a killed worker as FAIL.
    """
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.split(":", 1)[1]))
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                                      heartbeat_stale_trial_callback=on_stale)


def redact(url: str) -> str:
    """Storage URL without its password (for logs)."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


# ------------------------------------------------------------------- study with MLflow runs
PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"


def _fail_stale_run(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Heartbeat callback: a killed worker's trial became FAIL, so its MLflow run ends FAILED too."""
    from brainseg import tracking

    run_id = trial.user_attrs.get(RUN_ATTR)
    if run_id:
        tracking.set_tags(run_id, {"state": "FAIL", "failure": "worker stopped (no heartbeat)"})
        tracking.terminate(run_id, "FAILED")


def study_storage(url: str, heartbeat: int):
    return make_storage(url, heartbeat, on_stale=_fail_stale_run)


@dataclasses.dataclass
class StudyPlan:
    settings: dict
    study_name: str
    storage_url: str
    n_trials: int
    timeout: float
    space: list[Param]
    space_path: Path


def plan_from_settings(settings: dict, study_name: str | None, storage: str | None,
                       n_trials: int | None, timeout: float | None) -> StudyPlan:
    """Resolve and check every tuning input before anything is created (bad input fails here)."""
    t = settings["tune"]
    if t["pruner"] not in PRUNERS:
        raise ConfigError(f"tune.pruner: {t['pruner']!r} is not one of {', '.join(PRUNERS)}")
    space_path = Path(t["search_space"])
    space = load_search_space(space_path)
    base = {**settings["train"], "epochs": int(t["epochs"])}
    TrainConfig.from_dict(base)
    from brainseg.models.factory import check_names

    check_names(base["arch"], base["encoder"])
    return StudyPlan(settings, study_name or t["study_name"], storage or t["storage"],
                     int(n_trials or t["n_trials"]), float(timeout or t["timeout"]), space, space_path)


def open_plan_study(plan: StudyPlan) -> optuna.Study:
    t = plan.settings["tune"]
    storage = study_storage(plan.storage_url, int(t.get("heartbeat", 60)))
    sampler = optuna.samplers.TPESampler(seed=int(t["sampler_seed"]), n_startup_trials=4)
    return optuna.create_study(study_name=plan.study_name, storage=storage, direction="maximize",
                               sampler=sampler, pruner=make_pruner(t["pruner"], int(t["epochs"])),
                               load_if_exists=True)


def ensure_parent(study: optuna.Study, plan: StudyPlan, experiment: str, version: str) -> str:
    from brainseg import tracking

    parent = study.user_attrs.get(PARENT_ATTR)
    if parent:
        tracking.set_tags(parent, {"state": "RUNNING"})
        return parent
    t = plan.settings["tune"]
    params = {"study_name": plan.study_name, "storage": redact(plan.storage_url), "sampler": "TPESampler",
              "sampler_seed": t["sampler_seed"], "pruner": t["pruner"], "objective": OBJECTIVE,
              "epochs_per_trial": t["epochs"], "search_space": plan.space_path.read_text(),
              "profile": plan.settings["profile"]}
    tags = {**tracking.lineage_tags(version, plan.settings), "optuna.study": plan.study_name}
    parent = tracking.create_parent_run(experiment, f"study-{plan.study_name}", tags, params)
    study.set_user_attr(PARENT_ATTR, parent)
    return parent


class TrialLink:
    """Keras callback factory: links the trial to its MLflow run and reports val_patient_dice."""

    @staticmethod
    def make(trial: optuna.Trial):
        import mlflow
        import tf_keras as keras
        from optuna_integration import TFKerasPruningCallback

        class _Link(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                trial.set_user_attr(RUN_ATTR, mlflow.active_run().info.run_id)

        class _Prune(TFKerasPruningCallback):
            def on_epoch_end(self, epoch, logs=None):
                try:
                    super().on_epoch_end(epoch, logs)
                except optuna.TrialPruned:
                    mlflow.set_tag("state", "PRUNED")
                    mlflow.log_metric("pruned_at_epoch", epoch)
                    raise

        return [_Link(), _Prune(trial, OBJECTIVE)]


def objective_for(plan: StudyPlan, ctx, parent: str):
    from brainseg import tracking
    from brainseg.workflows import tracked_training

    base = {**plan.settings["train"], "epochs": int(plan.settings["tune"]["epochs"])}

    def objective(trial: optuna.Trial) -> float:
        cfg = trial_config(trial, base, plan.space)
        tags = {"mlflow.parentRunId": parent, "optuna.study": plan.study_name, "optuna.trial": str(trial.number)}
        try:
            res = tracked_training(plan.settings, cfg, ctx, run_name=f"trial-{trial.number:03d}",
                                   callbacks=TrialLink.make(trial), tags=tags, verbose=0,
                                   finished_on=(optuna.TrialPruned,))
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            run_id = trial.user_attrs.get(RUN_ATTR)
            if run_id:
                tracking.set_tags(run_id, {"state": "FAIL", "failure": f"{type(exc).__name__}: {exc}"[:500]})
            raise
        tracking.set_tags(res["run_id"], {"state": "COMPLETE"})
        trial.set_user_attr("val_patient_dice_full_size", res["metrics"].get("patient_dice_mean"))
        trial.set_user_attr("model_uri", res["model_uri"])
        return res["val_patient_dice"]

    return objective


def summarize_study(study: optuna.Study, parent: str) -> dict:
    """Best trial tags/metrics and Optuna's plots on the parent run; returns the summary."""
    from brainseg import tracking

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    states = {s.name: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    summary = {"study": study.study_name, "trials": len(study.trials), "states": states,
               "parent_run_id": parent}
    tracking.log_metrics_to(parent, {f"trials_{k.lower()}": v for k, v in states.items()})
    if complete:
        best = study.best_trial
        summary.update({"best_trial": best.number, "best_value": best.value,
                        "best_run_id": best.user_attrs.get(RUN_ATTR), "best_params": best.params,
                        "best_model_uri": best.user_attrs.get("model_uri")})
        tracking.set_tags(parent, {"best_trial_number": best.number, "best_run_id": summary["best_run_id"]})
        tracking.log_metrics_to(parent, {"best_value": best.value, "best_trial_number": best.number})
        import matplotlib

        matplotlib.use("Agg")
        from optuna.visualization import matplotlib as ovm

        for name, fn in (("optimization_history.png", ovm.plot_optimization_history),
                         ("param_importances.png", ovm.plot_param_importances),
                         ("parallel_coordinate.png", ovm.plot_parallel_coordinate)):
            try:
                ax = fn(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                tracking.log_figure_to(parent, fig, name)
            except Exception as exc:  # noqa: BLE001 - e.g. importances need >= 2 complete trials
                summary.setdefault("plots_skipped", {})[name] = str(exc)[:200]
    return summary


def run_study(plan: StudyPlan, ctx, experiment: str, create_only: bool = False) -> dict:
    """Create or continue the study and run up to ``n_trials`` more trials in this worker."""
    from brainseg import tracking

    study = open_plan_study(plan)
    parent = ensure_parent(study, plan, experiment, ctx.version)
    if create_only:
        return {"study": plan.study_name, "parent_run_id": parent, "created": True,
                "trials": len(study.trials)}
    mlflow_exp = tracking.client().get_run(parent).info.experiment_id
    import mlflow

    mlflow.set_experiment(experiment_id=mlflow_exp)
    status = "FINISHED"
    try:
        study.optimize(objective_for(plan, ctx, parent), n_trials=plan.n_trials, timeout=plan.timeout,
                       catch=(ValueError, RuntimeError, MemoryError), gc_after_trial=True)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        summary = summarize_study(study, parent)
        tracking.set_tags(parent, {"state": status})
        tracking.terminate(parent, status)
    return summary
