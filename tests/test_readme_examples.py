"""The examples of the README and docs/ that follow the Quickstart run as written on its data.

The Quickstart (`brainseg run`) generates the synthetic default from params.yaml's `data.synth`
into data/raw/kaggle_3m; every data path the README names must exist there, the curl request it
builds must be accepted by MLflow's scoring server, and its `brainseg predict ... --survival` must
run as written against the two `@champion` models the Quickstart leaves in `sqlite:///mlflow.db`
(here registered directly: a tiny segmenter and a survival model fitted on the Quickstart's data.csv).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from brainseg.data.importer import ensure_dataset
from brainseg.pipeline.run_pipeline import FINAL_WORDS
from helpers import project_files, strict_json

PROJECT = Path(__file__).resolve().parents[1]
# the README and its docs pages: every example in either is checked here
README = "\n".join(p.read_text() for p in [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))])
DATA_PATH = re.compile(r"data/raw/kaggle_3m(?:/[A-Za-z0-9_.]+)*")


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)


def inline_commands(text: str, program: str) -> list[str]:
    return [c for c in re.findall(r"`([^`\n]+)`", text) if c.startswith(program + " ")]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    """A project folder after the Quickstart's data step (what `brainseg run` generates first)."""
    root = project_files(tmp_path_factory.mktemp("quickstart"))
    synth = yaml.safe_load((PROJECT / "params.yaml").read_text())["data"]["synth"]
    ensure_dataset(root / "data/raw/kaggle_3m", synth, use_dvc=False)
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from brainseg.inference.segmenter import InferenceSettings, save_model
    from brainseg.models.factory import build_model
    from brainseg.settings.config import Train

    cfg = Train.from_dict({"arch": "plain_unet", "base_filters": 4, "size": 32})
    return save_model(build_model(cfg), cfg, InferenceSettings(), tmp_path_factory.mktemp("model") / "m")


def test_every_data_path_in_the_readme_exists_after_the_quickstart(quickstart):
    mentioned = set(DATA_PATH.findall(README)) | set(DATA_PATH.findall(FINAL_WORDS))
    assert any(p.endswith(".tif") for p in mentioned), "the README names no slice: update this test"
    missing = sorted(p for p in mentioned if not (quickstart / p).exists())
    assert missing == [], f"README names data that the Quickstart does not create: {missing}"


@pytest.mark.slow
def test_the_curl_example_runs_against_the_served_model(quickstart, tiny_model, tmp_path):
    """The README's block (SLICE=..., printf > request.json, curl) run by bash as written, against
    `mlflow models serve` of the segmenter pyfunc (a tiny untrained network: the format is tested)."""
    import mlflow.pyfunc

    from brainseg.bench.server import serve_model
    from brainseg.serving.pyfunc import MODEL_DIR_ARTIFACT, SegmenterModel

    block = next(b for b in code_blocks(README) if "request.json" in b and "curl" in b)
    assert "http://127.0.0.1:5001/invocations" in block
    mlflow.pyfunc.save_model(tmp_path / "pyfunc", python_model=SegmenterModel(),
                             artifacts={MODEL_DIR_ARTIFACT: str(tiny_model)})
    with serve_model(str(tmp_path / "pyfunc"), f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "serve",
                     timeout_s=300) as server:
        script = block.replace("http://127.0.0.1:5001", server.url)
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=quickstart, capture_output=True,
                              text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    strict_json((quickstart / "request.json").read_text())  # the request the README builds
    answer = strict_json(done.stdout)
    assert "predictions" in answer, done.stdout[:500]
    rows = answer["predictions"]
    assert len(rows) == 1 and "tumor" in rows[0] and "area_px" in rows[0]


@pytest.fixture(scope="module")
def champions(quickstart, tiny_model):
    """The Quickstart's end state that `brainseg predict` needs, in its default store
    (``sqlite:///mlflow.db`` in the project, artifacts in ``./mlruns``): a segmenter and a survival
    model registered as ``@champion`` under params.yaml's ``register`` names. The segmenter is tiny
    and untrained and the survival model a logistic regression on the Quickstart's data.csv (what
    `brainseg run` trains is tested in test_pipeline); the example's command is run as written."""
    import os

    import mlflow

    from brainseg.bench.server import experiment_in, register_champion
    from brainseg.data.clinical import CLINICAL_COLUMNS, TARGET, read_clinical
    from brainseg.outcome import model, pyfunc
    from brainseg.outcome.validate import build_spec
    from conftest import Tracking

    names = yaml.safe_load((PROJECT / "params.yaml").read_text())["register"]
    clinical = read_clinical(quickstart / "data/raw/kaggle_3m/data.csv")
    columns = [c for c in CLINICAL_COLUMNS if c in clinical.columns]
    X, y = clinical[columns].astype(float), clinical[TARGET].astype(int)
    old = os.getcwd()
    os.chdir(quickstart)
    try:
        with Tracking(quickstart / "mlflow.db"):
            champion_uri = register_champion(tiny_model, None, quickstart / "mlruns")
            assert names["segmenter_name"] == champion_uri.split("/")[1].split("@")[0]
            experiment_in("survival", quickstart / "mlruns")
            pipe = model.make_pipeline("logreg", columns, inner_folds=3).fit(X, y)
            evidence = {"cv_roc_auc": 0.5, "cv_n_patients": len(X), "data_version": "quickstart",
                        "fitted_on": "synthetic", "features_from": "truth"}
            _, uri = pyfunc.log_final_model(pipe, X, build_spec(X, columns), evidence)
            version = mlflow.register_model(uri, names["survival_name"]).version
            mlflow.MlflowClient().set_registered_model_alias(names["survival_name"], "champion", version)
    finally:
        os.chdir(old)
    return quickstart


def test_the_predict_example_runs_as_written_twice_without_reading_its_outputs(champions, monkeypatch):
    from brainseg.cli import app
    from conftest import Tracking

    command = next(c for c in inline_commands(README, "brainseg predict") if "kaggle_3m/" in c)
    args = shlex.split(command)[1:]
    folder = champions / args[1]
    assert folder.is_dir(), f"{args[1]} (named in the README) does not exist after the Quickstart"
    monkeypatch.chdir(champions)
    n_slices = len([p for p in folder.glob("*.tif") if not p.stem.endswith("_mask")])
    out_at = args.index("--out") + 1
    with Tracking(champions / "mlflow.db"):  # MLflow's default store of the Quickstart
        for out in (args[out_at], str(Path(args[1]) / "predictions")):  # as written, then --out inside it
            run = [*args[:out_at], out, *args[out_at + 1:]]
            for _ in range(2):
                result = CliRunner().invoke(app, run, catch_exceptions=False)
                assert result.exit_code == 0, result.output
                assert f"{n_slices} slices, 1 patients" in " ".join(result.output.split())
            assert len(list(Path(out).glob("*_pred.png"))) == n_slices
            patients = pd.read_csv(Path(out) / "patients.csv")
            assert patients["status"].tolist() == ["ok"] and patients["death01_probability"].between(0, 1).all()
