"""Development-set figures for lib.reports on real text (../shared/data/reports).

Why a script: the README's figures must be reproducible by anyone with the data, and the held-out
parts are measured the same way. Prints:
  * NegEx test kit: accuracy and negation precision/recall/F1 of ``assertion()`` (possible = not negated);
  * IU chest X-ray: agreement of ``label_reports(..., "chest-xray")`` "No Finding" with Problems == "normal",
    and per-finding agreement with the MeSH terms that name CheXpert observations;
  * MedTxt-RR (Japanese): fraction of gold positive findings that ``assertion(..., "ja")`` does not negate.

Usage: .venv/bin/python scripts/eval_reports_dev.py [--data DIR] [--errors N]
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import pandas as pd
from sklearn.metrics import accuracy_score, cohen_kappa_score, precision_recall_fscore_support

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import config, reports  # noqa: E402

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


def negex(path: Path, show_errors: int = 0) -> dict[str, float]:
    df = pd.read_csv(path, sep="\t")
    cond, sent, gold = df.columns[1], df.columns[2], df.columns[3]
    t0 = time.perf_counter()
    pred = [reports.assertion(s, c, "en") for s, c in zip(df[sent], df[cond], strict=True)]
    dt = time.perf_counter() - t0
    y = (df[gold].str.lower() == "negated").astype(int)
    p = pd.Series([int(x == "negated") for x in pred])
    prec, rec, f1, _ = precision_recall_fscore_support(y, p, average="binary", zero_division=0)
    out = {"n": len(df), "accuracy": accuracy_score(y, p), "precision": prec, "recall": rec, "f1": f1,
           "possible": sum(x == "possible" for x in pred), "sentences_per_s": len(df) / dt}
    if show_errors:
        wrong = df[(y != p).to_numpy()]
        for _, r in wrong.head(show_errors).iterrows():
            print(f"  [{r[gold]}] {r[cond]!r}: {r[sent][:220]!r}")
    return out


def iu(path: Path, show_errors: int = 0) -> tuple[dict[str, float], pd.DataFrame]:
    df = pd.read_csv(path)
    text = (df["findings"].fillna("") + "\n" + df["impression"].fillna("")).str.strip()
    usable = text.str.len() > 0
    df, text = df[usable].reset_index(drop=True), text[usable].reset_index(drop=True)
    t0 = time.perf_counter()
    lab = reports.label_reports(text.tolist(), "chest-xray", "en")
    dt = time.perf_counter() - t0
    normal = (df["Problems"].fillna("").str.strip().str.lower() == "normal").astype(int)
    nf = (lab["No Finding"] == 1).astype(int)
    p, r, f, _ = precision_recall_fscore_support(normal, nf, average="binary", zero_division=0)
    summary = {"n": len(df), "no_finding_accuracy": accuracy_score(normal, nf), "no_finding_kappa":
               cohen_kappa_score(normal, nf), "no_finding_precision": p, "no_finding_recall": r,
               "no_finding_f1": f, "reports_per_s": len(df) / dt}
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
        for i in df.index[(normal != nf)][:show_errors]:
            print(f"  [Problems={df.Problems[i]!r} NoFinding={nf[i]}] {text[i][:300]!r}")
    return summary, pd.DataFrame(rows)


def medtxt(path: Path, show_errors: int = 0) -> dict[str, float]:
    df = pd.read_csv(path)
    n = kept = missing = 0
    for report, gold in zip(df["report"], df["positive_findings"], strict=True):
        for concept in ast.literal_eval(gold):
            if concept not in report:
                missing += 1
                continue
            # gold says the finding is present somewhere: it counts when any sentence naming it is not negated
            sents = [report[s.start:s.end] for s in reports.split_sentences(report, "ja")
                     if concept in report[s.start:s.end]] or [report]
            results = [reports.assertion(sent, concept, "ja") for sent in sents]
            n += 1
            kept += any(a != "negated" for a in results)
            if all(a == "negated" for a in results) and show_errors:
                print(f"  negated gold positive {concept!r}: {sents!r}")
    return {"reports": len(df), "gold_findings": n, "not_negated": kept / max(n, 1), "not_found_in_text": missing}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=config.shared_path("reports"))
    ap.add_argument("--errors", type=int, default=0, help="print this many errors per set")
    args = ap.parse_args(argv)
    pd.set_option("display.width", 160)
    if not args.data.exists():
        sys.exit(f"dev data not found: {args.data}")
    ng = negex(args.data / "negex-annotations-dev.tsv", args.errors)
    print(f"NegEx dev (n={ng['n']}): accuracy {ng['accuracy']:.3f}, negation precision {ng['precision']:.3f} "
          f"recall {ng['recall']:.3f} F1 {ng['f1']:.3f} ({ng['possible']} 'possible'; "
          f"{ng['sentences_per_s']:.0f} sentences/s)")
    s, table = iu(args.data / "iu-xray-reports-dev.csv", args.errors)
    print(f"IU X-ray dev (n={s['n']} reports with text): 'No Finding' vs Problems=='normal': accuracy "
          f"{s['no_finding_accuracy']:.3f}, kappa {s['no_finding_kappa']:.3f}, precision "
          f"{s['no_finding_precision']:.3f}, recall {s['no_finding_recall']:.3f}, F1 {s['no_finding_f1']:.3f} "
          f"({s['reports_per_s']:.0f} reports/s)")
    print("IU X-ray per-finding agreement with MeSH:")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    mt = medtxt(args.data / "medtxt-rr-ja-ner-dev.csv", args.errors)
    print(f"MedTxt-RR ja dev ({mt['reports']} reports): {mt['not_negated']:.3f} of {mt['gold_findings']} gold "
          f"positive findings not negated ({mt['not_found_in_text']} gold strings not found verbatim)")


if __name__ == "__main__":
    main()
