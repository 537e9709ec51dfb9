"""The papermill runner: stage graph and core budget, run.json, stop and resume, run ids, the HTML report."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from lib import config, pipeline, resources


def test_runner_writes_report_and_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "RUNS", tmp_path / "runs")
    run_dir = pipeline.run("smoke", only=["00"], run_id="t1")
    assert (run_dir / "notebooks" / "00_eda.ipynb").exists()
    html = (run_dir / "report.html").read_text()
    assert "00_eda.ipynb" in html and "all checks passed" in html
    assert "t1/report.html" in (tmp_path / "runs" / "index.html").read_text()  # the runs index, rewritten per run
    info = json.loads((run_dir / "run.json").read_text())
    stage = info["stages"][0]
    assert stage["status"] == "ok" and info["profile"] == "smoke" and info["status"] == "ok"
    assert stage["wall_s"] > 0 and stage["cpu_s"] > 0 and stage["cores_granted"] == 1
    assert stage["cores_used"] == pytest.approx(stage["cpu_s"] / stage["wall_s"], abs=0.01)
    assert (run_dir / stage["log"]).exists() and info["cpu_s"] >= stage["cpu_s"]
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


@pytest.mark.parametrize("bad", ["../../x", "a/b", ".hidden", "", "a..b", "/abs", "x" * 101, "a b", "..", "-x"])
def test_run_ids_that_could_leave_the_runs_folder_are_refused(tmp_path, monkeypatch, bad):
    monkeypatch.setattr(config, "RUNS", tmp_path / "runs")
    with pytest.raises(ValueError, match="invalid run id"):
        pipeline.new_run_dir("smoke", bad)
    with pytest.raises(ValueError, match="invalid run id"):
        pipeline.run("smoke", run_id=bad, resume=True)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_run_ids_that_are_fine(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "RUNS", tmp_path / "runs")
    for good in ("20261123-101500-demo", "a", "A.b_c-9", "x" * 100):
        assert pipeline.new_run_dir("smoke", good) == tmp_path / "runs" / good


def test_graph_matches_the_notebooks_and_ranks_the_critical_path_first():
    keys = {pipeline.stage_key(nb) for nb in pipeline.notebooks()}
    assert keys <= set(pipeline.DAG), "every notebook needs its place in pipeline.DAG"
    assert all(set(deps) <= set(pipeline.DAG) for deps in pipeline.DAG.values())
    rank = pipeline._ranks()  # also proves the graph has no cycle
    assert rank["01"] == rank["02"] > rank["04"] > rank["05"] == rank["07"]
    assert pipeline.dependencies("05", {"04", "05"}) == {"04"}
    assert pipeline.dependencies("05", {"05"}) == set()  # --only: dependencies are not added
    assert pipeline.preferred_cores("04", 6) == 6 and pipeline.preferred_cores("03", 6) == 1


def test_resources_read_the_grant(monkeypatch):
    monkeypatch.setenv("MEDNB_CORES", "6")
    monkeypatch.delenv("MEDNB_THREADS", raising=False)
    assert resources.cores() == 6 and resources.threads() == 6
    monkeypatch.setenv("MEDNB_THREADS", "4")
    assert resources.threads() == 4 and resources.workers() == 4 and resources.workers(limit=3) == 3
    assert resources.threads_per_worker(3) == 1 and resources.threads_per_worker(2) == 2
    monkeypatch.setenv("MEDNB_THREADS", "nonsense")
    assert resources.threads() == 6
    env = resources.thread_env(2)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["MEDNB_THREADS"] == "2"


def _intervals(info: dict) -> dict[str, tuple[float, float, int]]:
    return {s["stage"]: (s["started_unix"], s["finished_unix"], s["cores_granted"])
            for s in info["stages"] if s["status"] == "ok" and not s.get("background")}


def _peak_cores(spans: dict[str, tuple[float, float, int]]) -> int:
    """Most cores granted at once: at every stage start, the grants of the stages running then."""
    return max(sum(c for s, f, c in spans.values() if s <= t < f) for t, _, _ in spans.values())


@pytest.mark.parametrize("budget", [1, 3])
def test_scheduler_follows_the_graph_within_the_core_budget(tmp_path, monkeypatch, budget):
    """Real stage processes (a short shell sleep instead of a notebook) on the real graph."""
    monkeypatch.setattr(config, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(config, "PROFILES", tmp_path)
    fake = [tmp_path / f"{k}_s.ipynb" for k in sorted(pipeline.DAG)]
    monkeypatch.setattr(pipeline, "notebooks", lambda only=None: fake)
    monkeypatch.setattr(pipeline, "SHARED_INPUTS", {})
    monkeypatch.setattr(pipeline, "_stage_command", lambda spec: [
        "sh", "-c", 'sleep 0.2; printf \'{"status": "ok"}\' > "${1%.stage.json}.result.json"', "sh", str(spec)])
    info = json.loads((pipeline.run("smoke", run_id="g", cores=budget) / "run.json").read_text())
    assert {s["stage"] for s in info["stages"] if s["status"] == "ok"} == set(pipeline.DAG)
    assert info["status"] == "ok" and info["cores"] == budget
    every = {s["stage"]: (s["started_unix"], s["finished_unix"]) for s in info["stages"]}
    for key, deps in pipeline.DAG.items():
        assert all(every[key][0] >= every[d][1] for d in deps), f"{key} started before {deps} finished"
    spans = _intervals(info)  # the stages granted cores at normal priority
    background = {s["stage"] for s in info["stages"] if s.get("background")}
    assert _peak_cores(spans) <= budget
    for pool in set(spans) & {"02", "04", "05", "06"}:  # worker-pool stages get the whole budget: alone, normally
        assert spans[pool][2] == budget
        assert not any(s < spans[pool][1] and spans[pool][0] < f for k, (s, f, _) in spans.items() if k != pool)
    order = [k for k, _ in sorted(every.items(), key=lambda kv: kv[1][0])]
    if budget == 1:  # no background stages; critical path first: 01/02 -> 04, then the rest by number
        assert not background and order == ["01", "02", "04", "00", "03", "05", "06", "07"]
    else:  # while 01 runs and the crop waits for the whole machine, the ready leaves (00, 06) start in the
        # background; after k-fold, 05 takes the machine and no stage that others wait for ever runs in the background
        leaves = {k for k in pipeline.DAG if not any(k in deps for deps in pipeline.DAG.values())}
        assert {"00", "06"} <= background <= leaves
        assert every["00"][0] < every["02"][0] and every["06"][0] < every["02"][0]
        assert "05" in spans and spans["05"][0] >= every["04"][1]


def _notebook(path, code: str):
    import nbformat

    cell = nbformat.v4.new_code_cell("profile = 'smoke'\nseed = 0\nrun_dir = None")
    cell.metadata["tags"] = ["parameters"]
    nbformat.write(nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell(code)],
                                            metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                     "display_name": "Python 3"}}), path)
    return path


STAMP = ("import json, os, pathlib, time\n"
         "pathlib.Path(run_dir, '{name}.started').touch()\n"
         "me = [s for s in json.loads(pathlib.Path(run_dir, 'run.json').read_text())['stages']\n"
         "      if s['notebook'] == '{name}'][-1]\n"
         "t = time.time()  # both stages start before either ends: they run side by side\n"
         "while len(list(pathlib.Path(run_dir).glob('*.started'))) < 2 and time.time() < t + 60: time.sleep(0.05)\n"
         "pathlib.Path(run_dir, '{name}.json').write_text(json.dumps(dict(status=me['status'], ns=time.time_ns(),\n"
         "    both=len(list(pathlib.Path(run_dir).glob('*.started'))), threads=os.environ['MEDNB_THREADS'],\n"
         "    omp=os.environ['OMP_NUM_THREADS'])))\n")


def test_resume_finishes_a_failed_run_without_rerunning_finished_stages(tmp_path, monkeypatch):
    """Independent stages run side by side with their thread grant; run.json is there while they run; a failed
    stage is re-run (its failed notebook kept), finished stages are not; profile/seed must match."""
    monkeypatch.setattr(config, "RUNS", tmp_path / "runs")
    src = tmp_path / "nbs"
    src.mkdir()
    a = _notebook(src / "00_a.ipynb", STAMP.replace("{name}", "00_a.ipynb"))
    b = _notebook(src / "01_b.ipynb", STAMP.replace("{name}", "01_b.ipynb") + "assert False, 'broken stage'")
    monkeypatch.setattr(pipeline, "notebooks", lambda only=None: [a, b])
    monkeypatch.setattr(pipeline, "SHARED_INPUTS", {"builtins:print": frozenset({"00", "01"})})
    with pytest.raises(SystemExit, match="01_b.ipynb.*--resume --run-id r1"):
        pipeline.run("smoke", run_id="r1", seed=3, cores=2)
    run_dir = tmp_path / "runs" / "r1"
    seen_a, seen_b = (json.loads((run_dir / f"{n}.ipynb.json").read_text()) for n in ("00_a", "01_b"))
    assert seen_a["status"] == seen_b["status"] == "running"  # run.json is written while stages run
    assert seen_a["threads"] == seen_a["omp"] == "1"
    assert seen_a["both"] == seen_b["both"] == 2  # 00 and 01 are independent: they ran at the same time
    # the input both would generate is made once, before they start
    assert json.loads((run_dir / "run.json").read_text())["prepared"][0]["status"] == "ok"
    assert (run_dir / "logs" / "prepare.log").read_text().strip() == "smoke 3"
    with pytest.raises(ValueError, match="seed 3"):
        pipeline.run("smoke", run_id="r1", seed=4, resume=True)
    _notebook(b, "print('fixed')")
    pipeline.run("smoke", run_id="r1", seed=3, resume=True, cores=2)
    assert json.loads((run_dir / "00_a.ipynb.json").read_text())["ns"] == seen_a["ns"]  # 00 not executed again
    info = json.loads((run_dir / "run.json").read_text())
    assert [(s["notebook"], s["status"]) for s in info["stages"]] == [
        ("00_a.ipynb", "ok"), ("01_b.ipynb", "failed"), ("01_b.ipynb", "ok")]
    assert info["stages"][1]["error"]["ename"] == "AssertionError"
    assert [a["status"] for a in info["attempts"]] == ["failed", "ok"] and info["status"] == "ok"
    assert (run_dir / "notebooks" / "01_b.failed1.ipynb").exists() and (run_dir / "logs" / "01_b.failed1.log").exists()
    assert "00_a.ipynb" in (run_dir / "report.html").read_text()
    with pytest.raises(FileNotFoundError, match="no such run"):
        pipeline.run("smoke", run_id="nope", resume=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_the_run_and_resume_finishes_it(tmp_path, monkeypatch):
    """SIGTERM: the running stage is ended and marked killed, run.json says so, the exit code is non-zero;
    --resume re-runs the killed stage (its notebook kept) and the stage that never started."""
    monkeypatch.setattr(config, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(pipeline, "DAG", {"00": (), "01": ("00",)})
    monkeypatch.setattr(pipeline, "SHARED_INPUTS", {})
    src = tmp_path / "nbs"
    src.mkdir()
    a = _notebook(src / "00_a.ipynb", "import pathlib, time\npathlib.Path(run_dir, 'started').touch()\n"
                                      "while not pathlib.Path(run_dir, 'go').exists(): time.sleep(0.1)")
    b = _notebook(src / "01_b.ipynb", "import pathlib\npathlib.Path(run_dir, 'b.txt').write_text('b')")
    monkeypatch.setattr(pipeline, "notebooks", lambda only=None: [a, b])
    run_dir = tmp_path / "runs" / "k1"
    proc = multiprocessing.get_context("fork").Process(
        target=pipeline.run, args=("smoke",), kwargs={"run_id": "k1", "seed": 3, "cores": 2})
    proc.start()
    deadline = time.time() + 60
    while not (run_dir / "started").exists() and time.time() < deadline and proc.is_alive():
        time.sleep(0.1)
    assert (run_dir / "run.json").exists()
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(30)
    assert proc.exitcode == 128 + signal.SIGTERM
    info = json.loads((run_dir / "run.json").read_text())
    assert [(s["notebook"], s["status"]) for s in info["stages"]] == [("00_a.ipynb", "killed"),
                                                                      ("01_b.ipynb", "pending")]
    assert info["status"] == "killed" and not _alive(info["stages"][0]["pid"])
    (run_dir / "go").touch()
    pipeline.run("smoke", run_id="k1", seed=3, resume=True, cores=2)
    info = json.loads((run_dir / "run.json").read_text())
    assert [(s["notebook"], s["status"]) for s in info["stages"]] == [
        ("00_a.ipynb", "killed"), ("00_a.ipynb", "ok"), ("01_b.ipynb", "ok")]
    assert (run_dir / "b.txt").exists() and (run_dir / "notebooks" / "00_a.failed1.ipynb").exists()
    assert info["wall_s"] > 0 and info["cpu_s"] > 0 and info["cores_used"] is not None


def test_bench_table_reads_a_run(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_pipeline", Path(config.ROOT, "scripts", "bench_pipeline.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    info = {"profile": "smoke", "cores": 2, "status": "ok", "wall_s": 10.0, "cpu_s": 12.0, "cores_used": 1.2,
            "stages": [{"notebook": "00_a.ipynb", "status": "ok", "attempt": 1, "cores_granted": 1, "wall_s": 6.0,
                        "cpu_s": 5.0, "cores_used": 0.83},
                       {"notebook": "01_b.ipynb", "status": "ok", "attempt": 1, "cores_granted": 1, "wall_s": 8.0,
                        "cpu_s": 6.5, "cores_used": 0.81}]}
    text = bench.table(info)
    assert "00_a" in text and "0.83" in text and "overlap (summed stage wall / run wall) 1.40" in text


def test_background_stages_run_at_the_lowest_priority():
    """A background stage's process (and what it starts) only gets cycles nothing else wants: nice 19."""
    import subprocess
    import sys

    code = ("import os; from lib import resources; resources.lower_priority(); "
            "print(os.nice(0), os.sched_getscheduler(0) == getattr(os, 'SCHED_IDLE', os.sched_getscheduler(0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=pipeline._REPO).stdout
    assert out.split() == ["19", "True"]

