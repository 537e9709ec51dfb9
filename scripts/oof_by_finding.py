"""Out-of-fold AUC of a synthetic-cohort k-fold run per underlying finding (positives of one finding vs normal organs).

Why: ``{organ}_abnormal`` mixes diffuse findings (fatty liver, hepatomegaly) with focal lesions (cysts, masses); the
pooled AUC does not say which of them a model detects. Reads ``oof.csv`` of ``lib.kfold`` and the cohort's
``ground_truth/labels.csv``.

    python scripts/oof_by_finding.py outputs/runs/<run>/kfold/model --profile demo [--organ liver]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib import config, synth  # noqa: E402


def by_finding(oof: pd.DataFrame, truth: pd.DataFrame, organ: str) -> pd.DataFrame:
    """One row per finding of ``organ``: positives, normal organs and the AUC of ``prob_<organ>_abnormal``."""
    merged = oof.assign(study_id=oof["case_id"]).merge(truth, on="study_id")
    prob = merged[f"prob_{organ}_abnormal"].to_numpy()
    normal = merged[f"{organ}_abnormal"].to_numpy() == 0
    rows = []
    for finding in synth.FINDINGS[organ]:
        pos = merged[f"{organ}_{finding}"].to_numpy() == 1
        y = np.r_[np.ones(pos.sum()), np.zeros(normal.sum())]
        auc = roc_auc_score(y, np.r_[prob[pos], prob[normal]]) if pos.any() and normal.any() else float("nan")
        rows.append({"finding": finding, "positives": int(pos.sum()), "normal": int(normal.sum()), "auc": auc})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kfold_dir", type=Path)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    ap.add_argument("--organ", default="liver")
    args = ap.parse_args(argv)
    truth = pd.read_csv(synth.cohort_dir(args.profile, args.seed) / "ground_truth" / "labels.csv")
    print(by_finding(pd.read_csv(args.kfold_dir / "oof.csv"), truth, args.organ).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
