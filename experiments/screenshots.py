"""Screenshots of the MLflow UI as a researcher first sees it, made by headless Chromium (not by hand).

    python experiments/screenshots.py [STORE] [OUT_DIR]      # default: sqlite:///mlflow.db, docs/img
    python experiments/screenshots.py overlays [STORE] [OUT_DIR]

Starts `mlflow server` on the store (127.0.0.1, a free port), opens the link `brainseg run`,
`train` and `tune` print (the `brainseg` experiment in the model-training workflow) and, when the
store holds a study, the study's run; writes `mlflow-runs.png` and `mlflow-study.png`. `overlays`
copies the validation overlays a run logged (`val_overlays.png`: the best trial's of the newest
study, else the newest training run's) to `overlays.png`, with the run it came from. Needs the
Debian packages `chromium` and `chromium-driver` (CI installs them) and `selenium` (the test extra).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow

from brainseg.tracking import run_notes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and proc.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2).read(1)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"mlflow server did not answer on {url}")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000"):
        options.add_argument(arg)
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def shoot(driver, url: str, path: Path, settle_s: float = 8.0) -> None:
    driver.get(url)
    time.sleep(settle_s)  # the UI renders after its API calls
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    print(f"{path}: {url}")


def main(store: str = "sqlite:///mlflow.db", out_dir: str = "docs/img") -> None:
    mlflow.set_tracking_uri(store)
    exp = mlflow.MlflowClient().get_experiment_by_name("brainseg")
    if exp is None:
        raise SystemExit(f"{store}: no `brainseg` experiment (run `brainseg run` first)")
    port = free_port()
    root = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    driver = None
    try:
        wait_for(root + "/health", server)
        driver = browser()
        shoot(driver, run_notes.ui_link(exp.experiment_id, root), Path(out_dir) / "mlflow-runs.png")
        studies = mlflow.MlflowClient().search_runs([exp.experiment_id], "tags.`brainseg.role` = 'study'",
                                                    order_by=["attributes.start_time DESC"], max_results=1)
        if studies:
            run = studies[0].info.run_id
            shoot(driver, f"{root}/#/experiments/{exp.experiment_id}/runs/{run}?workflowType=machine_learning",
                  Path(out_dir) / "mlflow-study.png")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)


def overlays(store: str = "sqlite:///mlflow.db", out_dir: str = "docs/img") -> None:
    import tempfile

    client = mlflow.MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("brainseg")
    if exp is None:
        raise SystemExit(f"{store}: no `brainseg` experiment")
    studies = client.search_runs([exp.experiment_id], "tags.`brainseg.role` = 'study'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    where = f"tags.`mlflow.parentRunId` = '{studies[0].info.run_id}'" if studies else ""
    runs = client.search_runs([exp.experiment_id], where, order_by=["metrics.best_val_patient_dice DESC"],
                              max_results=50)
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            if not any(a.path == "val_overlays.png" for a in client.list_artifacts(run.info.run_id)):
                continue
            path = client.download_artifacts(run.info.run_id, "val_overlays.png", tmp)
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(out_dir) / "overlays.png")
            print(f"{Path(out_dir) / 'overlays.png'}: val_overlays.png of run {run.info.run_id} "
                  f"({run.info.run_name})")
            return
    raise SystemExit(f"{store}: no run with val_overlays.png")


if __name__ == "__main__":
    if sys.argv[1:2] == ["overlays"]:
        overlays(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
