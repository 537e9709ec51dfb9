"""Throughput of lib.reports: synthetic reports per second, or NegEx sentences per second against negspacy / medspacy.

Why: relabelling a whole archive after a vocabulary edit must take minutes, not days (the CheXpert labeler runs at
about 3 reports/s), and the rule engine must stay clearly faster than the reference NegEx implementation while
being more accurate.

Default mode: generates N synthetic abdominal-CT reports per language with lib.synth_text (text only, no volumes),
labels them and prints reports/s and sentences/s.

``--vs negspacy``: installs negspacy (and medspacy with ``--medspacy``) from PyPI into throw-away virtualenvs under the
temp folder (or ``--venv DIR``), one per system, then, in one run, alternates repetitions of
``lib.reports.assertion`` and of negspacy's NegEx (medspacy's ConText) on the same NegEx test-kit sentences. The
reference systems run in worker processes of their own; each side times only its own loop (CPU time of its
process, and wall time). Every pass of ours starts with the concept caches cleared. spaCy gets the concept as the
document's one entity (a blank English pipeline with a sentencizer: no model to download); negation precision,
recall and F1 are scored for every system.

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_reports.py [--n 10000] [--lang en ja] [--seed S]
       OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_reports.py --vs negspacy [--medspacy] [--reps 7]
           [--json docs/results/raw/reports-speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import config, reports, synth, synth_text  # noqa: E402

PINS = {"negspacy": ["negspacy==1.1.0"], "medspacy": ["medspacy==1.3.1", "numpy<2"]}

# Runs inside the throw-away virtualenv: builds the pipelines once, then answers one command per line on stdin
# ("negspacy" / "medspacy": label every sentence once) with a JSON line (CPU and wall seconds, predictions).
WORKER = r'''
import csv, json, sys, time
import spacy
rows = list(csv.reader(open(sys.argv[1], encoding="utf-8"), delimiter="\t"))
systems = {}
versions = {"spacy": spacy.__version__}
if "negspacy" in sys.argv[2:]:
    import negspacy
    from negspacy.negation import Negex  # noqa: F401  (registers the "negex" factory)
    from negspacy.termsets import termset
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.add_pipe("negex", config={"neg_termset": termset("en_clinical").get_patterns()})
    systems["negspacy"] = (nlp, "negex")
    versions["negspacy"] = getattr(negspacy, "__version__", "1.1.0")
if "medspacy" in sys.argv[2:]:
    import medspacy
    mnlp = spacy.blank("en")
    mnlp.add_pipe("sentencizer")
    mnlp.add_pipe("medspacy_context")
    systems["medspacy"] = (mnlp, "is_negated")
    versions["medspacy"] = medspacy.__version__

def run(nlp, attr):
    pipes = [p for _, p in nlp.pipeline]
    out = []
    for concept, sentence in rows:
        doc = nlp.make_doc(sentence)
        i = sentence.lower().find(concept.lower())
        if i >= 0:
            span = doc.char_span(i, i + len(concept), label="CONCEPT", alignment_mode="expand")
            if span is not None:
                doc.ents = [span]
        for p in pipes:
            doc = p(doc)
        out.append(any(getattr(e._, attr) for e in doc.ents))
    return out

print(json.dumps({"ready": True, "versions": versions}), flush=True)
for line in sys.stdin:
    if not line.strip():
        break
    name, passes = line.split()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(int(passes)):
        pred = run(*systems[name])
    print(json.dumps({"cpu": time.process_time() - c0, "wall": time.perf_counter() - t0, "pred": pred}), flush=True)
'''


def synthetic_texts(n: int, lang: str, seed: int) -> list[str]:
    """n report texts in ``lang`` drawn like the synthetic cohort (findings, hedges, negations...)."""
    spec = replace(synth.PROFILES["demo"], n_patients=max(1, n // 2 + 1), seed=seed)
    studies = synth.draw_patients(spec).head(n)
    no_lesions = pd.DataFrame(columns=["study_id", "organ", "finding", "diameter_mm"])
    return [synth_text.report_text(st, no_lesions, None, lang, spec) for _, st in studies.iterrows()]


def bench_synthetic(args: argparse.Namespace) -> None:
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


# ----------------------------------------------------------------------------- versus negspacy / medspacy


def make_venv(path: Path, systems: list[str]) -> Path:
    """A virtualenv at ``path`` holding the reference systems (uv when available, else venv + pip)."""
    py = path / "bin" / "python"
    packages = [p for s in systems for p in PINS[s]]
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if Path(uv).exists():
        if not py.exists():
            subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(path)], check=True)
        subprocess.run([uv, "pip", "install", "-q", "--python", str(py), *packages], check=True)
    else:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *packages], check=True)
    return py


def negation_f1(pred: list[bool], gold: list[bool]) -> dict[str, float]:
    tp = sum(p and g for p, g in zip(pred, gold, strict=True))
    prec, rec = tp / max(sum(pred), 1), tp / max(sum(gold), 1)
    return {"precision": prec, "recall": rec, "f1": 2 * tp / max(sum(pred) + sum(gold), 1)}


def _ours(rows: list[tuple[str, str]], passes: int) -> tuple[float, float, list[bool]]:
    cpu = wall = 0.0
    for _ in range(passes):
        reports._concept_words.cache_clear()  # every pass pays for its concepts, as a first sight would
        reports._words_regex.cache_clear()
        c0, t0 = time.process_time(), time.perf_counter()
        pred = [reports.assertion(s, c, "en") == "negated" for c, s in rows]
        cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - t0
    return cpu, wall, pred


def bench_versus(args: argparse.Namespace) -> None:
    systems = ["negspacy"] + (["medspacy"] if args.medspacy else [])
    df = pd.read_csv(args.data, sep="\t")
    rows = list(zip(df.iloc[:, 1].astype(str), df.iloc[:, 2].astype(str), strict=True))
    gold = (df.iloc[:, 3].str.lower() == "negated").tolist()
    tmp = Path(tempfile.mkdtemp(prefix="bench-reports-"))
    venvs = args.venv or tmp / "venvs"
    sents = tmp / "sentences.tsv"
    rows = [(c.replace("\t", " ").replace("\n", " "), s.replace("\t", " ").replace("\n", " ")) for c, s in rows]
    sents.write_text("".join(f"{c}\t{s}\n" for c, s in rows), encoding="utf-8")
    worker = tmp / "worker.py"
    worker.write_text(WORKER, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    procs, versions = {}, {}
    for name in systems:  # one virtualenv each: medspacy and negspacy pin different spaCy versions
        print(f"installing {' '.join(PINS[name])} into {venvs / name} ...", flush=True)
        py = make_venv(venvs / name, [name])
        procs[name] = subprocess.Popen([str(py), str(worker), str(sents), name], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env)
        versions[name] = json.loads(procs[name].stdout.readline())["versions"]
    reports.assertion("warm-up", "warm", "en")  # trigger tables compiled outside the timing
    names = ["lib.reports", *systems]
    n_done = len(rows) * args.passes  # sentences labelled per repetition
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    preds: dict[str, list[bool]] = {}
    for rep in range(args.reps):
        order = names if rep % 2 == 0 else names[::-1]  # alternate who goes first
        for name in order:
            if name == "lib.reports":
                cpu, wall, pred = _ours(rows, args.passes)
            else:
                procs[name].stdin.write(f"{name} {args.passes}\n")
                procs[name].stdin.flush()
                reply = json.loads(procs[name].stdout.readline())
                cpu, wall, pred = reply["cpu"], reply["wall"], reply["pred"]
            times[name].append((cpu, wall))
            preds[name] = pred
        print(f"  repetition {rep + 1}/{args.reps}: " + ", ".join(
            f"{n} {n_done / times[n][-1][0]:,.0f}/s" for n in names), flush=True)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    result: dict = {"command": " ".join(["python", "scripts/bench_reports.py", *sys.argv[1:]]),
                    "machine": {"host": platform.node(), "platform": platform.platform(),
                                "processor": platform.processor(), "cpus": os.cpu_count(),
                                "python": platform.python_version(),
                                "load_average": list(os.getloadavg())},
                    "sentences": len(rows), "passes_per_repetition": args.passes, "repetitions": args.reps,
                    "versions": versions, "systems": {}}
    print(f"\n{len(rows)} NegEx sentences x {args.passes} passes x {args.reps} alternating repetitions; sentences/s "
          "from the CPU time of each system's own process (median [min, max]), wall in brackets;\n"
          "negation precision / recall / F1")
    for n in names:
        cpu_rates = [n_done / c for c, _ in times[n]]
        wall_rates = [n_done / w for _, w in times[n]]
        f = negation_f1(preds[n], gold)
        result["systems"][n] = {"sentences_per_s_cpu": cpu_rates, "sentences_per_s_wall": wall_rates,
                                "median_cpu": statistics.median(cpu_rates),
                                "median_wall": statistics.median(wall_rates), **f}
        print(f"  {n:12s} {statistics.median(cpu_rates):8,.0f}/s [{min(cpu_rates):,.0f}, {max(cpu_rates):,.0f}] "
              f"(wall {statistics.median(wall_rates):,.0f}/s)  P {f['precision']:.3f} R {f['recall']:.3f} "
              f"F1 {f['f1']:.3f}")
    ours = result["systems"]["lib.reports"]
    for n in systems:
        paired = [c_ref / c_ours for (c_ours, _), (c_ref, _) in zip(times["lib.reports"], times[n], strict=True)]
        result["systems"][n]["speed_ratio_ours_per_rep"] = paired
        result["systems"][n]["speed_ratio_median"] = statistics.median(paired)
        print(f"  lib.reports / {n}: {statistics.median(paired):.2f}x sentences/s (per-repetition pairs "
              f"{min(paired):.2f}-{max(paired):.2f}), F1 {ours['f1']:.3f} vs {result['systems'][n]['f1']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.venv is None:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--lang", nargs="+", default=["en", "ja"])
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    ap.add_argument("--vocabulary", default="abdominal-ct")
    ap.add_argument("--vs", choices=["negspacy"], help="compare with negspacy on the NegEx sentences")
    ap.add_argument("--medspacy", action="store_true", help="with --vs: medspacy's ConText too")
    ap.add_argument("--reps", type=int, default=7, help="with --vs: alternating repetitions")
    ap.add_argument("--passes", type=int, default=5, help="with --vs: passes over the sentences per repetition")
    ap.add_argument("--venv", type=Path, help="with --vs: keep the virtualenvs in this folder (reused next time)")
    ap.add_argument("--data", type=Path, default=config.shared_path("reports", "negex-annotations-dev.tsv"))
    ap.add_argument("--json", type=Path, help="with --vs: write the figures here")
    args = ap.parse_args(argv)
    if args.vs:
        if not args.data.exists():
            sys.exit(f"NegEx sentences not found: {args.data}")
        bench_versus(args)
    else:
        bench_synthetic(args)


if __name__ == "__main__":
    main()
