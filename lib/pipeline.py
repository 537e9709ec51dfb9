"""Run the numbered notebooks in order with papermill and write one HTML report per run.

    python -m lib.pipeline --profile demo            # every notebook, demo parameters
    python -m lib.pipeline --profile smoke --only 00 01

Each run gets ``outputs/runs/<run-id>/`` (never reused: an existing folder is an error), with the
executed notebooks, figures and tables the notebooks write, ``metrics.json`` (merged from every
stage's ``**/metrics.json``), ``run.json`` (provenance) and ``report.html``. A failing notebook stops
the run; the failing cell and its error are printed and kept in the report.

    python -m lib.pipeline --profile demo --resume --run-id 20261123-101500-demo   # after a failure: finish it

``--resume`` continues an existing run with the same profile and seed: stages that finished are kept as they
are (not re-run), the failed stage's notebook is kept as ``<stage>.failed<k>.ipynb`` and the remaining stages run.
``run.json`` lists every attempt with its commit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import yaml

from lib import config


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in order, optionally filtered by number prefix (``00``, ``01``...)."""
    found = sorted(config.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if p.name[:2] in only]
    return found


def profile_parameters(notebook: Path, profile: str) -> dict:
    """Parameters papermill injects: ``notebooks/profiles/<stem>.yaml[profile]`` (missing file = defaults)."""
    path = config.PROFILES / f"{notebook.stem}.yaml"
    if not path.exists():
        return {}
    table = yaml.safe_load(path.read_text()) or {}
    if profile not in table:
        raise KeyError(f"{path}: no '{profile}' profile (has {sorted(table)})")
    return dict(table[profile] or {})


def new_run_dir(profile: str, run_id: str | None = None) -> Path:
    """A fresh run folder; refuses to reuse one so no run overwrites another."""
    run_id = run_id or f"{dt.datetime.now():%Y%m%d-%H%M%S}-{profile}"
    path = config.RUNS / run_id
    if path.exists():
        raise FileExistsError(f"run folder {path} already exists; runs never overwrite each other")
    path.mkdir(parents=True)
    return path


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=config.ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def merge_metrics(run_dir: Path) -> dict:
    """Collect every stage's ``metrics.json`` below ``run_dir`` into one mapping keyed by folder."""
    merged = {}
    for path in sorted(run_dir.rglob("metrics.json")):
        if path.parent == run_dir:
            continue
        merged[str(path.parent.relative_to(run_dir))] = json.loads(path.read_text())
    (run_dir / "metrics.json").write_text(json.dumps(merged, indent=1, default=str))
    return merged


def write_report(run_dir: Path, executed: list[Path], info: dict) -> Path:
    """One self-contained HTML: run facts, then every executed notebook (images embedded)."""
    from nbconvert import HTMLExporter

    cells = [nbformat.v4.new_markdown_cell(
        f"# Run `{run_dir.name}`\n\n" + "\n".join(f"- **{k}**: `{v}`" for k, v in info.items()
                                                 if k not in ("stages",)) +
        "\n\n| notebook | status | seconds |\n|---|---|---|\n" +
        "\n".join(f"| {s['notebook']} | {s['status']} | {s['seconds']:.0f} |" for s in info["stages"]))]
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        cells.append(nbformat.v4.new_markdown_cell(f"---\n# Notebook `{path.name}`"))
        cells.extend(nb.cells)
    report = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3",
                                                                          "display_name": "Python 3",
                                                                          "language": "python"}})
    html, _ = HTMLExporter(template_name="lab").from_notebook_node(report)
    out = run_dir / "report.html"
    out.write_text(html, encoding="utf-8")
    return out


def _resume_dir(profile: str, run_id: str | None, seed: int) -> tuple[Path, dict]:
    """The run folder to continue and its ``run.json``; refuses another profile or seed (that is a new run)."""
    if not run_id:
        raise ValueError("--resume needs the run id to continue")
    run_dir = config.RUNS / run_id
    path = run_dir / "run.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run to resume")
    info = json.loads(path.read_text())
    if (info.get("profile"), info.get("seed")) != (profile, seed):
        raise ValueError(f"{run_dir.name} was run with profile {info.get('profile')!r} and seed {info.get('seed')}; "
                         f"resuming with {profile!r} / {seed} would mix two runs: start a new one")
    return run_dir, info


def _finished(info: dict) -> set[str]:
    """Notebooks whose last attempt in this run succeeded."""
    last = {s["notebook"]: s["status"] for s in info.get("stages", [])}
    return {nb for nb, status in last.items() if status == "ok"}


def run(profile: str = "demo", only: list[str] | None = None, run_id: str | None = None,
        seed: int = config.DEFAULT_SEED, kernel: str = "python3", resume: bool = False) -> Path:
    """Execute the notebooks into a new run folder (or finish ``run_id`` with ``resume``); raise after writing
    the report if one fails."""
    import papermill as pm

    attempt = {"commit": _git_commit(), "started": dt.datetime.now().isoformat(timespec="seconds")}
    if resume:
        run_dir, info = _resume_dir(profile, run_id, seed)
        info.setdefault("resumed", []).append(attempt)
    else:
        run_dir = new_run_dir(profile, run_id)
        info = {"profile": profile, "seed": seed, "commit": attempt["commit"], "python": platform.python_version(),
                "started": attempt["started"], "stages": []}
    nb_dir = run_dir / "notebooks"
    nb_dir.mkdir(exist_ok=True)
    done = _finished(info)
    executed = [nb_dir / name for name in sorted(done)]
    failure = None
    for nb in notebooks(only):
        if nb.name in done:
            print(f"[pipeline] {nb.name} finished in an earlier attempt: kept", flush=True)
            continue
        params = {**profile_parameters(nb, profile), "profile": profile, "seed": seed, "run_dir": str(run_dir)}
        out = nb_dir / nb.name
        if out.exists():  # this run's failed attempt: kept beside the new one
            k = len(list(nb_dir.glob(f"{nb.stem}.failed*.ipynb"))) + 1
            out.rename(nb_dir / f"{nb.stem}.failed{k}.ipynb")
        print(f"[pipeline] {nb.name} ({profile}) ...", flush=True)
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(nb), str(out), parameters=params, kernel_name=kernel, cwd=str(config.NOTEBOOKS),
                                progress_bar=False, log_output=False)
            status = "ok"
        except pm.PapermillExecutionError as exc:
            status, failure = "failed", exc
            print(f"[pipeline] {nb.name} FAILED in cell {exc.exec_count}:\n{exc.source}\n{exc.ename}: {exc.evalue}",
                  file=sys.stderr)
        seconds = time.perf_counter() - t0
        info["stages"].append({"notebook": nb.name, "status": status, "seconds": round(seconds, 1),
                               "commit": attempt["commit"]})
        executed.append(out)
        print(f"[pipeline] {nb.name} {status} in {seconds:.0f} s", flush=True)
        if failure:
            break
    info["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    (run_dir / "run.json").write_text(json.dumps(info, indent=1))
    merge_metrics(run_dir)
    report = write_report(run_dir, sorted(executed), info)  # stage order, earlier attempts' stages included
    print(f"[pipeline] report: {report}")
    if failure:
        raise SystemExit(f"run {run_dir.name} failed at {nb.name}: {failure.ename}: {failure.evalue}; finish it with "
                         f"--resume --run-id {run_dir.name} once fixed")
    return run_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="demo", choices=["smoke", "demo", "full"])
    ap.add_argument("--only", nargs="*", help="notebook numbers to run, e.g. 00 01")
    ap.add_argument("--run-id", default=None)
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    ap.add_argument("--resume", action="store_true", help="finish the existing run --run-id (same profile and seed)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(args.profile, args.only, args.run_id, args.seed, resume=args.resume)


if __name__ == "__main__":
    main()
