"""Evaluation of out-of-fold predictions: numbers with uncertainty, figures, and fold ensembles.

Why: one AUC without an interval says little on 250 images, a 0.5 threshold hides the
sensitivity/specificity trade-off, and a well-ranked model can still be badly calibrated. Every
number comes from sklearn; this module adds the bootstrap CI, the expected calibration error, the
handling of edge cases (one class only -> NaN with a warning, not a crash) and a JSON-safe summary.

Out-of-fold table convention (``oof_columns``): ``fold`` column; binary and multi-label use
``true_<name>`` (1/0; -1 or blank = unknown, ignored) and ``prob_<name>``; multi-class uses ``y_true``
(class index 0..K-1) and ``prob_<class>`` per class.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from lib import config
from lib.io import to_jsonable, write_json

TASKS = ("binary", "multiclass", "multilabel")
N_BOOT = 1000
N_BINS = 10


class MetricWarning(UserWarning):
    """A metric is undefined for this input (e.g. AUC with one class) and was reported as NaN."""


# ----------------------------------------------------------------------------- input checks


def _check_binary(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    """1-D arrays of equal, non-zero length; probabilities finite. Unknown labels (-1, NaN) dropped."""
    y = np.asarray(y_true, dtype=float).ravel()
    p = np.asarray(y_prob, dtype=float).ravel()
    if y.size == 0:
        raise ValueError("empty input: no predictions to evaluate")
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but y_prob has {p.size}")
    if not np.isfinite(p).all():
        raise ValueError(f"{int((~np.isfinite(p)).sum())} non-finite probabilities")
    known = np.isin(y, (0.0, 1.0))
    unexpected = ~known & ~np.isnan(y) & (y != -1)
    if unexpected.any():
        raise ValueError(f"binary labels must be 0/1 (-1 or NaN = unknown), got {sorted(set(y[unexpected]))[:5]}")
    if not known.any():
        raise ValueError("empty input: every label is unknown (-1 or blank)")
    return y[known].astype(int), p[known]


def _single_class(y: np.ndarray, what: str) -> bool:
    if len(np.unique(y)) < 2:
        warnings.warn(f"{what} undefined: y_true holds only class {np.unique(y).tolist()}; reported as NaN",
                      MetricWarning, stacklevel=3)
        return True
    return False


# ----------------------------------------------------------------------------- binary building blocks


def safe_auc(y_true, y_prob) -> float:
    """ROC AUC, or NaN (with a ``MetricWarning``) when only one class is present."""
    y, p = _check_binary(y_true, y_prob)
    return math.nan if _single_class(y, "ROC AUC") else float(roc_auc_score(y, p))


def safe_ap(y_true, y_prob) -> float:
    """Average precision (area under the PR curve, sklearn's step-wise sum); NaN without positives."""
    y, p = _check_binary(y_true, y_prob)
    return math.nan if _single_class(y, "average precision") else float(average_precision_score(y, p))


def bootstrap_weights(y: np.ndarray, n_boot: int, seed: int = config.DEFAULT_SEED,
                      groups=None) -> np.ndarray:
    """Stratified bootstrap as counts: ``W[b, i]`` = how often row i is drawn in replicate b.

    Without groups each class is resampled apart (class counts fixed, so AUC is always defined).
    With ``groups`` whole groups are drawn (a patient's images stay together), stratified by the
    group's highest label; class counts then vary a little between replicates. Counts instead of
    index lists let the metrics below score all replicates with a few array operations.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed % 2**32)
    if groups is None:
        codes = np.arange(len(y))
        unit_label = y
    else:
        codes = pd.factorize(pd.Series(np.asarray(groups, dtype=object).ravel()))[0]
        unit_label = pd.Series(y).groupby(codes).max().to_numpy()
    unit_counts = np.zeros((n_boot, len(unit_label)), dtype=np.int32)
    for c in np.unique(unit_label):
        members = np.flatnonzero(unit_label == c)
        unit_counts[:, members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)), n_boot)
    return unit_counts[:, codes]


def _blocks(y: np.ndarray, p: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight per distinct score (ascending), per replicate: (n_boot, n_scores) each."""
    order = np.argsort(p, kind="stable")
    ps, ys, Ws = p[order], y[order], W[:, order].astype(float)
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    return np.add.reduceat(Ws * ys, starts, axis=1), np.add.reduceat(Ws * (1 - ys), starts, axis=1)


def _auc_weighted(y: np.ndarray, p: np.ndarray, W: np.ndarray) -> np.ndarray:
    """ROC AUC per replicate (row of counts W): P(score_pos > score_neg) + half the ties, as sklearn."""
    pos, neg = _blocks(y, p, W)
    below = np.cumsum(neg, 1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))


def _ap_weighted(y: np.ndarray, p: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Average precision per replicate, as sklearn: sum over thresholds of recall gain x precision."""
    pos, neg = _blocks(y, p, W)
    pos, neg = pos[:, ::-1], neg[:, ::-1]  # descending thresholds
    tp, fp = np.cumsum(pos, 1), np.cumsum(neg, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-12), 0.0)
        return (pos * precision).sum(1) / pos.sum(1)


def bootstrap_ci(y_true, y_prob, metric: Callable | str = "auc", n_boot: int = N_BOOT,
                 seed: int = config.DEFAULT_SEED, ci: float = 0.95, groups=None) -> tuple[float, float]:
    """Percentile ``ci`` interval of ``metric`` over a stratified bootstrap (seeded: same seed, same CI).

    ``metric`` is ``"auc"``, ``"ap"`` (vectorised, equal to sklearn's values; tested) or any
    ``f(y_true, y_prob) -> float`` (called per replicate). Replicates where the metric is undefined are
    dropped; (NaN, NaN) when it is undefined on the data. ``groups`` (patient or duplicate ids, aligned
    with ``y_true``) switches to a cluster bootstrap.
    """
    y_raw = np.asarray(y_true, dtype=float).ravel()
    y, p = _check_binary(y_true, y_prob)
    if groups is not None:
        groups = np.asarray(groups, dtype=object).ravel()[np.isin(y_raw, (0.0, 1.0))]
    if len(np.unique(y)) < 2 or n_boot < 1:
        return (math.nan, math.nan)
    W = bootstrap_weights(y, n_boot, seed, groups)
    fast = {"auc": _auc_weighted, "ap": _ap_weighted}
    if isinstance(metric, str):
        if metric not in fast:
            raise ValueError(f"unknown metric {metric!r}: use 'auc', 'ap' or a callable")
        vals = np.concatenate([fast[metric](y, p, W[k:k + 200]) for k in range(0, n_boot, 200)])
    else:
        rows = np.arange(len(y))
        vals = []
        for w in W:
            i = np.repeat(rows, w)
            vals.append(metric(y[i], p[i]) if len(np.unique(y[i])) == 2 else np.nan)
        vals = np.asarray(vals, dtype=float)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(vals, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
    return (float(lo), float(hi))


def _macro_f1_weighted(y: np.ndarray, pred: np.ndarray, W: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 per replicate from weighted confusion counts (F1 of an absent class = 0, as zero_division=0)."""
    f1s = []
    for k in range(n_classes):
        tp = W @ ((y == k) & (pred == k)).astype(float)
        fp = W @ ((y != k) & (pred == k)).astype(float)
        fn = W @ ((y == k) & (pred != k)).astype(float)
        den = 2 * tp + fp + fn
        f1s.append(np.where(den > 0, 2 * tp / np.maximum(den, 1e-12), 0.0))
    return np.mean(f1s, axis=0)


def calibration_bins(y_true, y_prob, n_bins: int = N_BINS) -> pd.DataFrame:
    """Reliability table over ``n_bins`` equal-width bins of [0, 1] (sklearn's ``strategy='uniform'``).

    Bin b holds probabilities in (edge_b, edge_b+1] (the first bin also holds 0), exactly as
    ``sklearn.calibration.calibration_curve`` bins them. Empty bins are dropped.
    """
    y, p = _check_binary(y_true, y_prob)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], p)
    frame = pd.DataFrame({"bin": ids, "y": y, "p": p})
    out = frame.groupby("bin").agg(count=("y", "size"), mean_prob=("p", "mean"), frac_pos=("y", "mean"))
    out["lower"], out["upper"] = edges[out.index], edges[out.index + 1]
    return out.reset_index()[["bin", "lower", "upper", "count", "mean_prob", "frac_pos"]]


def expected_calibration_error(y_true, y_prob, n_bins: int = N_BINS) -> float:
    """ECE = sum over equal-width bins of (bin count / N) * |mean predicted prob - observed positive rate|.

    0 for a perfectly calibrated model; equals the mean absolute gap of the reliability diagram,
    weighted by how many predictions fall in each bin. Equal-width bins (not equal-mass) so the value
    matches the diagram ``plot_calibration`` draws; with few samples per bin it is biased upwards.
    """
    table = calibration_bins(y_true, y_prob, n_bins)
    weight = table["count"] / table["count"].sum()
    return float((weight * (table["mean_prob"] - table["frac_pos"]).abs()).sum())


def threshold_metrics(y_true, y_prob, threshold: float = 0.5) -> dict:
    """Confusion matrix and the rates derived from it, predicting positive when ``prob >= threshold``."""
    y, p = _check_binary(y_true, y_prob)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    ratio = lambda a, b: a / b if b else math.nan
    return {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn),
            "accuracy": float(accuracy_score(y, pred)), "f1": float(f1_score(y, pred, zero_division=0)),
            "confusion": [[tn, fp], [fn, tp]]}


def binary_metrics(y_true, y_prob, threshold: float = 0.5, n_boot: int = N_BOOT, seed: int = config.DEFAULT_SEED,
                   n_bins: int = N_BINS, groups=None) -> dict:
    """All binary numbers: AUC + bootstrap CI, AP + CI, threshold metrics, Brier, ECE."""
    y, p = _check_binary(y_true, y_prob)
    out = {"n": int(len(y)), "n_pos": int(y.sum()), "n_neg": int(len(y) - y.sum()),
           "n_unknown": int(np.asarray(y_true, dtype=float).size - len(y)),
           "auc": safe_auc(y_true, y_prob),
           "auc_ci": list(bootstrap_ci(y_true, y_prob, "auc", n_boot, seed, groups=groups)),
           "ap": safe_ap(y_true, y_prob),
           "ap_ci": list(bootstrap_ci(y_true, y_prob, "ap", n_boot, seed, groups=groups)),
           "prevalence": float(y.mean()), "ci_level": 0.95, "n_boot": int(n_boot)}
    out.update(threshold_metrics(y_true, y_prob, threshold))
    out["brier"] = float(brier_score_loss(y, p, labels=[0, 1]))
    out["ece"] = expected_calibration_error(y_true, y_prob, n_bins)
    out["ece_bins"] = int(n_bins)
    if groups is not None:
        out["n_groups"] = int(pd.Series(np.asarray(groups, dtype=object).ravel()).nunique())
    return out


# ----------------------------------------------------------------------------- multi-class / multi-label


def _check_multiclass(y_true, y_prob, label_names: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray, list]:
    p = np.asarray(y_prob, dtype=float)
    y_arr = np.asarray(y_true).ravel()
    if y_arr.size == 0 or p.size == 0:
        raise ValueError("empty input: no predictions to evaluate")
    if p.ndim != 2 or p.shape[0] != y_arr.size:
        raise ValueError(f"y_prob must be (n, n_classes) with n = {y_arr.size}, got {p.shape}")
    names = list(label_names) if label_names is not None else [str(k) for k in range(p.shape[1])]
    if len(names) != p.shape[1]:
        raise ValueError(f"{len(names)} label names for {p.shape[1]} probability columns")
    if y_arr.dtype.kind in "OUS":  # class names -> indices
        lookup = {n: k for k, n in enumerate(names)}
        unknown = sorted({str(v) for v in y_arr if v not in lookup})
        if unknown:
            raise ValueError(f"labels {unknown[:5]} not in label_names {names}")
        y_arr = np.array([lookup[v] for v in y_arr])
    y = y_arr.astype(int)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"class indices must be in 0..{p.shape[1] - 1}, got {y.min()}..{y.max()}")
    if not np.isfinite(p).all():
        raise ValueError(f"{int((~np.isfinite(p)).sum())} non-finite probabilities")
    return y, p, names


def multiclass_metrics(y_true, y_prob, label_names: Sequence[str] | None = None, n_boot: int = N_BOOT,
                       seed: int = config.DEFAULT_SEED, n_bins: int = N_BINS, groups=None) -> dict:
    """Accuracy, macro-F1 (+ bootstrap CI), one-vs-rest AUC per class and macro, confusion matrix, top-label ECE.

    Prediction = argmax. The ECE here is the top-label (confidence) ECE: max probability vs correct.
    """
    y, p, names = _check_multiclass(y_true, y_prob, label_names)
    pred = p.argmax(1)
    labels = list(range(len(names)))
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    macro_f1 = float(f1_score(y, pred, labels=labels, average="macro", zero_division=0))
    per_class = {}
    for k, name in enumerate(names):
        yk = (y == k).astype(int)
        per_class[name] = {"support": int(support[k]), "precision": float(prec[k]), "recall": float(rec[k]),
                           "f1": float(f1[k]), "auc": safe_auc(yk, p[:, k]),
                           "specificity": float(((pred != k) & (yk == 0)).sum() / max((yk == 0).sum(), 1))}
    aucs = [c["auc"] for c in per_class.values()]
    g = None if groups is None else np.asarray(groups, dtype=object).ravel()
    f1_boot = _macro_f1_weighted(y, pred, bootstrap_weights(y, n_boot, seed, g), len(names)) if n_boot else []
    out = {"n": int(len(y)), "accuracy": float(accuracy_score(y, pred)), "macro_f1": macro_f1,
           "macro_f1_ci": [float(v) for v in np.percentile(f1_boot, [2.5, 97.5])] if n_boot else [math.nan] * 2,
           "macro_auc": float(np.nanmean(aucs)) if not np.isnan(aucs).all() else math.nan,
           "per_class": per_class, "label_names": names,
           "confusion": confusion_matrix(y, pred, labels=labels).tolist(),
           "ece": expected_calibration_error((pred == y).astype(int), p.max(1), n_bins), "ece_bins": int(n_bins),
           "ci_level": 0.95, "n_boot": int(n_boot)}
    if groups is not None:
        out["n_groups"] = int(pd.Series(np.asarray(groups, dtype=object).ravel()).nunique())
    return out


def multilabel_metrics(y_true, y_prob, label_names: Sequence[str] | None = None, threshold: float = 0.5,
                       n_boot: int = N_BOOT, seed: int = config.DEFAULT_SEED, n_bins: int = N_BINS,
                       groups=None) -> dict:
    """Per-label binary metrics (unknown labels -1/NaN ignored per label) and their macro means."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(y_prob, dtype=float)
    if y.size == 0:
        raise ValueError("empty input: no predictions to evaluate")
    y, p = y.reshape(len(y), -1), p.reshape(len(p), -1)
    if y.shape != p.shape:
        raise ValueError(f"y_true {y.shape} and y_prob {p.shape} differ")
    names = list(label_names) if label_names is not None else [str(k) for k in range(y.shape[1])]
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} label names for {y.shape[1]} label columns")
    per_label = {}
    for j, name in enumerate(names):
        known = np.isin(y[:, j], (0.0, 1.0))
        if not known.any():
            warnings.warn(f"label {name!r}: no known values; skipped", MetricWarning, stacklevel=2)
            continue
        g = None if groups is None else np.asarray(groups, dtype=object).ravel()
        per_label[name] = binary_metrics(y[:, j], p[:, j], threshold, n_boot, seed, n_bins, g)
    means = {k: _nanmean([m[k] for m in per_label.values()]) for k in ("auc", "ap", "sensitivity", "specificity",
                                                                      "f1", "brier", "ece")}
    return {"n": int(len(y)), "label_names": names, "per_label": per_label, "threshold": float(threshold),
            **{f"macro_{k}": v for k, v in means.items()}}


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if arr.size and not np.isnan(arr).all() else math.nan


def per_label_table(summary: dict) -> pd.DataFrame:
    """A multi-label (or multi-class) summary as a table: one row per label/class."""
    rows = summary.get("per_label") or summary.get("per_class") or {}
    keep = ["n", "n_pos", "support", "auc", "auc_ci", "ap", "sensitivity", "specificity", "precision", "recall",
            "f1", "ece", "brier"]
    table = pd.DataFrame({name: {k: m[k] for k in keep if k in m} for name, m in rows.items()}).T
    if "auc_ci" in table:
        ci = table.pop("auc_ci")
        table["auc_lo"], table["auc_hi"] = [c[0] for c in ci], [c[1] for c in ci]
    return table.apply(pd.to_numeric, errors="coerce").rename_axis("label")  # None (undefined) -> NaN


# ----------------------------------------------------------------------------- summaries


def summarize(y_true, y_prob, task: str, label_names: Sequence[str] | None = None, threshold: float = 0.5,
              groups=None, n_boot: int = N_BOOT, seed: int = config.DEFAULT_SEED, n_bins: int = N_BINS) -> dict:
    """Every metric for one set of predictions, JSON-serialisable (NaN -> None) for ``metrics.json``.

    ``task``: ``binary`` (y_prob (n,) or (n, 1), probability of ``label_names[-1]``), ``multiclass``
    (y_true class indices or names, y_prob (n, K)), ``multilabel`` (y_true/y_prob (n, L)). ``groups``
    (patient/duplicate ids) turns the bootstrap into a cluster bootstrap and adds ``n_groups``.
    """
    if task == "binary":
        out = binary_metrics(y_true, y_prob, threshold, n_boot, seed, n_bins, groups)
        out["label"] = list(label_names)[-1] if label_names else "positive"
    elif task == "multiclass":
        out = multiclass_metrics(y_true, y_prob, label_names, n_boot, seed, n_bins, groups)
    elif task == "multilabel":
        out = multilabel_metrics(y_true, y_prob, label_names, threshold, n_boot, seed, n_bins, groups)
    else:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return to_jsonable({"task": task, **out})


def save_metrics(metrics: dict, path: str | Path) -> Path:
    """Write ``metrics.json`` (strict JSON, indented)."""
    return write_json(path, metrics, indent=2)


def oof_columns(task: str, label_names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(truth columns, probability columns) of an out-of-fold table, per the module convention."""
    names = list(label_names)
    if task == "binary":
        names = names[-1:]
    if task == "multiclass":
        return ["y_true"], [f"prob_{n}" for n in names]
    if task in ("binary", "multilabel"):
        return [f"true_{n}" for n in names], [f"prob_{n}" for n in names]
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def oof_frame(y_true, y_prob, task: str, label_names: Sequence[str], **extra) -> pd.DataFrame:
    """Build an out-of-fold table in the convention above; ``extra`` columns (fold=, path=, group=) first."""
    true_cols, prob_cols = oof_columns(task, label_names)
    p = np.asarray(y_prob, dtype=float).reshape(len(np.asarray(y_prob)), -1)
    y = np.asarray(y_true).reshape(len(p), -1)
    frame = pd.DataFrame({k: np.asarray(v) for k, v in extra.items()}, index=range(len(p)))
    for j, c in enumerate(true_cols):
        frame[c] = y[:, j]
    for j, c in enumerate(prob_cols):
        frame[c] = p[:, j]
    return frame


def oof_arrays(df: pd.DataFrame, task: str, label_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_prob) arrays from an out-of-fold table."""
    true_cols, prob_cols = oof_columns(task, label_names)
    missing = [c for c in true_cols + prob_cols if c not in df.columns]
    if missing:
        raise KeyError(f"out-of-fold table lacks columns {missing} (have {list(df.columns)})")
    y = df[true_cols].to_numpy()
    p = df[prob_cols].to_numpy(dtype=float)
    if task == "multiclass":
        return y[:, 0], p
    return (y[:, 0], p[:, 0]) if task == "binary" else (y.astype(float), p)


SCALARS = ("auc", "ap", "sensitivity", "specificity", "accuracy", "f1", "brier", "ece", "macro_f1", "macro_auc",
           "macro_ap", "dice", "iou", "dice_pos")


def per_fold(df_oof: pd.DataFrame, task: str, label_names: Sequence[str], fold_col: str = "fold",
             threshold: float = 0.5, group_col: str | None = None, n_boot: int = N_BOOT,
             seed: int = config.DEFAULT_SEED, n_bins: int = N_BINS) -> dict:
    """``summarize`` per fold and pooled over all out-of-fold rows, plus the mean and sd across folds.

    ``task='segmentation'``: the table is ``overlap_frame``'s (one row per image) and each part is scored by
    ``overlap_summary`` (mean Dice/IoU with CIs resampling ``group_col``, the patient).

    Pooled = one curve over every out-of-fold prediction (what a single number should report);
    fold mean +- sd shows how much the estimate moves between folds.
    """
    if df_oof is None or len(df_oof) == 0:
        raise ValueError("empty out-of-fold table")
    if fold_col not in df_oof.columns:
        raise KeyError(f"fold column {fold_col!r} not in out-of-fold table")

    def one(frame: pd.DataFrame) -> dict:
        groups = frame[group_col].to_numpy() if group_col else None
        if task == "segmentation":
            return overlap_summary(frame, groups, n_boot, seed)
        y, p = oof_arrays(frame, task, label_names)
        return summarize(y, p, task, label_names, threshold, groups, n_boot, seed, n_bins)

    folds = {str(k): one(frame) for k, frame in df_oof.groupby(fold_col, sort=True)}
    pooled = one(df_oof)
    mean, sd = {}, {}
    for key in SCALARS:
        vals = [f[key] for f in folds.values() if key in f]
        if vals:
            arr = np.array([math.nan if v is None else v for v in vals], dtype=float)
            mean[key], sd[key] = _nanmean(arr), float(np.nanstd(arr, ddof=1)) if np.isfinite(arr).sum() > 1 \
                else math.nan
    return to_jsonable({"task": task, "label_names": list(label_names), "threshold": threshold,
                        "pooled": pooled, "folds": folds, "fold_mean": mean, "fold_sd": sd})


# ----------------------------------------------------------------------------- segmentation overlap


def dice_iou(pred, target) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice and IoU of binary masks ``(N, ...)`` (numpy or torch).

    Convention (MONAI ``ignore_empty=False``): truth and prediction both empty -> Dice = IoU = 1; empty truth with
    any predicted pixel -> 0, so lesion-free images count and a false alarm on one costs the full score.
    """
    p, t = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from target shape {t.shape}")
    p, t = p.reshape(len(p), -1), t.reshape(len(t), -1)
    inter, total = (p & t).sum(1).astype(float), (p.sum(1) + t.sum(1)).astype(float)
    union = total - inter
    empty = total == 0
    dice = np.where(empty, 1.0, 2 * inter / np.maximum(total, 1))
    iou = np.where(empty, 1.0, inter / np.maximum(union, 1))
    return dice, iou


def mean_ci(values, groups=None, n_boot: int = N_BOOT, seed: int = config.DEFAULT_SEED,
            ci: float = 0.95) -> tuple[float, float]:
    """Percentile ``ci`` interval of the mean of ``values`` over a bootstrap (``bootstrap_weights``).

    With ``groups`` (patient ids aligned with ``values``) whole groups are resampled: the images of one patient
    are not independent, so resampling images makes the interval far too narrow when there are few patients.
    NaN values are left out; (NaN, NaN) with fewer than two resampling units.
    """
    v = np.asarray(values, dtype=float).ravel()
    g = None if groups is None else np.asarray(groups, dtype=object).ravel()
    if g is not None and len(g) != len(v):
        raise ValueError(f"{len(g)} groups for {len(v)} values")
    keep = ~np.isnan(v)
    v, g = v[keep], (None if g is None else g[keep])
    units = len(v) if g is None else pd.Series(g).nunique()
    if units < 2 or n_boot < 1:
        return (math.nan, math.nan)
    W = bootstrap_weights(np.zeros(len(v), dtype=int), n_boot, seed, g).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (W @ v) / W.sum(1)
    means = means[np.isfinite(means)]
    lo, hi = np.percentile(means, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
    return (float(lo), float(hi))


def overlap_frame(y_true, y_prob, threshold: float = 0.5, **extra) -> pd.DataFrame:
    """Out-of-fold table of a segmentation model: one row per image with ``dice``, ``iou``, ``true_px``,
    ``pred_px`` and ``has_lesion`` (masks ``y_true`` and probability maps ``y_prob`` of the same shape; a pixel is
    predicted foreground when its probability exceeds ``threshold``); ``extra`` columns first."""
    truth, pred = np.asarray(y_true) > 0.5, np.asarray(y_prob) > threshold
    dice, iou = dice_iou(pred, truth)
    frame = pd.DataFrame({k: np.asarray(v) for k, v in extra.items()}, index=range(len(dice)))
    true_px = truth.reshape(len(truth), -1).sum(1)
    return frame.assign(dice=dice, iou=iou, true_px=true_px, pred_px=pred.reshape(len(pred), -1).sum(1),
                        has_lesion=(true_px > 0).astype(int))


def overlap_summary(frame: pd.DataFrame, groups=None, n_boot: int = N_BOOT, seed: int = config.DEFAULT_SEED) -> dict:
    """Mean Dice and IoU of an ``overlap_frame`` (and Dice over images with foreground, ``dice_pos``), each with
    a bootstrap CI that resamples ``groups`` (patients) when given."""
    g = None if groups is None else np.asarray(groups, dtype=object).ravel()
    pos = frame["has_lesion"].to_numpy() == 1
    out: dict = {"n": len(frame), "n_lesion": int(pos.sum())}
    for name, rows in (("dice", slice(None)), ("iou", slice(None)), ("dice_pos", pos)):
        values = frame["iou" if name == "iou" else "dice"].to_numpy(dtype=float)[rows]
        out[name] = float(values.mean()) if len(values) else math.nan
        out[f"{name}_ci"] = list(mean_ci(values, None if g is None else g[rows], n_boot, seed))
    if g is not None:
        out["n_groups"] = int(pd.Series(g).nunique())
    return to_jsonable({"task": "segmentation", **out, "ci_level": 0.95, "n_boot": int(n_boot)})


# ----------------------------------------------------------------------------- ensembles


def ensemble_mean(prob_list: Sequence) -> np.ndarray:
    """Mean of several models' probabilities (same shape each): the usual fold ensemble."""
    if len(prob_list) == 0:
        raise ValueError("ensemble_mean: no predictions given")
    arrs = [np.asarray(p, dtype=float) for p in prob_list]
    if len({a.shape for a in arrs}) > 1:
        raise ValueError(f"ensemble_mean: shapes differ {[a.shape for a in arrs]}")
    return np.mean(np.stack(arrs), axis=0)


def ensemble_vote(pred_list: Sequence) -> np.ndarray:
    """Majority vote (mode) of several models' integer predictions, elementwise.

    Works for class indices (n,) and for 0/1 multi-label predictions (n, L). Ties go to the SMALLEST
    value (``scipy.stats.mode``'s rule): with an even number of binary voters a 50/50 split predicts 0
    (negative), and among tied classes the lowest index wins. Use an odd number of models to avoid ties.
    """
    if len(pred_list) == 0:
        raise ValueError("ensemble_vote: no predictions given")
    arrs = [np.asarray(p) for p in pred_list]
    if len({a.shape for a in arrs}) > 1:
        raise ValueError(f"ensemble_vote: shapes differ {[a.shape for a in arrs]}")
    stacked = np.stack(arrs)
    if stacked.dtype.kind not in "iub":
        if not np.all(np.equal(np.mod(stacked, 1), 0)):
            raise ValueError("ensemble_vote: predictions must be integer class indices or 0/1")
        stacked = stacked.astype(int)
    return stats.mode(stacked, axis=0, keepdims=False).mode


def predictions_from_probs(probs: np.ndarray, task: str, threshold: float = 0.5) -> np.ndarray:
    """Hard predictions for voting: argmax (multi-class) or ``prob >= threshold`` (binary/multi-label)."""
    probs = np.asarray(probs, dtype=float)
    return probs.argmax(-1) if task == "multiclass" else (probs >= threshold).astype(int)


# ----------------------------------------------------------------------------- figures

Curves = Mapping[str, tuple] | tuple


def _as_curves(curves: Curves) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"": curves} if isinstance(curves, tuple) else dict(curves)


def fold_curves(df_oof: pd.DataFrame, task: str, label_names: Sequence[str], label: str | None = None,
                fold_col: str = "fold", pooled: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"fold 0": (y, p), ..., "pooled": (y, p)}`` for the figures; one label/class (one-vs-rest)."""
    names = list(label_names)
    label = label if label is not None else names[-1]

    def pick(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        y, p = oof_arrays(frame, task, names)
        if task == "binary":
            return np.asarray(y, dtype=float), p
        k = names.index(label)
        if task == "multiclass":
            yi = np.asarray(y)
            yi = np.array([names.index(v) for v in yi]) if yi.dtype.kind in "OUS" else yi.astype(int)
            return (yi == k).astype(float), p[:, k]
        return y[:, k], p[:, k]

    out = {f"fold {k}": pick(frame) for k, frame in df_oof.groupby(fold_col, sort=True)}
    if pooled:
        out["pooled"] = pick(df_oof)
    return out


def _style(name: str) -> dict:
    return {"color": "black", "lw": 2.4, "zorder": 5} if name == "pooled" else {"lw": 1.2, "alpha": 0.8}


def _new_axes(ax: plt.Axes | None, size: tuple[float, float] = (5.0, 4.6)) -> tuple[plt.Figure, plt.Axes]:
    if ax is not None:
        return ax.figure, ax
    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=size)
    return fig, ax


def plot_roc(curves: Curves, title: str = "ROC", ax: plt.Axes | None = None, n_boot: int = 0,
             seed: int = config.DEFAULT_SEED) -> plt.Figure:
    """ROC curves (folds thin, ``pooled`` thick black) with AUC (and CI when ``n_boot``) in the legend."""
    fig, ax = _new_axes(ax)
    palette = iter(sns.color_palette("tab10"))
    for name, (y, p) in _as_curves(curves).items():
        y, p = _check_binary(y, p)
        if _single_class(y, f"ROC curve {name!r}"):
            continue
        fpr, tpr, _ = roc_curve(y, p)
        label = f"{name} AUC {roc_auc_score(y, p):.3f}".strip()
        if n_boot and name in ("pooled", ""):
            lo, hi = bootstrap_ci(y, p, "auc", n_boot, seed)
            label += f" [{lo:.3f}, {hi:.3f}]"
        ax.plot(fpr, tpr, label=label, **({"color": next(palette)} | _style(name)))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_pr(curves: Curves, title: str = "Precision-recall", ax: plt.Axes | None = None) -> plt.Figure:
    """Precision-recall curves with average precision; the dotted line is the pooled prevalence."""
    fig, ax = _new_axes(ax)
    palette = iter(sns.color_palette("tab10"))
    prevalence = None
    for name, (y, p) in _as_curves(curves).items():
        y, p = _check_binary(y, p)
        if _single_class(y, f"PR curve {name!r}"):
            continue
        prec, rec, _ = precision_recall_curve(y, p)
        ax.step(rec, prec, where="post", label=f"{name} AP {average_precision_score(y, p):.3f}".strip(),
                **({"color": next(palette)} | _style(name)))
        prevalence = y.mean() if name in ("pooled", "") or prevalence is None else prevalence
    if prevalence is not None:
        ax.axhline(prevalence, ls=":", color="grey", lw=0.8, label=f"prevalence {prevalence:.2f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_calibration(curves: Curves, n_bins: int = N_BINS, title: str = "Calibration",
                     ax: plt.Axes | None = None) -> plt.Figure:
    """Reliability diagram (equal-width bins, as in the ECE) with the ECE in the legend."""
    fig, ax = _new_axes(ax)
    palette = iter(sns.color_palette("tab10"))
    for name, (y, p) in _as_curves(curves).items():
        yb, pb = _check_binary(y, p)
        frac, mean = calibration_curve(yb, pb, n_bins=n_bins, strategy="uniform")
        ece = expected_calibration_error(yb, pb, n_bins)
        ax.plot(mean, frac, marker="o", ms=3, label=f"{name} ECE {ece:.3f}".strip(),
                **({"color": next(palette)} | _style(name)))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="perfect")
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction positive", title=title,
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_confusion(y_true_or_map, y_pred=None, label_names: Sequence[str] | None = None,
                   normalize: str | None = None, title: str = "Confusion matrix") -> plt.Figure:
    """Confusion matrix heatmap(s): one panel, or one per entry of ``{"fold 0": (y, pred), ..., "pooled": ...}``.

    ``normalize``: None (counts), ``"true"`` (rows sum to 1: per-class recall). Predictions are hard labels.
    """
    panels = dict(y_true_or_map) if isinstance(y_true_or_map, Mapping) else {"": (y_true_or_map, y_pred)}
    n = len(panels)
    with sns.axes_style("white"):
        fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 0.6, 3.4), squeeze=False)
    for ax, (name, (yt, yp)) in zip(axes[0], panels.items(), strict=True):
        yt, yp = np.asarray(yt).ravel(), np.asarray(yp).ravel()
        if yt.size == 0:
            raise ValueError(f"empty input for confusion panel {name!r}")
        k = len(label_names) if label_names else int(max(yt.max(), yp.max())) + 1
        cm = confusion_matrix(yt, yp, labels=list(range(k)), normalize=normalize)
        sns.heatmap(cm, annot=True, fmt=".2f" if normalize else "d", cmap="Blues", cbar=False, ax=ax,
                    xticklabels=label_names or "auto", yticklabels=label_names or "auto", square=True)
        ax.set(xlabel="predicted", ylabel="true" if ax is axes[0][0] else "", title=name or title)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save and close (notebooks keep the inline copy; batch runs do not leak figures)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


__all__ = [
    "MetricWarning", "binary_metrics", "bootstrap_ci", "calibration_bins", "dice_iou", "mean_ci",
    "overlap_frame", "overlap_summary",
    "ensemble_mean", "ensemble_vote", "expected_calibration_error", "fold_curves", "multiclass_metrics",
    "multilabel_metrics", "oof_arrays", "oof_columns", "oof_frame", "per_fold", "per_label_table",
    "plot_calibration", "plot_confusion", "plot_pr", "plot_roc", "predictions_from_probs", "safe_ap", "safe_auc",
    "save_figure", "save_metrics", "summarize", "threshold_metrics", "to_jsonable",
]
