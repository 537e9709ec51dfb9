"""Benchmark: report labels and cohort statistics of 100,000 synthetic studies in bounded memory.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_scale.py --studies 100000 --workers 2

Studies and their reports are generated on the fly in chunks (``lib.scale``: ``lib.synth`` findings,
``lib.synth_text`` reports), labelled with ``lib.reports`` and reduced to counts on the worker; nothing is
written and no table of the whole cohort exists. Prints throughput (studies/s, reports/s) and the peak
resident memory (``resource.getrusage``) of this process as the run advances and of the largest worker
process, then the summary tables. ``--out`` writes the figures as a results source (``lib.results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

from lib import cluster, config, scale
from lib.io import write_json
from lib.results import git_commit


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(who).ru_maxrss / 1024


def results_source(raw: dict, commit: str, date: str) -> dict:
    """A ``docs/results/*.json`` source (schema: :mod:`lib.results`) from this benchmark's measurements."""
    f, m = raw["figures"], raw["machine"]
    figures = [{"name": "studies (one report each)", "value": f["studies"]},
               {"name": "throughput", "value": f["studies_per_s"], "unit": "studies/s"},
               {"name": "CPU per study (generation, labelling, statistics)", "value": f["cpu_ms_per_study"],
                "unit": "ms"},
               {"name": "peak resident memory of this process at start", "value": f["peak_rss_mib_at_start"],
                "unit": "MiB"},
               {"name": "peak resident memory of this process at the end", "value": f["peak_rss_mib"], "unit": "MiB"},
               {"name": "peak resident memory of the largest worker", "value": f["peak_rss_mib_workers"],
                "unit": "MiB"}]
    trace = [[t["studies"], t["seconds"], t["peak_rss_mib"]] for t in f["trace"]]
    labels = [[r["lang"], r["label"], *(r.get(v, 0.0) for v in ("positive", "uncertain", "negative", "blank"))]
              for r in raw["label_fractions"]]
    return {"title": f"Report labels and cohort statistics of {f['studies']:,} synthetic studies in chunks",
            "command": raw["command"], "commit": commit, "date": date,
            "machine": f"{m['cpus']} CPU cores, no GPU, shared with other jobs (1-minute load "
                       f"{m['loadavg_1min_start']} at the start, {m['loadavg_1min_end']} at the end)",
            "notes": [f"Chunks of {raw['chunk']} studies, languages {', '.join(raw['langs'])}, generated, labelled and "
                      f"summarised on the worker; nothing is written and no whole-cohort table exists. Wall-clock "
                      f"throughput depends on the other jobs; CPU per study much less.",
                      "Statistics: per study the count, patients, age (mean, sd, min, max), share of women and the "
                      "prevalence of each finding; per report the length in characters and sentences (mean, sd, "
                      "min, max, histogram), the label values and the assertions. The image statistics of notebook "
                      "00 (geometry, organ volume and HU per case) need rendered volumes and are not part of it."],
            "figures": figures,
            "tables": [{"title": "peak resident memory as the run advances", "columns": [
                "studies", "seconds", "peak RSS MiB"], "rows": trace},
                {"title": "label fractions", "columns": ["lang", "label", "positive", "uncertain", "negative", "blank"],
                 "rows": labels}]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=scale.CHUNK, help="studies per chunk (one task)")
    ap.add_argument("--langs", nargs="+", default=["ja"], choices=["en", "ja"])
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    ap.add_argument("--workers", type=int, default=None, help="local process pool size (default: granted cores)")
    ap.add_argument("--scheduler", default=None, help="None, local or a Dask scheduler address")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    args = ap.parse_args(argv)

    n_chunks = -(-args.studies // args.chunk)
    jobs = scale.chunk_jobs(args.studies, args.chunk, args.seed, args.langs, "abdominal-ct", "demo")
    start_rss = peak_rss_mib()
    start_load = round(os.getloadavg()[0], 2)
    print(f"{args.studies} studies in {n_chunks} chunks of {args.chunk}, languages {args.langs}, scheduler "
          f"{args.scheduler or 'local process pool'}; peak RSS at start {start_rss:.0f} MiB; "
          f"load {start_load:.2f}")
    total: dict = {}
    trace = []
    t0 = time.perf_counter()
    parts = cluster.imap(scale.summarise_chunk, jobs, scheduler=args.scheduler, workers=args.workers, total=n_chunks,
                         progress=False, preload=("lib.scale",))
    for done, (_, part) in enumerate(parts, start=1):
        total = scale.merge_summaries(total, part)
        if done % max(1, n_chunks // 10) == 0 or done == n_chunks:
            studies = int(total["studies_sum"]["studies"])
            elapsed = time.perf_counter() - t0
            trace.append({"studies": studies, "seconds": round(elapsed, 1), "peak_rss_mib": round(peak_rss_mib(), 1)})
            print(f"  {studies:>7} studies  {elapsed:7.1f} s  {studies / elapsed:7.1f} studies/s  "
                  f"peak RSS {peak_rss_mib():.0f} MiB")
    seconds = time.perf_counter() - t0
    reports = int(sum(v for k, v in total["reports_sum"].items() if k[1] == "reports"))
    workers_rss = float(total["workers_max"]["peak_rss_mib"])  # measured in each worker, merged by maximum
    cpu_s = float(total["cost_sum"]["cpu_s"])  # CPU seconds of the chunk jobs: what other load does not inflate
    tables = scale.summary_tables(total)
    figures = {"studies": int(total["studies_sum"]["studies"]), "reports": reports, "seconds": round(seconds, 1),
               "studies_per_s": round(total["studies_sum"]["studies"] / seconds, 1),
               "reports_per_s": round(reports / seconds, 1), "cpu_s": round(cpu_s, 1),
               "cpu_ms_per_study": round(1000 * cpu_s / total["studies_sum"]["studies"], 3),
               "peak_rss_mib": round(peak_rss_mib(), 1),
               "peak_rss_mib_at_start": round(start_rss, 1), "peak_rss_mib_workers": round(workers_rss, 1),
               "trace": trace}
    print(f"{figures['studies']} studies, {reports} reports in {seconds:.1f} s: {figures['studies_per_s']} "
          f"studies/s, {figures['reports_per_s']} reports/s; {figures['cpu_ms_per_study']} CPU-ms per study")
    print(f"peak RSS {figures['peak_rss_mib']:.0f} MiB (this process, {start_rss:.0f} MiB at start), "
          f"{workers_rss:.0f} MiB (largest worker process)")
    for name, table in tables.items():
        print(f"\n{name}\n{table.head(12).to_string()}")
    if args.out:
        result = {"command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
                  "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "platform": platform.platform(), "loadavg_1min_start": start_load,
                              "loadavg_1min_end": round(os.getloadavg()[0], 2),
                              "shared": "other processes shared the cores"},
                  "chunk": args.chunk, "langs": args.langs, "workers": args.workers, "scheduler": args.scheduler,
                  "figures": figures, "label_fractions": json.loads(tables["labels"].reset_index().to_json(
                      orient="records"))}
        write_json(args.out, results_source(result, git_commit(), time.strftime("%Y-%m-%d", time.gmtime())))
        print(f"wrote {args.out}")
    return figures


if __name__ == "__main__":
    main()
