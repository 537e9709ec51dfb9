"""Export (ONNX ensemble, parity) and the HTTP service: every endpoint, bad inputs, a real server, a browser."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from lib import export, imageio, models, serve
from tests.conftest import shared

ROOT = Path(__file__).resolve().parents[1]
SIZE = 48
PREP = {"source": "images", "kind": "2d", "channels": 1, "size": SIZE, "classes": ["no", "yes"]}


def _sample_png(path: Path) -> Path:
    yy, xx = np.mgrid[:80, :96]
    img = (127 + 100 * np.sin(xx / 7.0) * np.cos(yy / 11.0)).astype(np.uint8)
    Image.fromarray(img).save(path, format="PNG")
    return path


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two fold checkpoints (lib.models format) exported as one ONNX ensemble."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("export")
    meta = models.checkpoint_meta("resnet10t", 1, 1, "binary", ["yes"], PREP)
    ckpts = []
    for k in range(2):
        net = models.create_model("resnet10t", in_chans=1, num_classes=1)
        with torch.no_grad():  # non-trivial outputs from random weights: shift the head bias per fold
            net.get_classifier().bias.fill_(0.7 * (k + 1))
        ckpts.append(models.save_checkpoint(root / "kfold" / "m" / f"fold{k}" / "best.pt", net,
                                            {**meta, "metrics": {"auc": 0.5}}))
    out = root / "export" / "m"
    export.export_checkpoints(ckpts, out, sample=_sample_png(root / "sample_src.png"), run_id="test-run",
                              metrics={"oof_auc": 0.5})
    return out


@pytest.fixture(scope="module")
def client(export_dir: Path) -> TestClient:
    return TestClient(serve.create_app(export_dir, max_upload_mb=1))


# ----------------------------------------------------------------------------- export


def test_export_folder_contents(export_dir: Path) -> None:
    assert {p.name for p in export_dir.iterdir()} >= {"model.onnx", "labels.json", "metadata.json", "sample.png"}
    meta = json.loads((export_dir / "metadata.json").read_text())
    assert meta["input"]["shape"] == [None, 1, SIZE, SIZE] and meta["n_models"] == 2
    assert meta["preprocessing"]["size"] == SIZE and meta["run_id"] == "test-run"
    assert meta["label_names"] == ["no", "yes"] and meta["metrics"] == {"oof_auc": 0.5}
    assert meta["parity"]["max_abs_diff"] <= 1e-4
    assert json.loads((export_dir / "labels.json").read_text()) == {"0": "no", "1": "yes"}


def test_onnx_is_mean_of_fold_probabilities_with_dynamic_batch(export_dir: Path) -> None:
    members, meta = export.load_members(sorted((export_dir.parents[1] / "kfold" / "m").glob("fold*/best.pt")))
    x = np.random.default_rng(0).random((5, 1, SIZE, SIZE), dtype=np.float32)
    with torch.no_grad():
        p = torch.stack([m(torch.from_numpy(x)).sigmoid() for m in members]).mean(0)[:, 0].numpy()
    out = export.ort_session(export_dir / "model.onnx").run(None, {"input": x})[0]
    assert out.shape == (5, 2)
    np.testing.assert_allclose(out[:, 1], p, atol=1e-5)
    np.testing.assert_allclose(out.sum(1), 1, atol=1e-6)
    assert p.std() > 0 or abs(p.mean() - 0.5) > 0.05  # not a constant 0.5 model


def test_parity_check_can_fail(export_dir: Path) -> None:
    other = export.ProbabilityEnsemble([models.create_model("resnet10t", 1, 1)], "binary")
    with torch.no_grad():
        other.members[0].get_classifier().bias.fill_(-3.0)
    x = np.random.default_rng(1).random((2, 1, SIZE, SIZE), dtype=np.float32)
    assert export.parity(other, export_dir / "model.onnx", x) > 1e-2


def test_output_labels_by_task() -> None:
    assert export.output_labels({"task": "binary", "label_names": ["liver_cyst"]}) == ["not liver_cyst", "liver_cyst"]
    assert export.output_labels({"task": "multiclass", "num_classes": 3, "label_names": list("abc")}) == list("abc")
    with pytest.raises(ValueError, match="segmentation"):
        export.ProbabilityEnsemble([torch.nn.Identity()], "segmentation")


# ----------------------------------------------------------------------------- endpoints


def test_health_labels_metadata_docs(client: TestClient) -> None:
    assert client.get("/health").json()["health"] == "ok"
    assert client.get("/health").json()["model_loaded"] is True
    assert client.get("/labels").json() == {"0": "no", "1": "yes"}
    meta = client.get("/metadata").json()
    assert meta["input"]["shape"] == [None, 1, SIZE, SIZE] and set(meta["prediction"]["probabilities"]) == {"no",
                                                                                                            "yes"}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/predict/label", "/predict/test", "/health", "/metadata", "/labels"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and '<input type="file"' in page.text


def test_predict_test_matches_torch(client: TestClient) -> None:
    out = client.get("/predict/test").json()
    for label, p in out["expected"].items():
        assert abs(out["probabilities"][label] - p) <= 1e-4


@pytest.mark.parametrize("parts", [("brain-mri-tumor", "no", "No15.jpg"), ("brain-mri-tumor", "yes", "Y1.jpg"),
                                   ("dicom-samples", "pydicom", "CT_small.dcm"),
                                   ("ct-totalseg", "example_ct_sm.nii.gz")])
def test_predict_real_files(client: TestClient, export_dir: Path, parts: tuple[str, ...]) -> None:
    path = shared(*parts)
    r = client.post("/predict", files={"file": ("whatever.bin", path.read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out["probabilities"]) == {"no", "yes"} and abs(sum(out["probabilities"].values()) - 1) < 1e-5
    assert out["input"]["type"] == imageio.sniff_type(path.read_bytes())
    assert out["probabilities"] == pytest.approx(serve.predict_proba(path, export_dir), abs=1e-6)
    top = client.post("/predict/label", files={"file": ("x", path.read_bytes())}).json()
    assert top == {"label": out["label"], "probability": out["probability"]}


def _post(client: TestClient, data: bytes, name: str = "x.png"):
    return client.post("/predict", files={"file": (name, data, "image/png")})


def test_bad_inputs(client: TestClient) -> None:
    png = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(png, format="PNG")
    big = png.getvalue() + bytes(1024 * 1024 + 10)
    r = _post(client, big)
    assert r.status_code == 413 and "larger than 1 MB" in r.json()["detail"]
    assert _post(client, b"%PDF-1.7 pretending to be a png" * 10).status_code == 415
    r = _post(client, png.getvalue()[:60])
    assert r.status_code == 400 and "truncated or corrupt" in r.json()["detail"]
    assert _post(client, b"").status_code == 400
    tiny = io.BytesIO()
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tiny, format="PNG")
    assert "too small" in _post(client, tiny.getvalue()).json()["detail"]
    assert client.post("/predict").status_code == 422  # no file part


def test_dicom_errors_and_size_cap_by_header(client: TestClient) -> None:
    r = _post(client, shared("dicom-samples", "pydicom", "rtstruct.dcm").read_bytes(), "rt.dcm")
    assert r.status_code == 400 and "no pixel data" in r.json()["detail"]
    ds = pydicom.dcmread(shared("dicom-samples", "pydicom", "MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"
    ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
    buf = io.BytesIO()
    ds.save_as(buf)
    r = _post(client, buf.getvalue(), "ls.dcm")
    assert r.status_code == 400 and "unsupported transfer syntax" in r.json()["detail"]
    r = client.post("/predict", content=b"x", headers={"content-length": str(50 * 1024 * 1024),
                                                        "content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413


def test_never_opens_client_paths(client: TestClient) -> None:
    real = str(shared("brain-mri-tumor", "yes", "Y1.jpg"))
    assert client.post("/predict", json={"image_filepath": real}).status_code == 422
    assert client.post("/predict", data={"image_filepath": real}).status_code == 422
    r = client.post("/predict", files={"file": (real, b"not an image at all" * 20)})
    assert r.status_code == 415  # the name points at a real image; only the uploaded bytes count


def test_no_identifying_dicom_tags_in_responses_or_logs(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    path = shared("dicom-samples", "pydicom", "CT_small.dcm")
    ds = pydicom.dcmread(path)
    secrets = [str(ds.PatientName), str(ds.PatientID), "Doe^Jane"]
    caplog.set_level(logging.DEBUG)
    texts = [client.post(url, files={"file": ("Doe^Jane.dcm", path.read_bytes())}).text
             for url in ("/predict", "/predict/label")]
    broken = path.read_bytes()[:1500]
    texts.append(client.post("/predict", files={"file": ("Doe^Jane.dcm", broken)}).text)
    blob = "\n".join(texts) + caplog.text
    assert "scored dicom" in caplog.text
    for s in secrets:
        assert s not in blob


def test_model_not_loaded(tmp_path: Path) -> None:
    c = TestClient(serve.create_app(tmp_path / "nothing-here"))
    h = c.get("/health").json()
    assert h["health"] == "ok" and h["model_loaded"] is False and "missing" in h["error"]
    assert c.post("/predict", files={"file": ("x.png", _sample_png(tmp_path / "s.png").read_bytes())}).status_code \
        == 503


def test_cli_predict(export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    img = _sample_png(tmp_path / "a.png")
    assert serve.main(["--model", str(export_dir), "--predict", str(img), str(tmp_path / "missing.png")]) == 1
    ok, missing = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert ok["probabilities"] == pytest.approx(serve.predict_proba(img, export_dir), abs=1e-6)
    assert missing["error"] == "file not found"


def test_serving_does_not_import_torch() -> None:
    code = "import sys, lib.serve, lib.imageio; assert 'torch' not in sys.modules, 'torch imported at serve time'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


# ----------------------------------------------------------------------------- real server + browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(export_dir: Path) -> Iterator[str]:
    """``python -m lib.serve`` as a real process on a free loopback port."""
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lib.serve", "--model", str(export_dir), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            pytest.fail("server did not start within 90 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_end_to_end_real_server(live_server: str) -> None:
    import httpx

    path = shared("dicom-samples", "pydicom", "CT_small.dcm")
    r = httpx.post(live_server + "/predict", files={"file": (path.name, path.read_bytes())}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["input"] == {"type": "dicom", "shape": [128, 128], "modality": "CT"}
    assert httpx.get(live_server + "/health", timeout=5).json()["requests"] >= 1


def _chromium() -> tuple[str, str]:
    browser, driver = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or \
        "/usr/bin/chromedriver"
    if not (Path(browser).exists() and Path(driver).exists()):
        msg = "headless browser test needs Debian packages chromium + chromium-driver (apt-get install -y chromium " \
              "chromium-driver)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return browser, driver


def test_upload_page_in_headless_chromium(live_server: str, tmp_path: Path) -> None:
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        drv.get(live_server + "/")
        WebDriverWait(drv, 30).until(lambda d: d.find_element(By.ID, "model").text.startswith("resnet10t"))
        drv.find_element(By.ID, "file").send_keys(str(shared("brain-mri-tumor", "no", "No15.jpg")))
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
    finally:
        drv.quit()
