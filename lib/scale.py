"""Labels and cohort statistics for very large cohorts, in chunks, in bounded memory.

Why: a cohort of hundreds of thousands of studies must not become one table in one process. Here a cohort
is a sequence of chunks; each chunk is generated (synthetic studies and their reports, from ``lib.synth`` and
``lib.synth_text``), labelled (``lib.reports``) and reduced to additive counts and sums on whichever worker
runs it (``lib.cluster``), and only those small summaries travel and are merged. Memory is that of a few
chunks whatever the number of studies; the result is the same for any chunk order or scheduler.

A summary is a dict of ``pandas.Series``: ``*_sum`` entries add, ``*_min`` / ``*_max`` entries combine by
minimum / maximum (:func:`merge_summaries`); :func:`summary_tables` turns one into readable tables.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from lib import cluster, config, reports, synth
from lib.eda import report_stats
from lib.synth_text import report_text

#: Studies per chunk: a chunk of reports labels in seconds and holds a few MB.
CHUNK = 1000
#: Report length histogram: bins of this many characters.
LENGTH_BIN = 50
VALUE_NAMES = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}
_LESION_COLUMNS = ["study_id", "lesion_id", "organ", "finding", "centre_mm", "diameter_mm", "voxels"]


def study_chunk(k: int, size: int, seed: int = config.DEFAULT_SEED, profile: str = "demo") -> pd.DataFrame:
    """Chunk ``k`` of a synthetic cohort: ``size`` studies (``lib.synth.draw_patients`` with its own seed).

    Ids carry the chunk number (``C00012_P0003_S1``), so chunks never share a patient and any chunk can be
    generated alone, in any process.
    """
    spec = replace(synth.PROFILES[profile], n_patients=size, seed=_chunk_seed(seed, k))
    studies = synth.draw_patients(spec).head(size).copy()
    prefix = f"C{k:05d}_"
    studies["patient_id"] = prefix + studies["patient_id"]
    studies["study_id"] = prefix + studies["study_id"]
    return studies.reset_index(drop=True)


def _chunk_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def report_chunk(studies: pd.DataFrame, langs: Sequence[str] = ("ja",), seed: int = config.DEFAULT_SEED,
                 profile: str = "demo") -> pd.DataFrame:
    """Reports (study_id, patient_id, lang, text) of a chunk's studies, with comparisons to the prior study.

    No volumes are rendered, so reports carry no lesion measurements; everything else (hedges, negations,
    reading errors, outside findings) is as in the generated cohorts.
    """
    spec = replace(synth.PROFILES[profile], seed=seed)
    lesions = pd.DataFrame(columns=_LESION_COLUMNS)
    rows, prior = [], {}
    for st in studies.sort_values(["patient_id", "study_index"]).itertuples(index=False):
        study = pd.Series(st._asdict())
        for lang in langs:
            rows.append({"study_id": st.study_id, "patient_id": st.patient_id, "lang": lang,
                         "text": report_text(study, lesions, prior.get(st.patient_id), lang, spec)})
        prior[st.patient_id] = st.study_date
    return pd.DataFrame(rows, columns=["study_id", "patient_id", "lang", "text"])


def summarise_chunk(k: int, size: int, seed: int = config.DEFAULT_SEED, langs: Sequence[str] = ("ja",),
                    vocabulary: str = "abdominal-ct", profile: str = "demo") -> dict[str, pd.Series]:
    """Generate, label and summarise chunk ``k`` (a worker's job); only the summary leaves the worker.

    The summary also holds the CPU seconds the chunk took and the worker's peak resident memory, so a run
    reports its own cost.
    """
    cpu0 = time.process_time()
    studies = study_chunk(k, size, seed, profile)
    texts = report_chunk(studies, langs, seed, profile)
    out = study_summary(studies)
    for lang in langs:
        mine = texts[texts.lang == lang]
        labels, evidence = reports.label_reports_with_evidence(list(mine.text), vocabulary, lang,
                                                               list(mine.study_id))
        out = merge_summaries(out, label_summary_counts(labels, evidence, lang))
    cost = {"cost_sum": pd.Series({"cpu_s": time.process_time() - cpu0}),
            "workers_max": pd.Series({"peak_rss_mib": _peak_rss_mib()})}
    return {**merge_summaries(out, length_summary(texts)), **cost}


def _peak_rss_mib() -> float:
    """Peak resident memory of this process (the worker): part of the summary, so a run reports it."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def study_summary(studies: pd.DataFrame) -> dict[str, pd.Series]:
    """Counts and sums over studies: number, patients, age, sex and the (true) prevalence of each finding."""
    cols = [c for c in synth.LABEL_COLUMNS if c in studies]
    sums = {"studies": len(studies), "patients": studies.patient_id.nunique(), "age": studies.age.sum(),
            "age_sq": (studies.age.astype(float) ** 2).sum(), "female": (studies.sex == "F").sum(),
            **{f"has_{c}": studies[c].sum() for c in cols}}
    return {"studies_sum": pd.Series(sums, dtype=float),
            "studies_min": pd.Series({"age": studies.age.min()}, dtype=float),
            "studies_max": pd.Series({"age": studies.age.max()}, dtype=float)}


def label_summary_counts(labels: pd.DataFrame, evidence: pd.DataFrame, lang: str) -> dict[str, pd.Series]:
    """Reports per (lang, label, value) with value positive/negative/uncertain/blank, and mentions per assertion."""
    counts = {}
    for col in labels.columns:
        values = labels[col].map(VALUE_NAMES).fillna("blank").value_counts()
        for value, n in values.items():
            counts[(lang, col, value)] = n
    assertions = evidence.groupby("assertion").size() if len(evidence) else pd.Series(dtype=float)
    return {"labels_sum": pd.Series(counts, dtype=float),
            "assertions_sum": pd.Series({(lang, a): n for a, n in assertions.items()}, dtype=float),
            "reports_sum": pd.Series({(lang, "reports"): len(labels),
                                      (lang, "unusable"): len(labels.attrs.get("unusable", []))}, dtype=float)}


def length_summary(texts: pd.DataFrame) -> dict[str, pd.Series]:
    """Report length in characters and sentences (``lib.eda.report_stats``): sums, extremes, histogram."""
    stats = report_stats(texts)
    out: dict[str, pd.Series] = {"length_sum": {}, "length_min": {}, "length_max": {}, "length_hist_sum": {}}
    for lang, g in stats.groupby("lang"):
        for col in ("characters", "sentences"):
            v = g[col].astype(float)
            out["length_sum"][(lang, col)] = v.sum()
            out["length_sum"][(lang, f"{col}_sq")] = (v ** 2).sum()
            out["length_min"][(lang, col)] = v.min()
            out["length_max"][(lang, col)] = v.max()
        for b, n in (g.characters // LENGTH_BIN * LENGTH_BIN).value_counts().items():
            out["length_hist_sum"][(lang, int(b))] = n
    return {k: pd.Series(v, dtype=float) for k, v in out.items()}


def merge_summaries(a: dict[str, pd.Series], b: dict[str, pd.Series]) -> dict[str, pd.Series]:
    """One summary from two: sums add, minima and maxima combine (missing entries count as absent)."""
    out = dict(a)
    for key, s in b.items():
        if key not in out:
            out[key] = s
        elif key.endswith("_min"):
            out[key] = out[key].combine(s, min, fill_value=np.inf) if len(s) else out[key]
        elif key.endswith("_max"):
            out[key] = out[key].combine(s, max, fill_value=-np.inf) if len(s) else out[key]
        else:
            out[key] = out[key].add(s, fill_value=0)
    return out


def chunk_jobs(n_studies: int, chunk: int, seed: int, langs: Sequence[str], vocabulary: str,
               profile: str) -> Iterator[tuple]:
    """Arguments of :func:`summarise_chunk` for every chunk, generated lazily."""
    for k, start in enumerate(range(0, n_studies, chunk)):
        yield (k, min(chunk, n_studies - start), seed, tuple(langs), vocabulary, profile)


def stream_summary(n_studies: int, chunk: int = CHUNK, seed: int = config.DEFAULT_SEED,
                   langs: Sequence[str] = ("ja",), vocabulary: str = "abdominal-ct", profile: str = "demo", *,
                   scheduler: str | None = None, workers: int | None = None, progress: bool = True
                   ) -> dict[str, pd.Series]:
    """Summary of ``n_studies`` synthetic studies and their reports, chunk by chunk on ``scheduler``."""
    total: dict[str, pd.Series] = {}
    n_chunks = -(-n_studies // chunk)
    for _, part in cluster.imap(summarise_chunk, chunk_jobs(n_studies, chunk, seed, langs, vocabulary, profile),
                                scheduler=scheduler, workers=workers, total=n_chunks, desc="chunks",
                                progress=progress, preload=("lib.scale",)):
        total = merge_summaries(total, part)
    return total


def summary_tables(summary: dict[str, pd.Series]) -> dict[str, pd.DataFrame]:
    """Readable tables: label fractions per language, report length per language, study statistics."""
    lab = summary["labels_sum"].rename("reports")
    lab.index = pd.MultiIndex.from_tuples(lab.index, names=["lang", "label", "value"])
    labels = lab.unstack("value", fill_value=0)
    labels = labels.div(labels.sum(axis=1), axis=0).round(4)
    ls, lmin, lmax = summary["length_sum"], summary["length_min"], summary["length_max"]
    rows = []
    for lang in sorted({k[0] for k in ls.index}):
        n = summary["reports_sum"][(lang, "reports")]
        for col in ("characters", "sentences"):
            mean = ls[(lang, col)] / n
            sd = float(np.sqrt(max(ls[(lang, f"{col}_sq")] / n - mean ** 2, 0.0)))
            rows.append({"lang": lang, "measure": col, "reports": int(n), "mean": round(mean, 2),
                         "std": round(sd, 2), "min": lmin[(lang, col)], "max": lmax[(lang, col)]})
    st = summary["studies_sum"]
    n = st["studies"]
    studies = pd.DataFrame([{"studies": int(n), "patients": int(st["patients"]),
                             "age_mean": round(st["age"] / n, 2),
                             "age_std": round(float(np.sqrt(st["age_sq"] / n - (st["age"] / n) ** 2)), 2),
                             "age_min": summary["studies_min"]["age"], "age_max": summary["studies_max"]["age"],
                             "female": round(st["female"] / n, 4)}])
    prevalence = (st[[k for k in st.index if k.startswith("has_")]] / n).rename(lambda k: k[4:]).round(4)
    return {"labels": labels, "lengths": pd.DataFrame(rows), "studies": studies,
            "prevalence": prevalence.rename("prevalence").to_frame()}
