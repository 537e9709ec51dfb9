"""Benchmark: crop stage on a Dask cluster, cases/s with 1 and 2 workers and the scaling efficiency.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_cluster.py --profile demo

For each worker count a ``LocalCluster`` (single-threaded worker processes) is started, then
``lib.crop.crop_cohort(..., scheduler=<its address>)`` crops every case of the cohort into a fresh folder;
the timed span is the crop stage alone (cluster start-up is printed separately). Inputs are read once
before timing so every run starts from a warm page cache. Scaling efficiency = (cases/s with n workers) /
(n x cases/s with 1 worker), from the best of ``--repeat`` interleaved rounds. Also measured: the workers'
peak resident memory and CPU seconds (``getrusage`` in each worker), input and output bytes per case: the
per-case figures ``docs/scale.md`` extrapolates from. Figures and the machine's load are written to ``--out``
(a results source, ``lib.results``); on a shared machine other jobs lower both throughput and efficiency, so
the load averages are recorded beside them.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lib import config, crop, resources, synth
from lib.io import write_json
from lib.results import git_commit


def _peak_rss_mib() -> float:
    """Peak resident memory of the calling process (runs inside each Dask worker)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    """User + system CPU seconds of the calling process so far (runs inside each Dask worker)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def results_source(raw: dict, commit: str, date: str) -> dict:
    """A ``docs/results/*.json`` source (schema: :mod:`lib.results`) from this benchmark's measurements."""
    best = {r["workers"]: r for r in raw["best"]}
    m, pc = raw["machine"], raw["per_case"]
    figures = []
    for n, r in best.items():
        figures += [{"name": f"{n} worker(s): throughput (best of {raw['repeat']})", "value": r["cases_per_s"],
                     "unit": "cases/s"},
                    {"name": f"{n} worker(s): worker CPU per case", "value": r["cpu_s_per_case"], "unit": "s"}]
        if n > 1 and r.get("scaling_efficiency") is not None:
            figures.append({"name": f"{n} workers: scaling efficiency (wall clock)", "value": r["scaling_efficiency"]})
    figures += [{"name": "input per case (.nii.gz CT + masks)", "value": pc["input_bytes"], "unit": "bytes"},
                {"name": "output per case (npz samples + manifest)", "value": pc["output_bytes"], "unit": "bytes"},
                {"name": "worker peak resident memory", "value": pc["worker_peak_rss_mib"], "unit": "MiB"}]
    rows = [[r["workers"], r["cases"], r["seconds"], r["cases_per_s"], r["cpu_s_per_case"], r["cluster_startup_s"],
             r["worker_peak_rss_mib"], f"{r['loadavg_1min_before_after'][0]} / {r['loadavg_1min_before_after'][1]}"]
            for r in raw["rounds"]]
    return {"title": f"Crop stage on a Dask LocalCluster, {raw['profile']} cohort ({raw['mode']}, "
                     f"{len(raw['structures'])} structures)",
            "command": raw["command"], "commit": commit, "date": date,
            "machine": f"{m['cpus']} CPU cores ({m['cpu_model']}), no GPU, shared with other jobs",
            "notes": ["Cluster start-up is not in the timed span. Other processes shared the cores (1-minute load "
                      "in the table), so wall-clock throughput and efficiency are pessimistic; worker CPU seconds per "
                      "case are what other load hardly changes."],
            "figures": figures,
            "tables": [{"title": "every round (interleaved)", "columns": [
                "workers", "cases", "wall s", "cases/s", "worker CPU s per case", "cluster start s",
                "worker peak RSS MiB", "load 1 min before / after"], "rows": rows}]}


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def run_once(cases, structures: list[str], n_workers: int, mode: str) -> dict:  # noqa: ANN001 (case table)
    """Start a LocalCluster of ``n_workers``, crop every case through it, return the measured figures."""
    from distributed import Client, LocalCluster

    out = Path(tempfile.mkdtemp(prefix=f"bench_cluster_{n_workers}_"))
    try:
        t0 = time.perf_counter()
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          host="127.0.0.1", env=resources.thread_env(1)) as lc, Client(lc) as client:
            startup = time.perf_counter() - t0
            load0 = os.getloadavg()
            cpu0 = client.run(_cpu_seconds)
            w0 = time.perf_counter()
            index, skipped = crop.crop_cohort(cases, structures, out, mode=mode, scheduler=lc.scheduler_address,
                                              progress=False)
            wall = time.perf_counter() - w0
            load1 = os.getloadavg()
            rss = client.run(_peak_rss_mib)
            cpu = sum(client.run(_cpu_seconds).values()) - sum(cpu0.values())
        assert index.attrs["computed"] == len(cases), "every case must be computed (fresh folder)"
        return {"workers": n_workers, "cases": len(cases), "crops": len(index), "skipped": len(skipped),
                "seconds": round(wall, 2), "cases_per_s": round(len(cases) / wall, 3),
                "worker_cpu_s": round(cpu, 2), "cpu_s_per_case": round(cpu / len(cases), 4),
                "cluster_startup_s": round(startup, 2), "worker_peak_rss_mib": round(max(rss.values()), 1),
                "output_bytes": _tree_bytes(out), "loadavg_1min_before_after": [round(load0[0], 2),
                                                                                round(load1[0], 2)]}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo", choices=sorted(synth.PROFILES))
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    ap.add_argument("--cases", type=int, default=0, help="first N cases of the cohort (0: all)")
    ap.add_argument("--mode", default="bbox", choices=crop.MODES)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=2, help="interleaved rounds; the best wall time of each counts")
    ap.add_argument("--out", type=Path, default=config.ROOT / "docs" / "results" / "cluster-scaling.json")
    args = ap.parse_args(argv)

    cases = crop.discover_cases(synth.ensure_cohort(args.profile, args.seed))
    cases = cases.head(args.cases) if args.cases else cases
    structures = list(crop.DEFAULT_STRUCTURES)
    inputs = [Path(p) for c in ("image", "mask", "lesion") for p in cases[c] if p]
    in_bytes = sum(p.stat().st_size for p in inputs)
    for p in inputs:  # warm the page cache: every run reads the same files from memory
        p.read_bytes()
    print(f"{len(cases)} cases of the {args.profile} cohort ({in_bytes / 1e6:.1f} MB .nii.gz), "
          f"{len(structures)} structures, mode {args.mode}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    rounds = []
    for _ in range(args.repeat):  # interleaved (1, 2, 1, 2, ...): load from other jobs hits every count alike
        for n in args.workers:
            r = run_once(cases, structures, n, args.mode)
            rounds.append(r)
            print(f"{n} worker(s): {r['cases_per_s']:.2f} cases/s ({r['seconds']:.1f} s for {r['cases']} cases, "
                  f"{r['crops']} crops; {r['cpu_s_per_case']:.3f} worker CPU-s per case; cluster start "
                  f"{r['cluster_startup_s']:.1f} s; worker peak RSS {r['worker_peak_rss_mib']:.0f} MiB; "
                  f"load {r['loadavg_1min_before_after']})")
    runs = [dict(min((r for r in rounds if r["workers"] == n), key=lambda r: r["seconds"])) for n in args.workers]
    base = next((r for r in runs if r["workers"] == 1), None)
    for r in runs:
        r["scaling_efficiency"] = (round(r["cases_per_s"] / (r["workers"] * base["cases_per_s"]), 3)
                                   if base else None)
        if base and r["workers"] > 1:
            print(f"scaling efficiency at {r['workers']} workers: {r['scaling_efficiency']:.0%}")
    per_case = {"input_bytes": round(in_bytes / len(cases)),
                "output_bytes": round(runs[0]["output_bytes"] / len(cases)),
                "worker_seconds": round(base["seconds"] / len(cases), 3) if base else None,
                "worker_cpu_seconds": min(r["cpu_s_per_case"] for r in runs),
                "worker_peak_rss_mib": max(r["worker_peak_rss_mib"] for r in runs)}
    print(f"per case: {per_case['input_bytes'] / 1e6:.2f} MB in, {per_case['output_bytes'] / 1e6:.3f} MB out, "
          f"{per_case['worker_seconds']} worker wall-seconds, {per_case['worker_cpu_seconds']} worker CPU-seconds")
    result = {"command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
              "machine": {"cpus": os.cpu_count(), "cpu_model": _cpu_model(), "python": platform.python_version(),
                          "platform": platform.platform(),
                          "shared": "other processes shared the cores; see the 1-minute load per run"},
              "profile": args.profile, "mode": args.mode, "structures": structures, "per_case": per_case,
              "repeat": args.repeat, "best": runs, "rounds": rounds}
    write_json(args.out, results_source(result, git_commit(), time.strftime("%Y-%m-%d", time.gmtime())))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
