"""Export (ONNX ensemble, parity, stage-07 crop export) and the HTTP service: every endpoint and bad input
(real server + browser: tests/test_serve_e2e.py)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from lib import config, export, imageio, models, serve
from tests.conftest import shared

ROOT = Path(__file__).resolve().parents[1]
SIZE = 48
PREP = {"source": "images", "kind": "2d", "channels": 1, "size": SIZE, "classes": ["no", "yes"]}


def _sample_png(path: Path) -> Path:
    yy, xx = np.mgrid[:80, :96]
    img = (127 + 100 * np.sin(xx / 7.0) * np.cos(yy / 11.0)).astype(np.uint8)
    Image.fromarray(img).save(path, format="PNG")
    return path


def build_export(root: Path) -> Path:
    """Two fold checkpoints (lib.models format) of a 2D image model exported as one ONNX ensemble."""
    torch.manual_seed(0)
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
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_export(tmp_path_factory.mktemp("export"))


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
    with pytest.raises(ValueError, match="regression"):
        export.ProbabilityEnsemble([torch.nn.Identity()], "regression")
    maps = export.ProbabilityEnsemble([torch.nn.Identity()] * 2, "segmentation")(torch.zeros(1, 1, 4, 4))
    assert maps.shape == (1, 1, 4, 4) and torch.allclose(maps, torch.full_like(maps, 0.5))  # mean sigmoid map


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


def test_binds_loopback_by_default() -> None:
    args = serve.parse_args(["--model", "x"])
    assert args.host == "127.0.0.1" and args.max_upload_mb == serve.DEFAULT_MAX_UPLOAD_MB


def test_export_run_crop_model_serves_what_it_trained_on(tmp_path: Path) -> None:
    """A crop model's export: parity on crops made by lib.datasets, and the shipped NIfTI sample read by the
    service gives exactly the training input (orientation, slice order and preprocessing all kept)."""
    import pandas as pd

    from lib import datasets

    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        yy, xx = np.mgrid[:40, :36]  # non-square and slice-varying: a transposed or flipped read would differ
        img = np.stack([np.clip((xx + 2 * yy + 3 * s) / 150 + 0.1 * rng.random((40, 36)), 0, 1) for s in range(12)])
        path = run / "crops" / "bbox" / "liver" / f"c{i}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, image=img.astype(np.float32), mask=np.ones(img.shape, np.uint8),
                 spacing=np.array([2.5, 0.8, 0.7], np.float32), affine=np.diag([-0.7, -0.8, 2.5, 1.0]))
        rows.append({"case_id": f"c{i}", "organ": "liver", "mode": "bbox", "path": f"bbox/liver/c{i}.npz"})
    pd.DataFrame(rows).to_csv(run / "crops" / "index.csv", index=False)
    spec = {"source": "crops", **datasets.crop_spec("slab", 8, 32), "mask_mode": "none", "organ": "liver"}
    meta = models.checkpoint_meta("resnet10t", 8, 1, "binary", ["liver_abnormal"], spec)
    torch.manual_seed(1)
    for k in range(2):
        models.save_checkpoint(run / "kfold" / "m" / f"fold{k}" / "best.pt", models.create_model("resnet10t", 8, 1),
                               meta)
    (run / "kfold" / "m" / "metrics.json").write_text(json.dumps({"pooled": {"auc": 0.71, "auc_ci": [0.5, 0.9]},
                                                                  "n_splits": 2}))
    (run / "kfold" / "m" / "params.json").write_text(json.dumps({"n_splits": 2}))  # a finished run: kfold.is_complete
    out = export.export_run(run, profile="smoke")
    exp = run / "export" / "m"
    assert out["kfold_name"] == "m" and out["n_models"] == 2 and out["run_id"] == "run"
    assert out["metrics"]["pooled_oof"] == {"auc": 0.71} and out["parity"]["n_inputs"] == 3
    assert out["input"]["shape"] == [None, 8, 32, 32] and out["label_names"] == ["not liver_abnormal",
                                                                                "liver_abnormal"]
    image, _ = datasets.read_crop(run / "crops" / "bbox" / "liver" / "c0.npz")
    served = imageio.read_image(exp / "sample.nii.gz")
    np.testing.assert_array_equal(served, image)
    x_train = datasets.crop_to_input(image, None, "slab", 8, 32)
    pred = serve.Predictor(exp)
    np.testing.assert_allclose(pred.predict_arrays(x_train[None])[0],
                               list(out["sample"]["torch_probabilities"].values()), atol=1e-4)
    c = TestClient(serve.create_app(exp))
    test = c.get("/predict/test").json()
    assert test["input"]["type"] == "nifti"
    for label, p in test["expected"].items():
        assert abs(test["probabilities"][label] - p) <= 1e-4


def test_chunked_upload_over_cap_is_413(client: TestClient) -> None:
    """No Content-Length (chunked): the cap must hold while the body streams in, not after spooling it."""
    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n\x89PNG\r\n\x1a\n'
        for _ in range(40):  # 2.5 MB against the 1 MB cap
            yield bytes(65536)
        yield b"\r\n--b--\r\n"

    r = client.post("/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.request.headers.get("content-length") is None and r.status_code == 413


def test_predict_proba_dicom_series_and_default_model(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    series = shared("ct-totalseg", "example_ct_dicom")
    p = serve.predict_proba(series, export_dir)
    assert set(p) == {"no", "yes"} and abs(sum(p.values()) - 1) < 1e-5
    vol = imageio.read_dicom_series(series)  # the middle slice of the ordered volume is what the 2D model sees
    x = imageio.preprocess(imageio.nifti_to_slices(np.asarray(vol.dataobj, np.float32), vol.affine), PREP)
    direct = serve.Predictor(export_dir).predict_arrays(x[None])[0]
    assert [p["no"], p["yes"]] == pytest.approx(direct.tolist(), abs=1e-6)
    monkeypatch.setattr(config, "OUTPUTS", export_dir.parents[1])  # the newest export/<name> below OUTPUTS
    assert serve.latest_export() == export_dir
    assert serve.predict_proba(series) == pytest.approx(p, abs=1e-6)


@pytest.fixture(scope="module")
def seg_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small (untrained) MONAI U-Net exported by lib.segmentation.onnx_export: enough to test the endpoint."""
    from lib.segmentation import model, onnx_export, preprocess

    root = tmp_path_factory.mktemp("seg")
    torch.manual_seed(0)
    kw = {"channels": [4, 8, 16, 32], "spatial_dims": 2}
    net = model.build_model("monai:UNet", 1, 1, **kw)
    meta = {**models.checkpoint_meta("monai:UNet", 1, 1, "segmentation", ["lesion"],
                                     preprocess.Preprocess(size=32).to_dict(), **kw), "threshold": 0.5}
    ckpt = models.save_checkpoint(root / "fold0" / "best.pt", net, meta)
    onnx_export.export_segmenter(ckpt, root / "export", sample=_sample_png(root / "s.png"))
    return root / "export"


def test_segment_endpoint(export_dir: Path, seg_export: Path) -> None:
    from lib.segmentation import infer

    c = TestClient(serve.create_app(export_dir, max_upload_mb=1, segmenter_dir=seg_export))
    assert c.get("/health").json()["segmenter_loaded"] is True
    png = _sample_png(seg_export.parent / "up.png").read_bytes()
    r = c.post("/segment", files={"file": ("x", png)})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    mask = np.asarray(Image.open(io.BytesIO(r.content)))
    assert mask.shape == (80, 96) and set(np.unique(mask)) <= {0, 255}
    sess, _ = infer.load_segmenter(seg_export)
    expected, area = infer.segment_source(sess, png)
    np.testing.assert_array_equal(mask > 0, expected > 0)
    assert int(r.headers["X-Mask-Pixels"]) == area["pixels"]
    assert c.post("/segment?output=json", files={"file": ("x", png)}).json()["area"] == area
    ct = shared("dicom-samples", "pydicom", "CT_small.dcm").read_bytes()
    r = c.post("/segment?output=json", files={"file": ("x", ct)})  # DICOM upload: 2D slice
    assert r.status_code == 200 and r.json()["shape"] == [128, 128]
    assert c.post("/segment", files={"file": ("x", b"%PDF" * 50)}).status_code == 415
    vol = shared("ct-totalseg", "example_ct_sm.nii.gz").read_bytes()
    r = c.post("/segment", files={"file": ("x", vol)})
    assert r.status_code == 400 and "volume" in r.json()["detail"]
    no_seg = TestClient(serve.create_app(export_dir))
    assert no_seg.post("/segment", files={"file": ("x", png)}).status_code == 503
