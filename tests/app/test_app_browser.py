"""End to end in headless Chromium: start ``streamlit run`` on the page, upload a real slice, find the
features table, save a screenshot (``docs/app_screenshot.png`` with ``BRAINSEG_SCREENSHOT=1``).

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the ``selenium`` package. The
segmenter is a tiny untrained U-Net built here (its masks are noise) with a model card beside it; set
``BRAINSEG_APP_TEST_MODEL`` to a model folder or URI (e.g. the champion) for a meaningful screenshot.
The test checks that the page shows units, provenance and the model card's validation figure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from brainseg.app import launch
from brainseg.data import imageio
from brainseg.data.layout import SLICE_RE
from helpers import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1700"]
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "app_screenshot.png"
WAIT_S = 240  # the page's process imports TensorFlow and loads the model on first use

HAVE_BROWSER = Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()
if not HAVE_BROWSER and os.environ.get("BRAINSEG_REQUIRE_BROWSER"):  # CI installs it: a skip would hide a gap
    raise RuntimeError("headless Chromium is required here (BRAINSEG_REQUIRE_BROWSER=1) but not installed")

pytestmark = [
    pytest.mark.real,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not HAVE_BROWSER,
                       reason="headless Chromium not installed (apt-get install -y chromium chromium-driver)"),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")


def largest_tumor_slice(root: Path) -> tuple[Path, Path]:
    """(slice, mask) of the sample slice with the most tumor pixels (a fixed choice, no randomness)."""
    best = (-1, None, None)
    for mask_path in sorted(root.glob("*/*_mask.tif")):
        area = int(imageio.read_mask(mask_path).sum())
        if area > best[0]:
            m = SLICE_RE.match(mask_path.name)
            best = (area, mask_path.with_name(f"{m['stem']}_{m['n']}.tif"), mask_path)
    return best[1], best[2]


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory) -> str:
    """``BRAINSEG_APP_TEST_MODEL``, else a tiny untrained model with a model card beside it."""
    if os.environ.get("BRAINSEG_APP_TEST_MODEL"):
        return os.environ["BRAINSEG_APP_TEST_MODEL"]
    import json

    from brainseg.inference.segmenter import InferenceSettings, save_model
    from brainseg.models.factory import build_model
    from brainseg.registry import modelcard
    from brainseg.settings.config import Train

    cfg = Train.from_dict({"arch": "plain_unet", "base_filters": 4, "size": 64})
    folder = save_model(build_model(cfg), cfg, InferenceSettings(), tmp_path_factory.mktemp("tiny-model"))
    facts = {"data": {"version": "0123456789abcdef", "synthetic": True}, "recipe": {"size": 64},
             "val": {"patient_dice_mean": 0.4321, "n_patients": 3}}
    (folder / modelcard.FACTS_FILE).write_text(json.dumps(facts))
    return str(folder)


@pytest.fixture
def page_url(model_uri, tmp_path):
    port = free_port()
    argv, env = launch.command(port=port, model_uri=model_uri, survival_uri=None)
    log = (tmp_path / "streamlit.log").open("w")
    server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start:\n{(tmp_path / 'streamlit.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="brainseg-chromium-")
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_upload_a_real_slice_and_see_the_features_table(real_sample, model_uri, page_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image, mask = largest_tumor_slice(real_sample)
    wait = WebDriverWait(browser, WAIT_S)
    browser.get(page_url)
    picker = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type='file']")))
    picker.send_keys(f"{image}\n{mask}")
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "[data-testid='stDataFrame']")))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "[data-testid='stImage'] img")) >= 3)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Features per slice" in body
    assert image.name in body and "Dice" in body
    assert "Lengths and areas are in pixels (px)" in body  # units
    from brainseg.app import logic

    provenance = logic.model_provenance(model_uri)
    assert logic.provenance_line(provenance) in body  # which model, which data version
    card = [text for _, text in logic.card_lines(provenance)]
    assert any(text.startswith("Validation per-patient volume Dice") for text in card)
    for text in card:  # real or synthetic, the card's validation figure, the smoke-model note
        assert text in body, text
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid='stException']")
    time.sleep(1.0)  # let the images and the table finish painting
    shot = SCREENSHOT if os.environ.get("BRAINSEG_SCREENSHOT") == "1" else tmp_path / "app_screenshot.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
