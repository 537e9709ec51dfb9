"""Throughput of lib.reports.label_reports on synthetic reports (one core).

Why: relabelling a whole archive after a vocabulary edit must take minutes, not days (the CheXpert
labeler runs at about 3 reports/s). Generates N synthetic abdominal-CT reports per language with
lib.synth_text (text only, no volumes), labels them and prints reports/s and sentences/s.

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_reports.py [--n 10000] [--lang en ja] [--seed S]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import config, reports, synth, synth_text  # noqa: E402


def synthetic_texts(n: int, lang: str, seed: int) -> list[str]:
    """n report texts in ``lang`` drawn like the synthetic cohort (findings, hedges, negations...)."""
    spec = replace(synth.PROFILES["demo"], n_patients=max(1, n // 2 + 1), seed=seed)
    studies = synth.draw_patients(spec).head(n)
    no_lesions = pd.DataFrame(columns=["study_id", "organ", "finding", "diameter_mm"])
    return [synth_text.report_text(st, no_lesions, None, lang, spec) for _, st in studies.iterrows()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--lang", nargs="+", default=["en", "ja"])
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    ap.add_argument("--vocabulary", default="abdominal-ct")
    args = ap.parse_args(argv)
    reports.load_vocabulary(args.vocabulary)  # compile once, outside the timing
    print(f"{args.n} synthetic reports per language; wall time and process CPU time (the CPU figure is what one core\n"
          "does when other processes share the machine)")
    for lang in args.lang:
        texts = synthetic_texts(args.n, lang, args.seed)
        n_sent = sum(len(reports.split_sentences(t, lang)) for t in texts)
        t0, c0 = time.perf_counter(), time.process_time()
        labels = reports.label_reports(texts, args.vocabulary, lang)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        chars = sum(map(len, texts)) / len(texts)
        print(f"{lang}: {len(texts)} reports, {n_sent} sentences, {chars:.0f} chars/report; "
              f"wall {dt:.2f} s -> {len(texts) / dt:,.0f} reports/s, {n_sent / dt:,.0f} sentences/s; "
              f"CPU {dc:.2f} s -> {len(texts) / dc:,.0f} reports/s, {n_sent / dc:,.0f} sentences/s "
              f"({int(labels.notna().any(axis=1).sum())} reports with labels)")


if __name__ == "__main__":
    main()
