"""The study as MLflow runs: the parent run, one child run per trial, progress, dead workers, plots.

The parent run is the study's (its id is a study user attribute, so every worker and every resume
attaches its trials to that one run and never to an older study's). Under ``mlflow run`` the
project run is claimed: used as the study's parent when it is in the ``brainseg`` experiment,
else (``mlflow run`` without ``--experiment-name`` puts it in Default) its tags and params move to
a new run in ``brainseg`` and the original is ended with a note pointing at it. A resumed study's session claims it
as a child of the study's parent.
"""

from __future__ import annotations

import copy
import math
import os
import socket
import time
from pathlib import Path

import optuna
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bar

from brainseg.tracking import mlflow_runs, run_context
from brainseg.tracking.mlflow_runs import claim_project_run
from brainseg.tracking.run_notes import NOTE_TAG
from brainseg.tune.outage import wait_for_database
from brainseg.tune.plan import OBJECTIVE, StudyPlan, make_storage, redact
from brainseg.tune.space import trial_config

PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
HOST_ATTR, PID_ATTR, START_ATTR = "worker_host", "worker_pid", "worker_started"
RETRY_ATTR = "retry_of_trial"  # a retried trial's user attribute and its MLflow run's tag


# ------------------------------------------------------------------------- dead workers
def process_started(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux /proc), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, started: str | None = None) -> bool:
    """True if ``pid`` runs (and, when ``started`` is given, is the same process, not a reused pid)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if started is not None:
        now = process_started(int(pid))
        return now is None or now == started
    return True


def mark_worker(trial: optuna.Trial) -> None:
    """Record which process runs ``trial`` (host, pid, process start time)."""
    trial.set_user_attr(HOST_ATTR, socket.gethostname())
    trial.set_user_attr(PID_ATTR, os.getpid())
    started = process_started(os.getpid())
    if started is not None:
        trial.set_user_attr(START_ATTR, started)


def fail_trial_run(trial: optuna.trial.FrozenTrial, why: str) -> None:
    run_id = trial.user_attrs.get(RUN_ATTR)
    if run_id:
        mlflow_runs.set_tags(run_id, {"state": "FAIL", "failure": why})
        mlflow_runs.terminate(run_id, "FAILED")


def retry_once(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a dead trial again (WAITING, same parameters), once: Optuna's retry callback, which
    records ``failed_trial`` and ``retry_history`` in the new trial's system attributes. The new
    trial's ``retry_of_trial`` user attribute (and its MLflow run's tag) names the dead one."""
    trial = copy.deepcopy(trial)
    trial.user_attrs.pop(RUN_ATTR, None)  # the retry gets its own run
    trial.user_attrs.setdefault(RETRY_ATTR, trial.number)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)


def reap_dead_predecessors(study: optuna.Study) -> list[int]:
    """Mark FAIL the RUNNING trials of dead workers of this host (process gone), at once rather than
    after the heartbeat grace; their MLflow runs end FAILED. Returns the trial numbers."""
    host, reaped = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get(PID_ATTR)
        if t.user_attrs.get(HOST_ATTR) != host or pid is None or pid == os.getpid():
            continue
        if process_alive(pid, t.user_attrs.get(START_ATTR)):
            continue
        try:  # Optuna's public ask-and-tell: a trial of another process is told by its number
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # finished meanwhile (its worker, or the heartbeat of another): not ours to end
        fail_trial_run(t, f"worker process {pid} on {host} is gone")
        reaped.append(t.number)
    return reaped


def _fail_stale_run(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Heartbeat callback: a silent worker's trial became FAIL, so its MLflow run ends FAILED too,
    and the trial is retried once."""
    fail_trial_run(trial, "worker stopped (no heartbeat)")
    retry_once(study, trial)


def study_storage(url: str, heartbeat: int):
    """The study's storage: dead trials failed and retried once; a database server that goes away
    for a while (restart) is waited for (:mod:`brainseg.tune.outage`)."""
    return wait_for_database(make_storage(url, heartbeat, on_stale=_fail_stale_run))


# ----------------------------------------------------------------------------- parent run
def parent_params(plan: StudyPlan) -> dict:
    t, f = plan.tune, plan.fidelity
    return {"study.name": plan.study_name, "study.storage": redact(plan.storage_url),
            "study.sampler": "TPESampler, seeded per trial number", "study.sampler_seed": t.sampler_seed,
            "study.pruner": t.pruner, "study.objective": OBJECTIVE,
            "study.resource": f.unit,  # epochs, or seconds of training (a study on a budget)
            "study.size_px": f.size, "study.steps_per_epoch": f.steps_per_epoch,
            "study.min_resource": f.min_resource, "study.max_resource": f.max_resource,
            "study.reduction_factor": f.reduction_factor, "study.rungs": f.rungs(),
            "study.workers": plan.workers, "study.threads": plan.threads,
            "study.recipe": plan.recipe, "study.search_space": plan.space_path.read_text(),
            "profile": plan.settings.profile}


def _usable(run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        return mlflow_runs.client().get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # noqa: BLE001 - missing run (another tracking store)
        return False


def ensure_parent(study: optuna.Study, plan: StudyPlan, experiment: str, version: str,
                  claim: bool = True) -> tuple[str, str | None]:
    """The study's parent run (created once per study) and this session's claimed project run, if
    it is another run that this process must end (a resumed study under ``mlflow run``)."""
    project = (os.environ.get(run_context.PROJECT_ENV) if claim and not os.environ.get(run_context.PIPELINE_ENV)
               else None)
    parent = study.user_attrs.get(PARENT_ATTR)
    tags = {**run_context.lineage_tags(version, plan.settings.profile), "optuna.study": plan.study_name,
            "brainseg.role": "study", "state": "RUNNING"}
    if _usable(parent):
        mlflow_runs.set_tags(parent, {"state": "RUNNING"})
        if claim and mlflow_runs.run_status(parent) != "RUNNING":
            mlflow_runs.client().update_run(parent, status="RUNNING")  # resumed: running again
        if project and project != parent:
            note = (f"Session resuming Optuna study {plan.study_name}: its trials are children of the "
                    f"study's run {parent}.")
            session, moved = claim_project_run(project, experiment, f"resume-{plan.study_name}",
                                               {**tags, "brainseg.role": "tune-session", "mlflow.parentRunId": parent,
                                                NOTE_TAG: note}, {})
            return parent, session if moved else None
        return parent, None
    if project:
        parent, _ = claim_project_run(project, experiment, f"study-{plan.study_name}", tags, parent_params(plan))
    else:
        parent = mlflow_runs.create_parent_run(experiment, f"study-{plan.study_name}", tags, parent_params(plan))
    study.set_user_attr(PARENT_ATTR, parent)
    return parent, None


# ----------------------------------------------------------------------------------- trials
def trial_callbacks(trial: optuna.Trial, unit: str = "epochs", deadline: float | None = None) -> list:
    """Keras callbacks: link the trial to its MLflow run; report ``val_patient_dice`` after each
    epoch, the step being the pruner's resource (epochs trained, or seconds of training of a trial
    on a budget); prune. ``deadline`` (Unix seconds): the end of the search; a trial still training
    then is stopped and pruned (its value so far is kept, it is never taken as the best)."""
    import tf_keras as keras

    def prune(why: str, step: int):
        mlflow_runs.set_active_tags({"state": "PRUNED", "pruned_by": why})
        mlflow_runs.log_active_metrics({"pruned_after_epochs" if unit == "epochs" else "pruned_after_s": step})
        raise optuna.TrialPruned(f"{why} after {step} {unit}")

    class TrialReport(keras.callbacks.Callback):
        step = 0  # kept across the fit calls of one training (progressive resizing runs two)

        def on_train_begin(self, logs=None):
            trial.set_user_attr(RUN_ATTR, mlflow_runs.active_run_id())

        def on_train_batch_end(self, batch, logs=None):
            if deadline is not None and time.time() >= deadline:
                prune("search deadline", self.step)

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            value = logs.get(OBJECTIVE)
            # every report reaches the pruner: two epochs ending in the same whole second (a short trial)
            # would share a step, and Optuna ignores a value reported at a step already reported
            seconds = int(round(60 * float(logs.get("elapsed_min", 0.0))))
            self.step = epoch + 1 if unit == "epochs" else max(self.step + 1, seconds)
            if value is None or math.isnan(float(value)):
                return
            trial.report(float(value), self.step)
            if trial.should_prune():
                prune("successive halving", self.step)

    return [TrialReport()]


def objective_for(plan: StudyPlan, ctx, parent: str, progress: Progress | None = None, clock=None):
    """The objective: train one trial as a child run of ``parent``; ``progress`` shows its epochs;
    ``clock`` (a study on a budget): its ``search_end`` stops a trial still running then."""
    from brainseg.training.training_run import tracked_training

    fid = plan.fidelity
    base = fid.trial_settings(plan.settings.train.model_dump())
    # a trial is scored by its best epoch's val_patient_dice; choosing post-processing is the refit's
    settings = plan.settings.with_changes(evaluate={"select_postprocessing": False})
    fidelity = (f"{fid.size}px, {fid.max_resource / 60:.1f} min budget" if fid.unit == "seconds"
                else f"{fid.size}px, <= {fid.max_resource} epochs")

    def objective(trial: optuna.Trial) -> float:
        mark_worker(trial)
        cfg = trial_config(trial, base, plan.space)
        tags = {"mlflow.parentRunId": parent, "optuna.study": plan.study_name, "optuna.trial": str(trial.number),
                "brainseg.role": "trial", "fidelity": fidelity}
        tags.update({k: str(trial.user_attrs[k]) for k in ("recipe", RETRY_ATTR) if k in trial.user_attrs})
        shown = [progress.epochs(trial.number, cfg.epochs)] if progress is not None else []
        report = trial_callbacks(trial, fid.unit, clock.search_end if clock is not None else None)
        try:
            res = tracked_training(settings, cfg, ctx, run_name=f"trial-{trial.number:03d}",
                                   callbacks=[*shown, *report], tags=tags, verbose=0,
                                   finished_on=(optuna.TrialPruned,))
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            fail_trial_run(trial, f"{type(exc).__name__}: {exc}"[:500])
            raise
        mlflow_runs.set_tags(res["run_id"], {"state": "COMPLETE"})
        trial.set_user_attr("model_uri", res["model_uri"])
        trial.set_user_attr("best_epoch", int(res["best_epoch"]))
        return res["val_patient_dice"]

    return objective


class Progress:
    """Optuna callback: trial k of n, best so far, pruned count; progress metrics on the parent run.

    ``mode`` ``lines`` (output not a terminal, or a worker process): one ``echo`` line per finished
    trial and :meth:`epochs` gives one line per epoch prefixed with the trial number. ``bar`` (a
    terminal): a rich display (trials done of n, best, pruned; the current trial's epochs and steps)
    with the finished trials' lines printed above it. ``parent`` None: nothing logged to MLflow.
    """

    def __init__(self, parent: str | None, n_trials: int, start_count: int, echo=print, mode: str = "lines",
                 console=None, clock=None):
        self.parent, self.n, self.start, self.echo, self.clock = parent, n_trials, start_count, echo, clock
        if clock is not None:
            self.n = None  # on a budget the clock, not a count, ends the search
        self.bar = self.task = None
        if mode == "bar":
            self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=console or Console())
            self.task = self.bar.add_task("trials", total=self.n, last="best - | pruned 0")
            self.bar.start()

    def epochs(self, trial: int, epochs: int):
        """The Keras callback showing trial ``trial``'s epochs (lines or rows of the display)."""
        from brainseg.training.progress_callbacks import epoch_progress

        if self.bar is not None:
            return epoch_progress(epochs, "bar", label=f"trial #{trial}", bar=self.bar)
        return epoch_progress(epochs, "lines", write=self.echo, label=f"trial #{trial}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state.is_finished()]
        pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in done)
        values = [(t.value, t.number) for t in done if t.state == optuna.trial.TrialState.COMPLETE]
        best = max(values) if values else None
        k = len(done) - self.start
        if trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values:
            step = max(trial.intermediate_values)
            value = (f"{trial.intermediate_values[step]:.4f} after "
                     + (f"{step} s" if self.clock is not None else f"epoch {step}"))
        else:
            value = f"{trial.value:.4f}" if trial.value is not None else "-"
        status = "best " + (f"{best[0]:.4f} (#{best[1]})" if best else "-") + f" | pruned {pruned}"
        if self.clock is not None:
            status += f" | {max(self.clock.left(self.clock.search_end), 0) / 60:.1f} min of search left"
        of = f" of {self.n}" if self.n else ""
        line = f"trial {k}{of} (#{trial.number}) {trial.state.name.lower()}: {value} | {status}"
        if self.bar is None:
            self.echo(line)
        else:
            for task in self.bar.task_ids[1:]:  # the finished trial's epoch rows
                self.bar.remove_task(task)
            self.bar.update(self.task, completed=k, last=status)
            self.bar.console.print(line)
        if self.parent:
            self.log(len(done), pruned, best)

    def log(self, finished: int, pruned: int, best: tuple | None) -> None:
        metrics = {"trials_finished": finished, "trials_pruned": pruned}
        if self.clock is not None:
            metrics["study_minutes_left"] = max(self.clock.left(), 0) / 60
        if best:
            metrics["best_val_patient_dice_so_far"] = best[0]
        try:
            mlflow_runs.log_metrics_to(self.parent, metrics, step=finished)
            left = f", {max(self.clock.left(), 0) / 60:.0f} min of the study left" if self.clock is not None else ""
            mlflow_runs.set_tags(self.parent, {"progress": f"{finished} trials finished, {pruned} pruned, best "
                                                        + (f"{best[0]:.4f} (trial {best[1]})" if best else "-") + left})
        except Exception:  # noqa: BLE001 - progress must never stop the study
            pass
