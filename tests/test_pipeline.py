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


def _notebook(path, code: str):
    import nbformat

    cell = nbformat.v4.new_code_cell("profile = 'smoke'\nseed = 0\nrun_dir = None")
    cell.metadata["tags"] = ["parameters"]
    nbformat.write(nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell(code)],
                                            metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                     "display_name": "Python 3"}}), path)
    return path


def test_resume_finishes_a_failed_run_without_rerunning_finished_stages(tmp_path, monkeypatch):
    """A failed stage is re-run (its failed notebook kept), finished stages are not; profile/seed must match."""
    monkeypatch.setattr(config, "RUNS", tmp_path / "runs")
    src = tmp_path / "nbs"
    src.mkdir()
    a = _notebook(src / "00_a.ipynb", "import pathlib, time\n"
                                      "pathlib.Path(run_dir, 'a.txt').write_text(str(time.time_ns()))")
    b = _notebook(src / "01_b.ipynb", "assert False, 'broken stage'")
    monkeypatch.setattr(pipeline, "notebooks", lambda only=None: [a, b])
    with pytest.raises(SystemExit, match="01_b.ipynb.*--resume --run-id r1"):
        pipeline.run("smoke", run_id="r1", seed=3)
    run_dir = tmp_path / "runs" / "r1"
    stamp = (run_dir / "a.txt").read_text()
    with pytest.raises(ValueError, match="seed 3"):
        pipeline.run("smoke", run_id="r1", seed=4, resume=True)
    _notebook(b, "print('fixed')")
    pipeline.run("smoke", run_id="r1", seed=3, resume=True)
    assert (run_dir / "a.txt").read_text() == stamp  # 00 was not executed again
    info = json.loads((run_dir / "run.json").read_text())
    assert [(s["notebook"], s["status"]) for s in info["stages"]] == [
        ("00_a.ipynb", "ok"), ("01_b.ipynb", "failed"), ("01_b.ipynb", "ok")]
    assert len(info["resumed"]) == 1 and (run_dir / "notebooks" / "01_b.failed1.ipynb").exists()
    assert "00_a.ipynb" in (run_dir / "report.html").read_text()
    with pytest.raises(FileNotFoundError, match="no such run"):
        pipeline.run("smoke", run_id="nope", resume=True)
