"""The ``brainseg`` command line: each command loads settings, calls one function, reports.

One module per noun: :mod:`~brainseg.cli.data` (``data ...``, ``profile use``),
:mod:`~brainseg.cli.segment` (train, evaluate, tune, predict, register, promote),
:mod:`~brainseg.cli.outcome` (features, survival), :mod:`~brainseg.cli.serve` (run, app, bench);
:mod:`~brainseg.cli.common` holds what they share. The commands are registered here, in the order
``brainseg --help`` lists them.
"""

from __future__ import annotations

import brainseg.settings.keras_env  # noqa: F401  (first: Keras variables before anything imports TF)

import signal
import sys
from typing import Annotated

import typer
from rich.markup import escape

from brainseg.cli import data, outcome, segment, serve, training
from brainseg.cli.common import console, quiet_libraries
from brainseg.tracking.access import refusal_message, refused_status
from brainseg.tracking.run_context import Terminated, adopt_project_run

# brainseg.tracking.mlflow_runs (MLflow) is deferred into main(), after the libraries are quieted.

app = typer.Typer(help="LGG FLAIR-abnormality segmentation and outcome prediction, tracked in MLflow.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Dataset: synthesize, validate, import, manifest, split, export.", no_args_is_help=True)
app.add_typer(data_app, name="data")
profile_app = typer.Typer(help="Budget profiles (experiments/profiles.yaml), written into params.yaml.",
                          no_args_is_help=True)
app.add_typer(profile_app, name="profile")

data_app.command("synth")(data.data_synth)
data_app.command("validate")(data.data_validate)
data_app.command("import")(data.data_import)
data_app.command("manifest")(data.data_manifest)
data_app.command("split")(data.data_split)
data_app.command("prepare")(data.data_prepare)
data_app.command("export")(data.data_export)
profile_app.command("use")(data.profile_use)

app.command("train")(training.train_command)
app.command()(training.checkpoints)
app.command()(training.cv)
app.command()(segment.evaluate)
app.command()(segment.tune)
app.command()(outcome.features)
app.command()(outcome.survival)
app.command()(segment.register)
app.command()(segment.predict)
app.command()(segment.promote)
app.command("run")(serve.run_pipeline)
app.command("app")(serve.app_page)
app.command()(serve.bench)


@app.callback()
def root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the libraries' own start-up "
                                               "logs and warnings (TensorFlow, absl, MLflow); also "
                                               "BRAINSEG_VERBOSE=1.")] = False):
    """LGG FLAIR-abnormality segmentation and outcome prediction, tracked in MLflow."""
    quiet_libraries(verbose)


def main():  # console-script entry with a clean exit for Ctrl-C
    quiet_libraries(bool({"--verbose", "-v"} & set(sys.argv[1:2])))  # before MLflow and TF load


    def terminated(signum, frame):  # SIGTERM (a scheduler, `kill`): end runs KILLED, not RUNNING forever
        raise Terminated()

    signal.signal(signal.SIGTERM, terminated)
    adopt_project_run()
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except Terminated:
        console.print("terminated (SIGTERM)")
        sys.exit(143)
    except Exception as exc:  # the tracking server refused us (401/403): what to set, not a traceback
        status = refused_status(exc)
        if status is None:
            raise
        console.print(f"[bold red]error:[/] {escape(refusal_message(status))}")
        sys.exit(2)


__all__ = ["app", "main"]
