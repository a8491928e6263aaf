"""One tuning command: the trials (here or in worker processes), the summary and plots, the refit.

``run_study`` is what ``brainseg tune`` calls. With ``tune.workers`` > 1 it creates the study and
its parent run once, then starts that many ``brainseg tune --worker K`` processes on the same
storage (each with ``tune.threads`` TensorFlow threads) and waits for them. After the study, the
best configuration is trained again at full fidelity (the refit), evaluated once on the test
patients for the report (``test_*`` metrics, used in no decision) and, if asked, registered.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import optuna
import optuna.visualization as ov
from optuna.visualization import matplotlib as ovm
from rich.console import Console

from brainseg.tracking import mlflow_runs, run_context
from brainseg.training.progress import choose_mode
from brainseg.tune.clock import PLAN_ATTR, Clock, start_clock, worker_clock
from brainseg.tune.plan import OBJECTIVE, StudyPlan, open_plan_study, quiet_optuna
from brainseg.tune.refit import refit_best
from brainseg.tune.runs import (
    RETRY_ATTR,
    RUN_ATTR,
    Progress,
    ensure_parent,
    objective_for,
    reap_dead_predecessors,
    study_storage,
)


def set_threads(n: int) -> None:
    """TensorFlow intra/inter-op threads of this process (before TensorFlow starts; 0: its default)."""
    if n > 0:
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(n)
        except RuntimeError:  # TensorFlow already initialised: keep its threads
            pass


def worker_command(plan: StudyPlan, k: int, study_trials: int, settings_args: list[str], out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "brainseg", "tune", *settings_args, "--study-name", plan.study_name,
            # env:VAR / file:PATH as given: a password in the URL never goes on a worker's command line
            "--storage", plan.storage_ref or plan.storage_url, "--n-trials", str(plan.n_trials),
            "--timeout", str(plan.timeout),
            "--worker", str(k), "--study-trials", str(study_trials), "--no-refit",
            "--out", str(out_dir / f"worker-{k}.json")]


def launch_workers(plan: StudyPlan, study_trials: int, settings_args: list[str], study: optuna.Study | None = None,
                   wait_s: float = 600.0) -> list[int]:
    """Start ``plan.workers`` worker processes on the (already created) study; their exit codes.

    A new study's hand-set trial waits in the queue: worker 0 starts alone and claims it before the
    others start (on SQLite two workers reading the queue at once could both run it)."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        try:
            for k in range(plan.workers):
                procs.append(subprocess.Popen(worker_command(plan, k, study_trials, settings_args, Path(tmp))))
                if k == 0 and study is not None:
                    wait_for_queue(study, procs[0], wait_s)
            return [p.wait() for p in procs]
        except BaseException:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait()
            raise


def wait_for_queue(study: optuna.Study, proc: subprocess.Popen, wait_s: float) -> None:
    """Until no trial of ``study`` is WAITING (or ``proc`` ended, or ``wait_s`` passed)."""
    end = time.monotonic() + wait_s
    waiting = (optuna.trial.TrialState.WAITING,)
    while (study.get_trials(deepcopy=False, states=waiting) and proc.poll() is None
           and time.monotonic() < end):
        time.sleep(0.5)


def display(echo, is_worker: bool = False) -> tuple[str, object]:
    """How to show progress: (``bar`` or ``lines``, the rich Console behind ``echo`` or None).

    ``bar`` only when that console (else stdout) is a terminal and this is not a worker process
    (workers share the launcher's terminal: lines, each naming its trial).
    """
    console = getattr(echo, "__self__", None)
    console = console if isinstance(console, Console) else None
    if is_worker:
        return "lines", console
    return choose_mode("auto", console.file if console is not None else None), console


def run_study(plan: StudyPlan, ctx, experiment: str, create_only: bool = False, worker: int | None = None,
              study_trials: int | None = None, refit: bool = False, register: bool = False,
              settings_args: list[str] | None = None, echo=print, started: float | None = None) -> dict:
    """Create or continue the study and run ``plan.n_trials`` more trials (all workers together).

    ``worker``: this process is worker K started by a launcher (or by hand): it runs trials only
    (no summary, refit or parent-run ending); K also picks its sampler seed. ``started``: when the
    command started (Unix seconds), from which ``tune.budget_minutes`` counts.
    """
    started = time.time() if started is None else started
    quiet_optuna()
    storage = study_storage(plan.storage_url, int(plan.tune.heartbeat))
    study = open_plan_study(plan, worker or 0, storage)  # seeds per trial number: no pid needed
    clock = None
    if worker is None and not create_only:  # the plan first, so that the study's run records what runs
        set_threads(plan.threads)  # before the probe starts TensorFlow
        clock = start_clock(plan, ctx, study, refit, started, echo)
    parent, session = ensure_parent(study, plan, experiment, ctx.version, claim=worker is None)
    mlflow_runs.use_experiment_of(parent)  # trials and the refit go where the study's run is
    if create_only:
        return {"study": plan.study_name, "parent_run_id": parent, "created": True, "trials": len(study.trials)}
    if worker is not None:
        search(plan, ctx, study, parent, worker_clock(plan, study), study_trials, echo, is_worker=True)
        return {"study": plan.study_name, "parent_run_id": parent, "worker": worker}
    summary, status = None, "FINISHED"
    try:
        if clock is not None:
            mlflow_runs.log_params_to(parent, {"study.budget_minutes": plan.tune.budget_minutes,
                                            **{f"study.plan.{k}": v for k, v in study.user_attrs[PLAN_ATTR].items()}})
        search(plan, ctx, study, parent, clock, None, echo, settings_args=settings_args)
        summary = summarize_study(study, parent)
        if refit and summary.get("best_trial") is not None:
            summary["refit"] = refit_best(plan, ctx, study, parent, register, echo, clock, display(echo))
        if clock is not None:
            summary["minutes"] = (time.time() - started) / 60
            mlflow_runs.log_metrics_to(parent, {"study_minutes": summary["minutes"]})
    except (KeyboardInterrupt, run_context.Terminated):  # Ctrl-C, SIGTERM
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        end_parent(study, parent, session, status, summary)
    return summary


def search(plan: StudyPlan, ctx, study: optuna.Study, parent: str, clock: Clock | None, study_trials: int | None,
           echo=print, is_worker: bool = False, settings_args: list[str] | None = None) -> None:
    """The trials of this process, or of ``plan.workers`` worker processes it starts and waits for."""
    reaped = reap_dead_predecessors(study)
    if reaped:
        echo(f"trial(s) {reaped} of a dead worker on this host marked FAIL")
    trials = study.get_trials(deepcopy=False)
    start = sum(t.state.is_finished() for t in trials)
    # launched workers stop together when the study holds ``study_trials``; others run n_trials each
    target = study_trials or (sum(t.state != optuna.trial.TrialState.WAITING for t in trials) + plan.n_trials)
    if plan.workers > 1 and not is_worker:
        echo(f"study {plan.study_name}: {plan.workers} workers x {plan.threads or 'default'} threads, "
             + (f"until minute {(clock.last_start - clock.started) / 60:.1f}" if clock else f"{plan.n_trials} trials"))
        codes = launch_workers(plan, target, settings_args or [], study)
        if any(codes):
            echo(f"worker exit codes {codes}")
            reaped = reap_dead_predecessors(study)  # a dead worker's trial is not left RUNNING
            if reaped:
                echo(f"trial(s) {reaped} of a dead worker marked FAIL")
        return
    set_threads(plan.threads)
    mode, console = display(echo, is_worker)
    progress = Progress(parent, plan.n_trials, start, echo, mode, console, clock)
    callbacks = [progress]
    if study_trials:
        callbacks.insert(0, stop_at(study_trials))
    # on a budget Optuna's timeout is the last start (checked before each trial); a running trial
    # is stopped at the end of the search by its TrialReport
    timeout = max(clock.last_start - time.time(), 0.001) if clock else plan.timeout
    try:
        study.optimize(objective_for(plan, ctx, parent, progress, clock), n_trials=plan.n_trials, timeout=timeout,
                       catch=(ValueError, RuntimeError, MemoryError), gc_after_trial=True, callbacks=callbacks)
    finally:
        progress.close()


def stop_at(study_trials: int):
    """Optuna callback: stop this worker once the study holds ``study_trials`` trials, the retry of a
    dead trial not counting as one more (it takes the dead trial's place)."""
    def stop(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if sum(RETRY_ATTR not in t.user_attrs for t in study.get_trials(deepcopy=False)) >= study_trials:
            study.stop()

    return stop


def end_parent(study: optuna.Study, parent: str, session: str | None, status: str, summary: dict | None) -> None:
    """The study's run (and a resumed session's run) ends with ``status``; the summary is logged
    even when the study failed (never hiding the error that ended it)."""
    if summary is None:
        try:
            summarize_study(study, parent)
        except Exception:  # noqa: BLE001
            pass
    for run_id in (parent, session):
        if run_id:
            mlflow_runs.set_tags(run_id, {"state": status})
            mlflow_runs.terminate(run_id, status)


# ---------------------------------------------------------------------------------- summary
PNG_PLOTS = ("optimization_history", "intermediate_values", "parallel_coordinate", "param_importances")
HTML_PLOTS = PNG_PLOTS + ("slice", "timeline")


def study_html(study: optuna.Study) -> tuple[str, dict]:
    """Optuna's interactive plotly figures in one offline HTML page (plotly.js inlined once)."""
    parts, skipped = [], {}
    for name in HTML_PLOTS:
        try:
            fig = getattr(ov, f"plot_{name}")(study)
        except Exception as exc:  # noqa: BLE001 - e.g. importances need >= 2 complete trials
            skipped[name] = str(exc)[:200]
            continue
        parts.append(fig.to_html(full_html=False, include_plotlyjs=not parts))
    body = "\n".join(f"<section>{p}</section>" for p in parts)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>study {study.study_name}</title></head>"
            f"<body><h1>Optuna study {study.study_name}</h1>{body}</body></html>"), skipped


def summarize_study(study: optuna.Study, parent: str) -> dict:
    """Best trial tags/metrics, Optuna's plots (PNG and interactive HTML) on the parent run."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    states = {s.name: sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    summary = {"study": study.study_name, "trials": len(trials), "states": states, "parent_run_id": parent,
               "objective": OBJECTIVE}
    mlflow_runs.log_metrics_to(parent, {f"trials_{k.lower()}": v for k, v in states.items()})
    recipe = [t for t in trials if t.user_attrs.get("recipe") and t.value is not None]  # a retry's value
    if recipe and recipe[0].value is not None:
        summary["recipe_trial"], summary["recipe_value"] = recipe[0].number, recipe[0].value
        mlflow_runs.log_metrics_to(parent, {"recipe_val_patient_dice": recipe[0].value})
    if not complete:
        return summary
    best = study.best_trial
    summary.update({"best_trial": best.number, "best_value": best.value,
                    "best_run_id": best.user_attrs.get(RUN_ATTR), "best_params": best.params,
                    "best_model_uri": best.user_attrs.get("model_uri")})
    mlflow_runs.set_tags(parent, {"best_trial_number": best.number, "best_run_id": summary["best_run_id"]})
    mlflow_runs.log_metrics_to(parent, {"best_val_patient_dice": best.value, "best_trial_number": best.number})

    matplotlib.use("Agg")

    for name in PNG_PLOTS:
        try:
            ax = getattr(ovm, f"plot_{name}")(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            mlflow_runs.log_figure_to(parent, fig, f"{name}.png")
        except Exception as exc:  # noqa: BLE001
            summary.setdefault("plots_skipped", {})[f"{name}.png"] = str(exc)[:200]
    html, skipped = study_html(study)
    summary.setdefault("plots_skipped", {}).update({f"{k}.html": v for k, v in skipped.items()})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optuna_study.html"
        path.write_text(html)
        mlflow_runs.client().log_artifact(parent, str(path))
    return summary
