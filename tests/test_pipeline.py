"""The papermill runner: fresh run folder, executed notebook, HTML report, no overwriting."""

from __future__ import annotations

import json

import pytest

from lib import config, pipeline


def test_runner_writes_report_and_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "RUNS", tmp_path / "runs")
    run_dir = pipeline.run("smoke", only=["00"], run_id="t1")
    assert (run_dir / "notebooks" / "00_eda.ipynb").exists()
    html = (run_dir / "report.html").read_text()
    assert "00_eda.ipynb" in html and "all checks passed" in html
    info = json.loads((run_dir / "run.json").read_text())
    assert info["stages"][0]["status"] == "ok" and info["profile"] == "smoke"
    assert (run_dir / "eda" / "figures" / "hu_per_structure.png").exists()
    with pytest.raises(FileExistsError):
        pipeline.run("smoke", only=["00"], run_id="t1")


def test_profile_parameters_missing_profile(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "PROFILES", tmp_path)
    (tmp_path / "00_eda.yaml").write_text("smoke: {a: 1}\n")
    nb = config.NOTEBOOKS / "00_eda.ipynb"
    assert pipeline.profile_parameters(nb, "smoke") == {"a": 1}
    with pytest.raises(KeyError, match="no 'demo' profile"):
        pipeline.profile_parameters(nb, "demo")
