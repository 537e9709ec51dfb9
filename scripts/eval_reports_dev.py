"""Figures for lib.reports on real text (../shared/data/reports) and on the annotated clause sets, before vs after.

Why a script: the README's figures must be reproducible by anyone with the data, and a rule change must be judged
on text it was not tuned on. Prints, for the labeller at ``--before REV`` (a git revision, default ``main``) and
the working tree, side by side:
  * per assertion class (affirmed / negated / possible = uncertain): precision and recall with 95 % bootstrap
    intervals (resampling reports, or sentences where a set has no reports), on
      - the annotated clause-chaining sentences ``tests/data/report-clauses-{ja,en}.tsv``;
      - MedTxt-RR (Japanese) dev and held-out parts: every gold positive finding found verbatim in its report,
        read in each sentence naming it (the most positive reading counts); gold holds positives only, so
        only the affirmed recall and the share of findings turned into possible / negated are defined;
      - the NegEx test kit (gold affirmed / negated; a 'possible' reading counts as affirmed);
  * IU chest X-ray: "No Finding" vs Problems == "normal" and per-finding agreement with MeSH terms.

The MedTxt-RR held-out part is fixed by a rule on the report's content hash (``held_out``), listed in
``tests/data/medtxt-rr-heldout-ids.txt``; its errors are never printed (``--errors`` shows dev-part errors only).
``--json PATH`` writes every figure with the command and machine.

Usage: .venv/bin/python scripts/eval_reports_dev.py [--data DIR] [--before REV] [--errors N] [--json PATH]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, cohen_kappa_score, precision_recall_fscore_support

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib import config, reports  # noqa: E402

CLASSES = ("affirmed", "negated", "possible")
HELD_OUT_IDS = ROOT / "tests" / "data" / "medtxt-rr-heldout-ids.txt"
ANNOTATED = {"ja": ROOT / "tests" / "data" / "report-clauses-ja.tsv",
             "en": ROOT / "tests" / "data" / "report-clauses-en.tsv"}
N_BOOT = 2000

# CheXpert column -> IU MeSH/Problems terms that name it (a report is positive when any term is listed).
IU_TERMS: dict[str, list[str]] = {
    "Cardiomegaly": ["Cardiomegaly"],
    # CheXpert counts blunting of the costophrenic angle as effusion; MeSH files it as "Costophrenic Angle"
    "Pleural Effusion": ["Pleural Effusion", "Costophrenic Angle"],
    "Atelectasis": ["Pulmonary Atelectasis", "Atelectasis"],
    "Edema": ["Pulmonary Edema", "Edema", "Pulmonary Congestion"],
    "Pneumothorax": ["Pneumothorax"],
    "Consolidation": ["Consolidation"],
    "Lung Opacity": ["Opacity", "Airspace Disease", "Infiltrate", "Consolidation", "Density"],
    "Pneumonia": ["Pneumonia"],
    "Lung Lesion": ["Nodule", "Mass", "Lung Neoplasms"],
    "Fracture": ["Fractures, Bone"],
    "Support Devices": ["Catheters, Indwelling", "Implanted Medical Device", "Medical Device", "Tube, Inserted",
                        "Pacemaker, Artificial", "Stents", "Surgical Instruments"],  # clips, sternal wires
}


# ----------------------------------------------------------------------------- the MedTxt-RR split


def report_id(text: str) -> str:
    """A report's id: the first 12 hex digits of the SHA-256 of its NFKC text (the corpus file has no ids)."""
    return hashlib.sha256(unicodedata.normalize("NFKC", text).strip().encode("utf-8")).hexdigest()[:12]


def held_out(rid: str) -> bool:
    """The held-out rule, fixed before any rule was tuned: one report in three by content hash."""
    return int(rid, 16) % 3 == 0


def check_split(ids: list[str], path: Path = HELD_OUT_IDS) -> None:
    """Refuse to run when the committed held-out list and the rule disagree (data or rule changed)."""
    listed = {x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip() and x[0] != "#"}
    ruled = {i for i in ids if held_out(i)}
    if listed != ruled:
        sys.exit(f"{path}: held-out ids differ from the rule (listed only: {sorted(listed - ruled)}, "
                 f"rule only: {sorted(ruled - listed)})")


# ----------------------------------------------------------------------------- labellers


def labeller_at(rev: str) -> ModuleType:
    """lib/reports.py and lib/vocab/ as committed at ``rev``, imported as a module of their own."""
    tmp = Path(tempfile.mkdtemp(prefix="reports-before-"))
    (tmp / "vocab").mkdir()
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "lib/vocab/"],
                           check=True, capture_output=True, text=True).stdout.split()
    for name in names:
        blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], check=True, capture_output=True)
        (tmp / "vocab" / Path(name).name).write_bytes(blob.stdout)
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:lib/reports.py"], check=True, capture_output=True)
    (tmp / "reports_before.py").write_bytes(src.stdout)
    spec = importlib.util.spec_from_file_location("reports_before", tmp / "reports_before.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    mod._tmpdir = tmp  # removed by main()
    return mod


# ----------------------------------------------------------------------------- metrics


def class_metrics(groups: np.ndarray, gold: list[str], pred: list[str], seed: int) -> dict:
    """Per class: precision and recall with 95 % bootstrap intervals, resampling ``groups`` (reports)."""
    _, g = np.unique(groups, return_inverse=True)
    n = int(g.max()) + 1 if len(g) else 0
    gold_a, pred_a = np.asarray(gold), np.asarray(pred)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1 / n), size=N_BOOT) if n else np.zeros((N_BOOT, 0))
    out = {}
    for c in CLASSES:
        per = np.zeros((n, 3))  # tp, predicted, gold per group
        np.add.at(per, g, np.stack([(pred_a == c) & (gold_a == c), pred_a == c, gold_a == c], axis=1))
        tot = per.sum(0)
        boot = weights @ per
        row = {"n_gold": int(tot[2]), "n_pred": int(tot[1])}
        for name, den in (("precision", 1), ("recall", 2)):
            row[name] = float(tot[0] / tot[den]) if tot[den] else None
            with np.errstate(invalid="ignore", divide="ignore"):
                b = boot[:, 0] / boot[:, den]
            b = b[np.isfinite(b)]
            row[f"{name}_ci"] = [float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))] if len(b) else None
        out[c] = row
    out["accuracy"] = float((gold_a == pred_a).mean()) if len(gold_a) else None
    out["n"] = len(gold_a)
    out["groups"] = n
    return out


def _fmt(row: dict, name: str) -> str:
    v, ci = row[name], row[f"{name}_ci"]
    return "  n/a " if v is None else f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def print_classes(title: str, results: dict[str, dict]) -> None:
    print(title)
    for who, m in results.items():
        print(f"  {who:6s} accuracy {m['accuracy']:.3f} (n={m['n']}, {m['groups']} resampled units)")
        for c in CLASSES:
            r = m[c]
            print(f"    {c:8s} gold {r['n_gold']:4d} pred {r['n_pred']:4d}  precision {_fmt(r, 'precision')}  "
                  f"recall {_fmt(r, 'recall')}")


# ----------------------------------------------------------------------------- sets


def annotated(mod: ModuleType, path: Path, lang: str, show_errors: int = 0) -> tuple[list, list, list]:
    df = pd.read_csv(path, sep="\t", comment="#", dtype=str, keep_default_na=False)
    pred = [mod.assertion(s, f, lang) for s, f in zip(df["sentence"], df["finding"], strict=True)]
    if show_errors:
        wrong = [(r, p) for r, p in zip(df.itertuples(), pred, strict=True) if p != r.assertion]
        for r, p in wrong[:show_errors]:
            print(f"  [{r.assertion} -> {p}] {r.finding!r}: {r.sentence}")
    return df["sentence"].tolist(), df["assertion"].tolist(), pred


def medtxt(mod: ModuleType, df: pd.DataFrame, show_errors: int = 0) -> tuple[list, list, list]:
    """(report id, 'affirmed', reading) per gold positive finding found verbatim in its report."""
    groups, gold, pred = [], [], []
    for report, findings in zip(df["report"], df["positive_findings"], strict=True):
        rid = report_id(report)
        for concept in ast.literal_eval(findings):
            if concept not in report:
                continue
            sents = [report[s.start:s.end] for s in mod.split_sentences(report, "ja")
                     if concept in report[s.start:s.end]] or [report]
            results = [mod.assertion(sent, concept, "ja") for sent in sents]
            best = max(results, key=lambda r: {"affirmed": 2, "possible": 1, "negated": 0}[r])
            groups.append(rid)
            gold.append("affirmed")
            pred.append(best)
            if show_errors and best != "affirmed":
                print(f"  [affirmed -> {best}] {concept!r}: {sents!r}")
    return groups, gold, pred


def negex(mod: ModuleType, df: pd.DataFrame, show_errors: int = 0) -> tuple[list, list, list, float]:
    cond, sent, status = df.columns[1], df.columns[2], df.columns[3]
    t0 = time.perf_counter()
    raw = [mod.assertion(s, c, "en") for s, c in zip(df[sent], df[cond], strict=True)]
    rate = len(df) / (time.perf_counter() - t0)
    pred = ["negated" if x == "negated" else "affirmed" for x in raw]
    gold = df[status].str.lower().tolist()
    if show_errors:
        wrong = [r for r, p in zip(df.itertuples(index=False), pred, strict=True) if p != r[3].lower()]
        for r in wrong[:show_errors]:
            print(f"  [{r[3]}] {r[1]!r}: {r[2][:220]!r}")
    return list(range(len(df))), gold, pred, rate


def iu(mod: ModuleType, path: Path, seed: int, show_errors: int = 0) -> tuple[dict, pd.DataFrame]:
    df = pd.read_csv(path)
    text = (df["findings"].fillna("") + "\n" + df["impression"].fillna("")).str.strip()
    usable = text.str.len() > 0
    df, text = df[usable].reset_index(drop=True), text[usable].reset_index(drop=True)
    t0 = time.perf_counter()
    lab = mod.label_reports(text.tolist(), "chest-xray", "en")
    dt = time.perf_counter() - t0
    normal = (df["Problems"].fillna("").str.strip().str.lower() == "normal").astype(int).to_numpy()
    nf = (lab["No Finding"] == 1).astype(int).to_numpy()
    p, r, f, _ = precision_recall_fscore_support(normal, nf, average="binary", zero_division=0)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(N_BOOT):
        i = rng.integers(0, len(nf), len(nf))
        tp = (normal[i] & nf[i]).sum()
        boot.append(2 * tp / max(normal[i].sum() + nf[i].sum(), 1))
    summary = {"n": len(df), "no_finding_accuracy": accuracy_score(normal, nf), "no_finding_kappa":
               cohen_kappa_score(normal, nf), "no_finding_precision": p, "no_finding_recall": r,
               "no_finding_f1": f, "no_finding_f1_ci": [float(np.quantile(boot, 0.025)),
                                                        float(np.quantile(boot, 0.975))],
               "reports_per_s": len(df) / dt}
    terms = df["MeSH"].fillna("").str.split(";").apply(lambda xs: {x.split("/")[0].strip() for x in xs})
    rows = []
    for col, names in IU_TERMS.items():
        y = terms.apply(lambda s, names=names: int(bool(s & set(names))))
        for mode, pos in (("1", lab[col] == 1), ("1 or -1", lab[col].isin([1, -1]))):
            pr, rc, f1, _ = precision_recall_fscore_support(y, pos.astype(int), average="binary", zero_division=0)
            rows.append({"label": col, "positive_if": mode, "mesh_positives": int(y.sum()),
                         "labelled": int(pos.sum()), "precision": pr, "recall": rc, "f1": f1,
                         "kappa": cohen_kappa_score(y, pos.astype(int))})
    if show_errors:
        for i in np.flatnonzero(normal != nf)[:show_errors]:
            print(f"  [Problems={df.Problems[i]!r} NoFinding={nf[i]}] {text[i][:300]!r}")
    return summary, pd.DataFrame(rows)


# ----------------------------------------------------------------------------- main


def machine() -> dict:
    return {"host": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=config.shared_path("reports"))
    ap.add_argument("--before", default="main", help="git revision of the 'before' labeller")
    ap.add_argument("--errors", type=int, default=0, help="print this many 'after' errors per set (no held-out)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED, help="bootstrap seed")
    args = ap.parse_args(argv)
    pd.set_option("display.width", 160)
    if not args.data.exists():
        sys.exit(f"dev data not found: {args.data}")
    before = labeller_at(args.before)
    labellers = {"before": before, "after": reports}
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    before_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.before], capture_output=True,
                                text=True).stdout.strip()
    out: dict = {"command": " ".join(["python", "scripts/eval_reports_dev.py", *(argv or sys.argv[1:])]),
                 "machine": machine(), "commit": rev, "before": f"{args.before} ({before_rev})",
                 "after": "working tree", "bootstrap": {"resamples": N_BOOT, "seed": args.seed}, "sets": {}}
    print(f"before = lib/reports.py at {args.before} ({before_rev}); after = working tree at {rev}")

    def run_set(name: str, title: str, fn) -> None:
        res = {}
        for who, mod in labellers.items():
            groups, gold, pred = fn(mod, who)
            res[who] = class_metrics(np.asarray(groups), gold, pred, args.seed)
        out["sets"][name] = res
        print_classes(title, res)

    for lang, path in ANNOTATED.items():
        if path.exists():
            run_set(f"annotated_{lang}", f"Annotated clause sentences ({lang}, {path.name}); unit: sentence",
                    lambda mod, who, p=path, lg=lang: annotated(mod, p, lg, args.errors if who == "after" else 0))

    df = pd.read_csv(args.data / "medtxt-rr-ja-ner-dev.csv")
    ids = [report_id(t) for t in df["report"]]
    check_split(ids)
    held = np.array([held_out(i) for i in ids])
    for part, mask in (("dev", ~held), ("held_out", held)):
        show = args.errors if part == "dev" else 0
        run_set(f"medtxt_{part}", f"MedTxt-RR ja, {part} part ({int(mask.sum())} reports; gold positives only; "
                                  "unit: report)",
                lambda mod, who, m=mask, s=show: medtxt(mod, df[m], s if who == "after" else 0))

    nx = pd.read_csv(args.data / "negex-annotations-dev.tsv", sep="\t")
    rates = {}

    def negex_set(mod: ModuleType, who: str) -> tuple:
        g, gold, pred, rates[who] = negex(mod, nx, args.errors if who == "after" else 0)
        return g, gold, pred

    run_set("negex", f"NegEx test kit, dev part ({len(nx)} sentences; 'possible' counts as affirmed; "
                     "unit: sentence)", negex_set)
    out["sets"]["negex"]["sentences_per_s_in_eval"] = rates

    out["sets"]["iu_xray"] = {}
    for who, mod in labellers.items():
        s, table = iu(mod, args.data / "iu-xray-reports-dev.csv", args.seed, args.errors if who == "after" else 0)
        out["sets"]["iu_xray"][who] = {"summary": s, "per_finding": table.to_dict(orient="records")}
        print(f"IU X-ray dev, {who} (n={s['n']} reports with text): 'No Finding' vs Problems=='normal': accuracy "
              f"{s['no_finding_accuracy']:.3f}, kappa {s['no_finding_kappa']:.3f}, precision "
              f"{s['no_finding_precision']:.3f}, recall {s['no_finding_recall']:.3f}, F1 {s['no_finding_f1']:.3f} "
              f"[{s['no_finding_f1_ci'][0]:.3f}, {s['no_finding_f1_ci'][1]:.3f}]")
        if who == "after":
            print("IU X-ray per-finding agreement with MeSH (after):")
            print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    shutil.rmtree(before._tmpdir, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, ensure_ascii=False, default=float) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
