"""The service as users meet it: ``python -m lib.serve`` as a real process on loopback, real uploads over HTTP,
and the upload page driven by headless Chromium (Selenium + Debian's chromium/chromium-driver)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.conftest import shared
from tests.test_serve import build_export

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """``python -m lib.serve --model <export>`` on a free loopback port (default host), stopped afterwards."""
    import httpx

    export_dir = build_export(tmp_path_factory.mktemp("export"))
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    port = _free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lib.serve", "--model", str(export_dir), "--port", str(port),
                                 "--max-upload-mb", "2"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {log_path.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not start within 90 s")
            time.sleep(0.3)
        yield url, log_path, export_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_real_server_scores_real_uploads(live_server: tuple[str, Path, Path]) -> None:
    import httpx

    url, log_path, _ = live_server
    assert httpx.get(url + "/health", timeout=5).json()["model_loaded"] is True
    ct = shared("dicom-samples", "pydicom", "CT_small.dcm")
    r = httpx.post(url + "/predict", files={"file": ("Doe^Jane.dcm", ct.read_bytes())}, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["input"] == {"type": "dicom", "shape": [128, 128], "modality": "CT"}
    assert set(out["probabilities"]) == {"no", "yes"} and abs(sum(out["probabilities"].values()) - 1) < 1e-5
    png = shared("brain-mri-tumor", "no", "No15.jpg")  # a PNG named .jpg: typed by content
    r = httpx.post(url + "/predict/label", files={"file": (png.name, png.read_bytes())}, timeout=30)
    assert r.status_code == 200 and set(r.json()) == {"label", "probability"}
    test = httpx.get(url + "/predict/test", timeout=30).json()
    assert all(abs(test["probabilities"][k] - v) <= 1e-4 for k, v in test["expected"].items())
    health = httpx.get(url + "/health", timeout=5).json()
    assert health["requests"] >= 2 and health["torch_imported"] is False  # ONNX Runtime only, even after scoring
    # size cap over a real socket: 3 MB against a 2 MB cap
    r = httpx.post(url + "/predict", files={"file": ("big.png", png.read_bytes() + bytes(3 << 20))}, timeout=30)
    assert r.status_code == 413
    r = httpx.post(url + "/predict", files={"file": ("x.png", b"GIF89a not supported" * 10)}, timeout=30)
    assert r.status_code == 415
    time.sleep(0.5)  # let the log flush
    log = log_path.read_text(errors="replace")
    assert f"Uvicorn running on {url}" in log, log[-1000:]  # bound to loopback by default
    patient = pydicom.dcmread(ct, stop_before_pixels=True)
    assert "scored dicom" in log
    for secret in ("Doe^Jane", str(patient.PatientName), str(patient.PatientID)):
        assert secret not in log


def _chromium() -> tuple[str, str]:
    """Debian's chromium + chromedriver: skip locally when absent (with the install command), fail in CI."""
    browser = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(browser).exists() and Path(driver).exists()):
        msg = ("headless browser test needs Debian packages chromium + chromium-driver "
               "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return browser, driver


def test_upload_page_in_headless_chromium(live_server: tuple[str, Path, Path], tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, _ = live_server
    browser, driver_path = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        drv.get(url + "/")
        WebDriverWait(drv, 30).until(lambda d: d.find_element(By.ID, "model").text.startswith("resnet10t"))
        drv.find_element(By.ID, "file").send_keys(str(shared("dicom-samples", "pydicom", "CT_small.dcm")))
        drv.find_element(By.ID, "submit").click()
        WebDriverWait(drv, 30).until(ec.visibility_of_element_located((By.ID, "result")))
        rows = drv.find_elements(By.CSS_SELECTOR, "#result tr.prob")
        labels = {r.find_elements(By.TAG_NAME, "td")[0].text for r in rows}
        probs = [float(r.find_elements(By.TAG_NAME, "td")[1].text) for r in rows]
        assert labels == {"no", "yes"} and abs(sum(probs) - 1) < 1e-3
        assert drv.find_element(By.ID, "status").text.startswith("Top label:")
        bad = tmp_path / "notes.png"  # a bad file shows the service's error message, not a crash
        bad.write_text("not an image " * 20)
        drv.find_element(By.ID, "file").send_keys(str(bad))
        drv.find_element(By.ID, "submit").click()
        WebDriverWait(drv, 30).until(lambda d: d.find_element(By.ID, "status").text.startswith("Error 415"))
        assert drv.find_element(By.ID, "result").get_attribute("hidden") is not None
    finally:
        drv.quit()


def test_load_script_against_real_server(live_server: tuple[str, Path, Path], tmp_path: Path) -> None:
    """scripts/load_test.py stays runnable: a few bounded requests against the running server (no timing floor)."""
    url, _, export_dir = live_server
    out = tmp_path / "load.json"
    sample = shared("brain-mri-tumor", "yes", "Y1.jpg")
    cmd = [sys.executable, "scripts/load_test.py", "--model", str(export_dir), "--url", url, "--file", str(sample),
           "--clients", "2", "--requests", "6", "--seconds", "60", "--skip-latency", "--json", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=180, capture_output=True)
    res = json.loads(out.read_text())["load"]
    assert res["requests_ok"] == 6 and res["statuses"] == {"200": 6} and res["p50_ms"] <= res["p99_ms"]
