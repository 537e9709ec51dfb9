"""Per-stage wall time, CPU time and cores used of a pipeline run (measured figures, no thresholds).

Why: the pipeline runs independent notebooks side by side within a core budget; this shows how much of the
budget each stage used (CPU s / wall s) and how much the graph overlapped (sum of stage walls / run wall).
CPU seconds are those of each stage's whole process tree (stage process, kernel, workers).

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_pipeline.py                      # run the demo profile
    .venv/bin/python scripts/bench_pipeline.py --profile smoke [--only 00 01] [--cores 2]
    .venv/bin/python scripts/bench_pipeline.py --run-id 20261123-101500-demo          # read an existing run
    .venv/bin/python scripts/bench_pipeline.py --run-id <id> --json docs/results/make-run-demo.json

``--json PATH`` also writes the figures as a results source (schema: :mod:`lib.results`): the per-stage table,
the run totals and the run's headline metrics (:data:`lib.report.HEADLINE`), with the command, the machine,
the commit and the date; ``mednb results`` turns the sources into ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import config, pipeline, report  # noqa: E402
from lib.io import write_json  # noqa: E402


def _fmt(value: object, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "-"


def _start(s: dict, t0: float | None) -> float | None:
    """Seconds from the run's first stage start to this stage's start."""
    return s["started_unix"] - t0 if t0 is not None and isinstance(s.get("started_unix"), int | float) else None


def _t0(info: dict) -> float | None:
    starts = [s["started_unix"] for s in info.get("stages", []) if isinstance(s.get("started_unix"), int | float)]
    return min(starts) if starts else None


def table(info: dict) -> str:
    """The per-stage table of a ``run.json``, every attempt of every stage, then the run totals. ``priority``:
    normal, or background (started at the lowest CPU priority on cores the normal stages left idle)."""
    rows = [f"{'stage':<26} {'status':<8} {'try':>3} {'granted':>7} {'priority':>10} {'start s':>8} {'wall s':>8} "
            f"{'CPU s':>8} {'cores used':>10}"]
    stage_wall = stage_cpu = 0.0
    t0 = _t0(info)
    for s in info.get("stages", []):
        wall, cpu = s.get("wall_s", s.get("seconds")), s.get("cpu_s")
        stage_wall += wall or 0.0
        stage_cpu += cpu or 0.0
        rows.append(f"{Path(s['notebook']).stem:<26} {s['status']:<8} {s.get('attempt', 1):>3} "
                    f"{_fmt(s.get('cores_granted'), 'd'):>7} {_priority(s):>10} {_fmt(_start(s, t0), '.1f'):>8} "
                    f"{_fmt(wall, '.1f'):>8} {_fmt(cpu, '.1f'):>8} {_fmt(s.get('cores_used'), '.2f'):>10}")
    run_wall, run_cpu = info.get("wall_s"), info.get("cpu_s")
    rows.append("")
    rows.append(f"stages: wall {stage_wall:.1f} s summed, CPU {stage_cpu:.1f} s")
    if run_wall:
        rows.append(f"run ({info.get('profile')}, budget {info.get('cores')} core(s), status {info.get('status')}): "
                    f"wall {run_wall:.1f} s, CPU {_fmt(run_cpu, '.1f')} s (stages + pipeline process), "
                    f"cores used {_fmt(info.get('cores_used'), '.2f')}, "
                    f"overlap (summed stage wall / run wall) {stage_wall / run_wall:.2f}")
    return "\n".join(rows)


def machine() -> str:
    """This computer in words: CPU cores, memory, GPU (results sources name the machine of every figure)."""
    parts = [f"{os.cpu_count()} CPU cores"]
    try:
        import psutil
        parts.append(f"{psutil.virtual_memory().total / 2**30:.0f} GB")
    except ImportError:
        pass
    gpus = ""
    if shutil.which("nvidia-smi"):
        probe = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, check=False)
        gpus = ", ".join(line.strip() for line in probe.stdout.splitlines() if line.strip())
    parts.append(gpus or "no GPU")
    return ", ".join(parts) + f" ({platform.system()} {platform.machine()})"


def _priority(s: dict) -> str:
    return "background" if s.get("background") else "normal" if s.get("cores_granted") else "-"


def stage_rows(info: dict) -> list[list]:
    """The per-stage table of :func:`table` as rows of values."""
    t0 = _t0(info)
    return [[Path(s["notebook"]).stem, s["status"], s.get("attempt", 1), s.get("cores_granted"), _priority(s),
             None if (start := _start(s, t0)) is None else round(start, 1), s.get("wall_s", s.get("seconds")),
             s.get("cpu_s"), s.get("cores_used")] for s in info.get("stages", [])]


def results_source(info: dict, metrics: dict, run_id: str, command: str) -> dict:
    """A ``docs/results/*.json`` source (schema: :mod:`lib.results`) for one run."""
    stage_wall = sum(s.get("wall_s", s.get("seconds")) or 0.0 for s in info.get("stages", []))
    stage_cpu = sum(s.get("cpu_s") or 0.0 for s in info.get("stages", []))
    run_cmd = f"python -m lib.pipeline --profile {info.get('profile')}"
    figures = [{"name": "stages: wall, summed", "value": round(stage_wall, 1), "unit": "s"},
               {"name": "stages: CPU", "value": round(stage_cpu, 1), "unit": "s"}]
    if info.get("wall_s"):
        figures += [{"name": "run: wall", "value": info["wall_s"], "unit": "s"},
                    {"name": "run: CPU (stages + pipeline process)", "value": info.get("cpu_s"), "unit": "s"},
                    {"name": "run: cores used", "value": info.get("cores_used")},
                    {"name": "overlap (summed stage wall / run wall)", "value": round(stage_wall / info["wall_s"], 2)}]
    for h in report.headline(metrics):
        fig = {"name": f"{h['label']} ({h['folder']}: {h['path']})", "value": h["value"], "command": run_cmd}
        if h["ci"]:
            fig["ci"] = list(h["ci"])
        figures.append(fig)
    return {"title": f"Pipeline run, {info.get('profile')} profile, budget {info.get('cores')} core(s)",
            "command": command, "machine": machine(), "commit": str(info.get("commit", ""))[:7],
            "date": str(info.get("started", ""))[:10],
            "notes": [f"Run `{run_id}`, status {info.get('status')}; quality figures from its `metrics.json` "
                      f"(`{run_cmd}`)."],
            "figures": figures,
            "tables": [{"title": f"per stage, run {run_id}",
                        "columns": ["stage", "status", "try", "granted", "priority", "start s", "wall s", "CPU s",
                                    "cores used"],
                        "rows": stage_rows(info)}]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo", choices=["smoke", "demo", "full"])
    ap.add_argument("--only", nargs="*", help="notebook numbers to run, e.g. 00 01")
    ap.add_argument("--run-id", default=None, help="read this existing run (nothing is run)")
    ap.add_argument("--cores", type=int, default=None, help="core budget (default: MEDNB_CORES, else every core)")
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as a results source")
    args = ap.parse_args(argv)
    if args.run_id:  # read only: a mistyped id must not start a run
        run_dir = pipeline.run_path(args.run_id)
        if not (run_dir / "run.json").exists():
            raise SystemExit(f"{run_dir / 'run.json'}: no such run")
    else:
        run_dir = pipeline.run_path(f"{dt.datetime.now():%Y%m%d-%H%M%S}-{args.profile}-bench")
        try:
            pipeline.run(args.profile, args.only, run_dir.name, args.seed, cores=args.cores)
        except SystemExit as exc:  # a failed or stopped run still has figures for the stages that ran
            print(exc, file=sys.stderr)
    info = json.loads((run_dir / "run.json").read_text())
    print(f"run {run_dir.name}")
    print(table(info))
    if args.json:
        metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
        command = "python scripts/bench_pipeline.py " + shlex.join(
            [a for a in (argv if argv is not None else sys.argv[1:])])
        src = results_source(info, metrics, run_dir.name, command)
        write_json(args.json, src)
        print(f"results source: {args.json}")


if __name__ == "__main__":
    main()
