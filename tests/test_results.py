"""docs/results.md is derived from docs/results/*.json: the committed pair agrees (CI fails on drift), a changed
figure is reported with a diff, a bad source names the file and the problem, and bench_pipeline writes a source."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lib import results

ROOT = Path(__file__).resolve().parents[1]


def test_committed_results_match_their_sources() -> None:
    """CI's check: the same function ``mednb results --check`` runs."""
    assert results.check() == []


def test_mednb_results_check_names_the_disagreeing_file(tmp_path: Path) -> None:
    from tests.test_cli import invoke

    sources = tmp_path / "results"
    shutil.copytree(results.SOURCES, sources)
    out = tmp_path / "results.md"
    code, text = invoke("results", "--sources", str(sources), "--output", str(out))
    assert code == 0 and out.read_text() == results.markdown(sources), text
    code, text = invoke("results", "--check", "--sources", str(sources), "--output", str(out))
    assert code == 0 and "matches" in text, text
    src_path = sources / "reports-eval.json"
    src = json.loads(src_path.read_text())
    src["title"] = "a changed title"
    src_path.write_text(json.dumps(src))
    code, text = invoke("results", "--check", "--sources", str(sources), "--output", str(out))
    assert code == 1, text
    assert f"{src_path}: disagrees with its section in {out}" in text and "a changed title" in text
    assert "make-run-demo.json" not in text  # only the file at fault is named
    src_path.unlink()
    (sources / "zz-new.json").write_text(json.dumps({**src, "title": "new"}))
    problems = results.check(sources, out)
    assert f"{out}: section 'reports-eval.json' has no source in {sources}" in problems
    assert f"{sources / 'zz-new.json'}: has no section in {out}" in problems
    out.unlink()
    assert results.check(sources, out) == [f"{out}: missing; run mednb results"]


def test_every_figure_names_command_and_machine() -> None:
    for path in sorted(results.SOURCES.glob("*.json")):
        src = results.load(path)
        text = results.section(path.name, src)
        for fig in src.get("figures", []):
            row = next(line for line in text.splitlines() if line.startswith(f"| {results._cell(fig['name'])} |"))
            assert fig.get("command", src["command"]) in row and fig.get("machine", src["machine"]) in row


def test_check_fails_with_a_diff_when_a_figure_changes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sources = tmp_path / "results"
    shutil.copytree(results.SOURCES, sources)
    out = tmp_path / "results.md"
    assert results.main(["--sources", str(sources), "--output", str(out)]) == 0
    assert results.main(["--sources", str(sources), "--output", str(out), "--check"]) == 0
    src_path = sources / "make-run-demo.json"
    src = json.loads(src_path.read_text())
    committed = src["figures"][0]["value"]
    src["figures"][0]["value"] = 1.5
    src_path.write_text(json.dumps(src))
    capsys.readouterr()
    assert results.main(["--sources", str(sources), "--output", str(out), "--check"]) == 1
    shown = capsys.readouterr().out
    assert f"-| time make run: real | {committed} s" in shown and "+| time make run: real | 1.5 s" in shown


@pytest.mark.parametrize("broken, message", [
    ("{", "not readable JSON"),
    ('{"title": "t", "command": "c", "machine": "m", "commit": "x"}', "'date' must be a non-empty string"),
    ('{"title": "t", "command": "c", "machine": "m", "commit": "x", "date": "d", "figures": [{"value": 1}]}',
     "figures[0] needs a 'name'"),
    ('{"title": "t", "command": "c", "machine": "m", "commit": "x", "date": "d", '
     '"tables": [{"columns": ["a", "b"], "rows": [[1]]}]}', "tables[0].rows[0] must be a list of 2 cells"),
])
def test_bad_source_names_file_and_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str], broken: str,
                                           message: str) -> None:
    (tmp_path / "bad.json").write_text(broken)
    assert results.main(["--sources", str(tmp_path), "--output", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and message in err


def test_bench_pipeline_writes_a_source(tmp_path: Path) -> None:
    from tests.test_report import fake_run

    runs = tmp_path / "runs"
    run_dir = fake_run(runs)
    out = tmp_path / "sources" / "bench.json"
    out.parent.mkdir()
    code = ("import sys; from lib import config; config.RUNS = __import__('pathlib').Path(sys.argv[1]); "
            "sys.argv = sys.argv[1:]; import runpy; runpy.run_path('scripts/bench_pipeline.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(runs), "--run-id", run_dir.name, "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    src = results.load(out)
    assert src["commit"] == "abcdef1" and src["date"] == "2026-01-01" and "CPU cores" in src["machine"]
    assert f"--run-id {run_dir.name}" in src["command"]
    figures = {f["name"]: f for f in src["figures"]}
    assert figures["run: wall"]["value"] == 12.5
    auc = next(f for n, f in figures.items() if n.startswith("Out-of-fold AUC, trained on report labels"))
    assert auc["value"] == 0.907 and auc["ci"] == [0.869, 0.943]
    assert src["tables"][0]["rows"] == [["04_kfold", "ok", 1, 2, "normal", None, 11.0, 19.0, 1.73]]
    assert "| run: wall | 12.5 s |" in results.markdown(out.parent)
