"""Clients of the earlier brain-MRI API: ``/label``, a ``prediction`` list in ``/predict``, display names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lib import serve
from tests.test_serve import _sample_png, build_export


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_export(tmp_path_factory.mktemp("export"))


def test_label_alias_and_prediction_list(export_dir: Path, tmp_path: Path) -> None:
    client = TestClient(serve.create_app(export_dir))
    assert client.get("/label").json() == client.get("/labels").json() == {"0": "no", "1": "yes"}
    out = client.post("/predict", files={"file": ("a.png", _sample_png(tmp_path / "a.png").read_bytes())}).json()
    assert out["prediction"] == [out["probabilities"]["no"], out["probabilities"]["yes"]]
    assert sum(out["prediction"]) == pytest.approx(1.0, abs=1e-5)
    assert out["label"] == ["no", "yes"][max(range(2), key=out["prediction"].__getitem__)]
    assert client.get("/predict/test").json()["prediction"]


def test_display_names(export_dir: Path, tmp_path: Path) -> None:
    client = TestClient(serve.create_app(export_dir, display_names=["WITHOUT TUMOR", "WITH TUMOR"]))
    assert client.get("/label").json() == {"0": "WITHOUT TUMOR", "1": "WITH TUMOR"}
    out = client.post("/predict", files={"file": ("a.png", _sample_png(tmp_path / "a.png").read_bytes())}).json()
    assert set(out["probabilities"]) == {"WITHOUT TUMOR", "WITH TUMOR"} and out["label"] in out["probabilities"]
    bad = TestClient(serve.create_app(export_dir, display_names=["ONLY ONE"]))
    health = bad.get("/health").json()
    assert health["model_loaded"] is False and "must be 2 distinct names" in health["error"]


def test_label_names_on_the_command_line(export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    img = _sample_png(tmp_path / "a.png")
    assert serve.main(["--model", str(export_dir), "--predict", str(img), "--label-names", "WITHOUT TUMOR,WITH TUMOR"]
                      ) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert set(out["probabilities"]) == {"WITHOUT TUMOR", "WITH TUMOR"} and len(out["prediction"]) == 2


def test_client_paths_stay_refused(export_dir: Path) -> None:
    client = TestClient(serve.create_app(export_dir))
    for body in ({"path": "/etc/passwd"}, {"file": "/etc/passwd"}):
        assert client.post("/predict", data=body).status_code in (400, 422)
    assert client.get("/label", params={"path": "/etc/passwd"}).json() == {"0": "no", "1": "yes"}


def test_export_run_of_an_image_model_uses_its_training_images(tmp_path: Path) -> None:
    """Stage 07 on a 2D set: sample and parity inputs come from the folder the k-fold run trained on."""
    import numpy as np

    from lib import export, imageio
    from tests.test_serve import PREP

    root = tmp_path / "run"
    build_export(root)
    images = tmp_path / "images"
    for label in ("no", "yes"):
        (images / label).mkdir(parents=True)
        for i in range(3):
            _sample_png(images / label / f"{label}{i}.png")
    (root / "kfold" / "m" / "params.json").write_text(json.dumps({"dataset": str(images), "n_splits": 2}))
    (root / "kfold" / "m" / "metrics.json").write_text("{}")  # a finished run (kfold.is_complete)
    meta = export.export_run(root, "m", n_parity=4, out_dir=tmp_path / "out")
    assert meta["sample"]["file"] == "sample.png" and len(meta["parity_files"]) == 4
    assert {Path(p).parent.name for p in meta["parity_files"]} == {"no", "yes"}
    x, paths = export.parity_inputs(root, "m", PREP, 2)
    assert x.shape == (2, 1, 48, 48) and np.array_equal(x[0], imageio.load_input(paths[0], PREP))
    (root / "kfold" / "m" / "params.json").unlink()
    with pytest.raises(Exception, match="cannot tell which images"):
        export.image_inputs(root, "m", PREP)
