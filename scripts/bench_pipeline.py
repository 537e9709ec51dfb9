"""Per-stage wall time, CPU time and cores used of a pipeline run (measured figures, no thresholds).

Why: the pipeline runs independent notebooks side by side within a core budget; this shows how much of the
budget each stage used (CPU s / wall s) and how much the graph overlapped (sum of stage walls / run wall).
CPU seconds are those of each stage's whole process tree (stage process, kernel, workers).

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_pipeline.py                      # run the demo profile
    .venv/bin/python scripts/bench_pipeline.py --profile smoke [--only 00 01] [--cores 2]
    .venv/bin/python scripts/bench_pipeline.py --run-id 20261123-101500-demo          # read an existing run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import config, pipeline  # noqa: E402


def _fmt(value: object, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "-"


def table(info: dict) -> str:
    """The per-stage table of a ``run.json``, every attempt of every stage, then the run totals."""
    rows = [f"{'stage':<26} {'status':<8} {'try':>3} {'granted':>7} {'wall s':>8} {'CPU s':>8} {'cores used':>10}"]
    stage_wall = stage_cpu = 0.0
    for s in info.get("stages", []):
        wall, cpu = s.get("wall_s", s.get("seconds")), s.get("cpu_s")
        stage_wall += wall or 0.0
        stage_cpu += cpu or 0.0
        rows.append(f"{Path(s['notebook']).stem:<26} {s['status']:<8} {s.get('attempt', 1):>3} "
                    f"{_fmt(s.get('cores_granted'), 'd'):>7} {_fmt(wall, '.1f'):>8} {_fmt(cpu, '.1f'):>8} "
                    f"{_fmt(s.get('cores_used'), '.2f'):>10}")
    run_wall, run_cpu = info.get("wall_s"), info.get("cpu_s")
    rows.append("")
    rows.append(f"stages: wall {stage_wall:.1f} s summed, CPU {stage_cpu:.1f} s")
    if run_wall:
        rows.append(f"run ({info.get('profile')}, budget {info.get('cores')} core(s), status {info.get('status')}): "
                    f"wall {run_wall:.1f} s, CPU {_fmt(run_cpu, '.1f')} s (stages + pipeline process), "
                    f"cores used {_fmt(info.get('cores_used'), '.2f')}, "
                    f"overlap (summed stage wall / run wall) {stage_wall / run_wall:.2f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo", choices=["smoke", "demo", "full"])
    ap.add_argument("--only", nargs="*", help="notebook numbers to run, e.g. 00 01")
    ap.add_argument("--run-id", default=None, help="read this existing run (nothing is run)")
    ap.add_argument("--cores", type=int, default=None, help="core budget (default: MEDNB_CORES, else every core)")
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
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


if __name__ == "__main__":
    main()
