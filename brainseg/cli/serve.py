"""Running things: the whole pipeline, the web page, the benchmark."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Annotated, Optional

import typer

from brainseg.cli.common import EXPERIMENT, ProfileOpt, fail, out
from brainseg.settings.settings_io import ConfigError
from brainseg.tracking import run_notes

# brainseg.pipeline.run_pipeline (MLflow), brainseg.app.launch (pandas, Streamlit) and brainseg.bench
# (numpy and the benchmark) are deferred into the commands, so `brainseg --help` stays fast.


def run_pipeline(profile: ProfileOpt = None,
                 dvc: Annotated[bool, typer.Option(help="Run through `dvc repro` (only changed stages re-run); "
                                                   "without it the stages of dvc.yaml run in order.")] = True,
                 promote: Annotated[bool, typer.Option(help="After the pipeline, put the versions it registered "
                                                       "through the promotion gate.")] = True):
    """The whole pipeline (validate, manifest, split, tune, test report, features, survival, register),
    then the promotion gate for the registered versions.

    With no dataset imported it generates the synthetic default first. `--profile cpu` copies the
    cpu profile's values into params.yaml (`brainseg profile use cpu`; DVC then re-runs what they
    change). `dvc repro` / `dvc exp run` alone never move `@champion` (register.promote: false).
    """
    from brainseg.pipeline.run_pipeline import final_words, run_all_stages

    try:
        run_all_stages(profile, use_dvc=dvc, promote=promote, echo=out.print)
    except ConfigError as exc:
        fail(str(exc), 2)
    except subprocess.CalledProcessError as exc:
        fail(f"pipeline stage failed: {' '.join(map(str, exc.cmd))} (exit {exc.returncode})", exc.returncode or 1)
    out.print(final_words(), markup=False, highlight=False)
    from brainseg.tracking import mlflow_runs

    link = run_notes.ui_link(mlflow_runs.set_experiment(EXPERIMENT).experiment_id)
    out.print(f"The pipeline's runs in the MLflow UI (after `mlflow ui` above): {link}", markup=False, highlight=False)


def app_page(host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
             port: int = 8501,
             endpoint: Annotated[Optional[str], typer.Option(help="URL of a `mlflow models serve` endpoint of the "
                                                             "segmenter; without it the model runs in-process.")]
             = None,
             model: Annotated[str, typer.Option(help="Folder/.h5, runs:/ID/model or models:/NAME@ALIAS.")]
             = "models:/brainseg-segmenter@champion",
             survival_model: Annotated[Optional[str], typer.Option("--survival-model",
                                                                   help="Empty: no survival model.")]
             = "models:/brainseg-survival@champion",
             headless: bool = True):
    """Web page for clinicians: upload slices or a patient zip, see the tumor, its features and the survival model."""
    from brainseg.app.launch import launch

    raise typer.Exit(launch(host=host, port=port, endpoint=endpoint, model_uri=model,
                            survival_uri=survival_model or None, headless=headless))


def bench(profile: Annotated[str, typer.Option(help="Model settings from this profile.")] = "cpu",
          arch: Optional[str] = None, encoder: Optional[str] = None, size: Optional[int] = None,
          channels: Optional[str] = None, train_batch: Optional[int] = None,
          train_steps: int = 8, batch_size: Annotated[Optional[list[int]], typer.Option("--batch-size")] = None,
          repeats: Annotated[int, typer.Option(help="Interleaved rounds at batch 1.")] = 200,
          batch_repeats: Annotated[int, typer.Option(help="Interleaved rounds at larger batches.")] = 20,
          load_seconds: float = 20.0, clients: int = 4,
          training: Annotated[bool, typer.Option(help="Measure training throughput (needed without --model).")] = True,
          tuning: Annotated[bool, typer.Option(help="Also compare a small study with and without pruning.")] = True,
          trials: int = 4, tuning_epochs: int = 4,
          model: Annotated[Optional[str], typer.Option(help="Measure this model (folder, runs:/, models:/ in the "
                                                            "tracking store) instead of a fresh one.")] = None,
          output: Annotated[Path, typer.Option("--out")] = Path("reports/bench.json")):
    """Training pipeline vs in-memory, inference (network, Segmenter, pyfunc, REST), load, memory, pruning."""
    from brainseg.bench import run_bench

    try:
        run_bench(profile=profile, arch=arch, encoder=encoder, size=size, channels=channels,
                  train_batch=train_batch, train_steps=train_steps, batch_sizes=batch_size or [1, 32],
                  repeats=repeats, batch_repeats=batch_repeats, load_seconds=load_seconds, clients=clients,
                  training=training, tuning=tuning, trials=trials, tuning_epochs=tuning_epochs, model=model,
                  output=output, console=out)
    except (ValueError, ConfigError) as exc:
        fail(str(exc), 2)
    except (RuntimeError, FileNotFoundError) as exc:
        fail(str(exc), 1)
