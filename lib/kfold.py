"""Patient-grouped k-fold training, out-of-fold predictions, fold ensembles, predict/merge CLI, label-noise study.

Why: one train/validation split of ~100 studies gives an AUC that moves by 0.1 with the seed. Grouped
stratified k-fold scores every case once with a model that never saw its patient (or its duplicate
image); a held-out test part, never used by any fold, then compares single fold models with their
mean/vote ensembles honestly. Training is ``lib.train.fit``; splits and metrics are ``lib.splits`` and
``lib.metrics``.

CLI::

    python -m lib.kfold predict --ckpt outputs/.../fold*/best.pt --input <image folder | crops dir> --out p.csv
    python -m lib.kfold merge a.csv b.csv --how mean --out merged.csv
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from lib import config, metrics, models, resources, splits, train
from lib.cache import fingerprint, source_digest
from lib.datasets import CachedDataset
from lib.io import DataError, SkippedCases, read_json, to_jsonable, write_json
from lib.params import check_profile, stage_defaults


@dataclass
class KFoldResult:
    """What a k-fold run produced (also written to ``out_dir``)."""

    oof: pd.DataFrame  # one row per development sample: fold, ids, true_*, prob_*, train label
    test: pd.DataFrame  # one row per held-out test sample: prob_* per fold model and ensembles
    summary: dict  # lib.metrics.per_fold of the OOF table + test comparison
    comparison: pd.DataFrame  # single folds vs mean / vote ensembles on the test part
    logs: pd.DataFrame  # training logs of every fold
    checkpoints: list[Path] = field(default_factory=list)
    out_dir: Path = Path(".")
    maps: np.ndarray | None = None  # segmentation: out-of-fold probability maps (N, H, W), NaN where not validated


def _strata(ds: CachedDataset, eval_col: str | None) -> pd.Series:
    """Label used for stratification (the evaluation label when given, so both label sources share folds)."""
    if eval_col is not None:
        return ds.table[eval_col].astype(int).astype(str)
    y = ds.y.numpy()
    if ds.task == "multiclass":
        return pd.Series([ds.label_names[i] for i in y], index=ds.table.index)
    return pd.Series(["|".join(str(int(v)) if v == v else "nan" for v in row) for row in y.reshape(len(y), -1)],
                     index=ds.table.index)


def assign_folds(ds: CachedDataset, group_col: str, n_splits: int = 5, test_fraction: float = 0.2,
                 seed: int = config.DEFAULT_SEED, eval_col: str | None = None) -> pd.Series:
    """Fold per row: ``-1`` = held-out test part, ``0..n_splits-1`` = development folds; groups never cross.

    Raises a clear error naming the class when it has fewer groups than folds.
    """
    if group_col not in ds.table:
        raise KeyError(f"group column {group_col!r} not in dataset table (have {list(ds.table.columns)})")
    label_col = eval_col or ("class" if ds.task == "multiclass" else "target")
    frame = pd.DataFrame({"group": ds.table[group_col].astype(str).to_numpy(),
                          label_col: _strata(ds, eval_col).to_numpy()})
    folds = pd.Series(np.zeros(len(frame), dtype=int), name="fold")
    dev = np.ones(len(frame), dtype=bool)
    if test_fraction > 0:
        n_outer = max(2, round(1 / test_fraction))
        try:
            outer = splits.group_kfold(frame, n_outer, "group", label_col, seed=seed)
        except ValueError as exc:
            raise ValueError(f"held-out test part (1/{n_outer} of the {group_col} groups; set test_fraction=0 "
                             f"to skip it): {exc}") from exc
        dev = (outer != 0).to_numpy()
        folds[~dev] = -1
    inner = splits.group_kfold(frame[dev].reset_index(drop=True), n_splits, "group", label_col, seed=seed + 1)
    folds[dev] = inner.to_numpy()
    splits.check_leakage(folds, frame["group"])
    return folds


def predict_probs(model: torch.nn.Module, x: torch.Tensor, task: str, batch_size: int = 64) -> np.ndarray:
    logits, _ = train.predict_logits(model, _only_x(DataLoader(TensorDataset(x), batch_size=batch_size)),
                                     next(model.parameters()).device)
    return train.probabilities(logits, task).numpy()


def evaluate_split(model: torch.nn.Module, ds: CachedDataset, idx: np.ndarray, eval_col: str | None = None,
                   n_boot: int = 200, seed: int = config.DEFAULT_SEED) -> dict:
    """``lib.metrics.summarize`` of a model on rows ``idx``: against the training labels, and against ``eval_col``."""
    probs = predict_probs(model, ds.x[idx], ds.task)
    p = probs[:, 0] if ds.task == "binary" else probs
    y = _truth(ds, idx, None)
    y = y[:, 0] if ds.task == "binary" else y
    out = {"train_labels": metrics.summarize(y, p, ds.task, ds.label_names, n_boot=n_boot, seed=seed)}
    if eval_col is not None:
        out[eval_col] = metrics.summarize(_truth(ds, idx, eval_col), p, ds.task, ds.label_names, n_boot=n_boot,
                                          seed=seed)
    return out


def _only_x(loader: DataLoader):
    """Batches of inputs only (predict_logits accepts bare tensors)."""
    for (x,) in loader:
        yield x


def _truth(ds: CachedDataset, idx: np.ndarray, eval_col: str | None) -> np.ndarray:
    if eval_col is not None:
        return ds.table[eval_col].to_numpy(dtype=float)[idx]
    y = ds.y.numpy()[idx]
    return y if ds.task == "multiclass" else y.reshape(len(idx), -1)


def train_one(ds: CachedDataset, tr_idx: np.ndarray, va_idx: np.ndarray, out_dir: str | Path,
              cfg: train.TrainConfig, model_name: str = models.DEFAULT_MODEL, augment: str = "light",
              batch_size: int = 32, uncertain: str = "ignore", pretrained: bool = False,
              model_kwargs: dict | None = None,
              bn_momentum: float | None = None) -> tuple[torch.nn.Module, pd.DataFrame]:
    """One fold's model: ``lib.train.train_classifier`` (weights for imbalance from the training rows only)."""
    return train.train_classifier(ds, tr_idx, va_idx, out_dir, cfg, model_name, augment, batch_size, uncertain,
                                  pretrained, model_kwargs, bn_momentum=bn_momentum)


def _fold_job(ds: CachedDataset, k: int, tr_idx: np.ndarray, va_idx: np.ndarray, test_idx: np.ndarray,
              out_dir: Path, cfg: train.TrainConfig, kwargs: dict,
              threads: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray | None]:
    """Train fold ``k`` and predict its validation rows and the test part (runs in a worker process).

    ``kwargs["trainer"]`` (a module-level function with ``train_one``'s signature) replaces ``train_one``.
    """
    if threads:
        torch.set_num_threads(threads)
    trainer = kwargs.get("trainer") or train_one
    kwargs = {key: v for key, v in kwargs.items() if key != "trainer"}
    model, log = trainer(ds, tr_idx, va_idx, out_dir / f"fold{k}", replace(cfg, seed=cfg.seed + k), **kwargs)
    p = predict_probs(model, ds.x[va_idx], ds.task)
    return log, p, predict_probs(model, ds.x[test_idx], ds.task) if len(test_idx) else None


def fold_pool(n_jobs: int, workers: int | None = None) -> tuple[ProcessPoolExecutor | None, int]:
    """(process pool, torch threads per worker) for ``n_jobs`` fold trainings: one worker per granted core (or
    ``workers``); no pool (folds train in this process) with one worker or on a GPU. Several k-fold runs may
    share one pool."""
    if config.device("auto").type == "cuda":
        return None, 0
    # MONAI's transforms (the training augmentation) load in the pool's fork server once, not in every worker
    return resources.worker_pool(n_jobs, "lib.kfold", "monai.transforms", n_workers=workers)


def _train_folds(ds: CachedDataset, jobs: list[tuple[int, np.ndarray, np.ndarray]], test_idx: np.ndarray,
                 out_dir: Path, cfg: train.TrainConfig, kwargs: dict, workers: int | None = None,
                 pool: tuple[ProcessPoolExecutor | None, int] | None = None) -> list[tuple]:
    """Every fold's ``_fold_job``: in a process pool so every granted core trains a fold (small CPU models use
    one core poorly), or in this process with one worker or on a GPU. ``pool``: a shared ``fold_pool``;
    otherwise this call makes its own of ``workers``."""
    if pool is None:
        pool = fold_pool(len(jobs), workers)
        if pool[0] is not None:
            with pool[0]:
                return _train_folds(ds, jobs, test_idx, out_dir, cfg, kwargs, pool=pool)
    executor, threads = pool
    if executor is None:
        return [_fold_job(ds, k, tr, va, test_idx, out_dir, cfg, kwargs, 0) for k, tr, va in jobs]
    ds = replace(ds, skipped=SkippedCases())  # the skip records stay here; workers need the tensors only
    futures = [executor.submit(_fold_job, ds, k, tr, va, test_idx, out_dir, cfg, kwargs, threads)
               for k, tr, va in jobs]
    return [f.result() for f in futures]


def run_kfold(ds: CachedDataset, out_dir: str | Path, cfg: train.TrainConfig, model_name: str = models.DEFAULT_MODEL,
              group_col: str = "patient_id", n_splits: int = 5, test_fraction: float = 0.2, augment: str = "light",
              batch_size: int = 32, eval_col: str | None = None, uncertain: str = "ignore", pretrained: bool = False,
              threshold: float = 0.5, n_boot: int = 1000, folds: pd.Series | None = None,
              model_kwargs: dict | None = None, train_mask: np.ndarray | None = None,
              bn_momentum: float | None = None, workers: int | None = None,
              pool: tuple[ProcessPoolExecutor | None, int] | None = None, trainer=None,
              trainer_kwargs: dict | None = None, only_folds: Sequence[int] | None = None) -> KFoldResult:
    """Train one model per fold (``out_dir/fold<k>/best.pt``), predict its validation fold and the test part.

    ``eval_col`` names a table column with the labels to score against (e.g. ``truth`` on the synthetic
    cohort while training on report labels); default = the training labels. ``train_mask`` (bool per row)
    keeps rows out of training (no usable training label) while they are still predicted and scored out of
    fold. Folds train in ``workers`` processes at once (default: one per granted core), each
    with an equal share of the torch threads; a fold's numbers do not depend on which process trained it.
    ``pool`` (a ``fold_pool``) lets several runs share the workers. ``trainer`` (module-level, ``train_one``'s
    signature plus ``trainer_kwargs``) trains a fold instead of ``train_one``; ``only_folds`` trains and scores
    those folds alone (a quick ablation; the rows of the other folds are still training data). A
    ``segmentation`` dataset (masks as ``y``) is scored per image by ``lib.metrics.overlap_frame`` and its maps
    are kept in ``result.maps``.
    Writes ``oof.csv``,
    ``test_predictions.csv``, ``metrics.json``, ``ensembles.csv`` and ``logs.csv``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folds = assign_folds(ds, group_col, n_splits, test_fraction, cfg.seed, eval_col) if folds is None else folds
    folds = np.asarray(folds)
    if len(folds) != len(ds):
        raise ValueError(f"{len(folds)} fold numbers for {len(ds)} samples")
    missing = sorted(set(range(n_splits)) - set(folds.tolist()))
    if missing:
        raise ValueError(f"folds {missing} of {n_splits} have no samples")
    splits.check_leakage(folds, ds.table[group_col].reset_index(drop=True))  # fails the run if a group crosses
    names = ds.label_names
    test_idx = np.flatnonzero(folds == -1)
    jobs = []
    for k in range(n_splits) if only_folds is None else sorted(set(only_folds)):
        tr_idx, va_idx = np.flatnonzero((folds != k) & (folds >= 0)), np.flatnonzero(folds == k)
        if train_mask is not None:
            tr_idx = tr_idx[np.asarray(train_mask, dtype=bool)[tr_idx]]
        jobs.append((k, tr_idx, va_idx))
    kwargs = {"model_name": model_name, "augment": augment, "batch_size": batch_size, "uncertain": uncertain,
              "pretrained": pretrained, "model_kwargs": model_kwargs, "bn_momentum": bn_momentum}
    if trainer is not None:
        kwargs.update(trainer=trainer, **(trainer_kwargs or {}))
    done = _train_folds(ds, jobs, test_idx, out_dir, cfg, kwargs, workers, pool)
    oof_parts, logs, ckpts, test_probs = [], [], [], {}
    segmentation = ds.task == "segmentation"
    maps = np.full((len(ds), *ds.y.shape[2:]), np.nan, np.float32) if segmentation else None
    for (k, _, va_idx), (log, p, p_test) in zip(jobs, done, strict=True):
        logs.append(log.assign(fold=k))
        ckpts.append(out_dir / f"fold{k}" / "best.pt")
        extra = {"fold": np.full(len(va_idx), k), "row": va_idx, "group": ds.table[group_col].to_numpy()[va_idx]}
        if segmentation:
            maps[va_idx] = p[:, 0]
            oof_parts.append(metrics.overlap_frame(ds.y[va_idx].numpy(), p, threshold, **extra))
        else:
            oof_parts.append(metrics.oof_frame(_truth(ds, va_idx, eval_col), p, ds.task, names, **extra))
        if p_test is not None:
            test_probs[f"fold{k}"] = p_test
    oof = pd.concat(oof_parts, ignore_index=True)
    oof = _with_ids(oof, ds)
    summary = metrics.per_fold(oof, ds.task, names, threshold=threshold, group_col="group", n_boot=n_boot,
                               seed=cfg.seed)
    summary["scored_against"] = eval_col or "train_labels"
    if eval_col is not None and "train_label" in oof:  # the same predictions scored against the training labels
        _, p_oof = metrics.oof_arrays(oof, ds.task, names)
        summary["pooled_vs_train_labels"] = metrics.summarize(oof["train_label"].to_numpy(dtype=float), p_oof, ds.task,
                                                              names, threshold, oof["group"].to_numpy(), n_boot,
                                                              cfg.seed)
    test, comparison = _test_comparison(ds, test_idx, test_probs, eval_col, threshold, group_col)
    summary["test"] = comparison.to_dict(orient="records")
    summary["n_dev"], summary["n_test"], summary["n_splits"] = int((folds >= 0).sum()), len(test_idx), n_splits
    summary["timing_s"] = {"train": float(logs_time(logs))}
    oof.to_csv(out_dir / "oof.csv", index=False)
    fold_cols = list(dict.fromkeys(c for c in (*ID_COLUMNS, "structure", "truth", group_col) if c in ds.table))
    ds.table[fold_cols].assign(fold=folds).to_csv(out_dir / "folds.csv", index=False)
    test.to_csv(out_dir / "test_predictions.csv", index=False)
    comparison.to_csv(out_dir / "ensembles.csv", index=False)
    logs_df = pd.concat(logs, ignore_index=True)
    logs_df.to_csv(out_dir / "logs.csv", index=False)
    metrics.save_metrics(summary, out_dir / "metrics.json")
    ds.skipped.save(out_dir / "skipped_dataset.csv")
    return KFoldResult(oof, test, summary, comparison, logs_df, ckpts, out_dir, maps)


ID_COLUMNS = ("case_id", "patient_id", "organ", "path", "target", "label")


def logs_time(logs: Sequence[pd.DataFrame]) -> float:
    """Seconds spent in training epochs (sum of the fit logs' ``time_s``)."""
    return float(sum(log["time_s"].sum() for log in logs if "time_s" in log))


def _with_ids(frame: pd.DataFrame, ds: CachedDataset) -> pd.DataFrame:
    ids = [c for c in ID_COLUMNS if c in ds.table]
    info = ds.table[ids].iloc[frame["row"].to_numpy()].reset_index(drop=True)
    info = info.rename(columns={"target": "train_label", "label": "class"})
    return pd.concat([frame.reset_index(drop=True), info], axis=1)


def _score(task: str, y: np.ndarray, p: np.ndarray, pred: np.ndarray, names: list[str], threshold: float) -> dict:
    """Scalar comparison numbers for one model or ensemble on the test part."""
    from sklearn.metrics import accuracy_score, f1_score

    if task == "multiclass":
        yy = y.astype(int)
        return {"auc": _ovr_auc(yy, p), "accuracy": float(accuracy_score(yy, pred)),
                "macro_f1": float(f1_score(yy, pred, average="macro", labels=range(len(names)), zero_division=0))}
    yv, pv, predv = y.reshape(len(y), -1), p.reshape(len(p), -1), pred.reshape(len(pred), -1)
    aucs, accs = [], []
    for j in range(yv.shape[1]):
        ok = np.isin(yv[:, j], (0, 1))
        aucs.append(metrics.safe_auc(yv[ok, j], pv[ok, j]) if ok.any() else np.nan)
        accs.append(accuracy_score(yv[ok, j], predv[ok, j]) if ok.any() else np.nan)
    return {"auc": float(np.nanmean(aucs)), "accuracy": float(np.nanmean(accs)),
            "macro_f1": float(f1_score(yv[:, 0] if yv.shape[1] == 1 else yv, predv[:, 0] if yv.shape[1] == 1
                                       else predv, average="macro", zero_division=0))
            if np.isin(yv, (0, 1)).all() else float("nan")}


def _ovr_auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    try:
        return float(roc_auc_score(y, p, multi_class="ovr", labels=range(p.shape[1])))
    except ValueError:
        return float("nan")


def _test_comparison(ds: CachedDataset, test_idx: np.ndarray, test_probs: dict[str, np.ndarray],
                     eval_col: str | None, threshold: float, group_col: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-fold and ensemble (mean of probabilities, majority vote) predictions and scores on the test part."""
    if not len(test_idx):
        return pd.DataFrame(), pd.DataFrame(columns=["model", "auc", "accuracy", "macro_f1"])
    names, task = ds.label_names, ds.task
    y = _truth(ds, test_idx, eval_col)
    mean = metrics.ensemble_mean(list(test_probs.values()))
    votes = [metrics.predictions_from_probs(p, task, threshold) for p in test_probs.values()]
    vote = metrics.ensemble_vote(votes)
    vote_share = np.mean(np.stack(votes), axis=0).astype(float)  # fraction of models voting positive: a score
    rows = []
    for name, p in test_probs.items():
        hard = metrics.predictions_from_probs(p, task, threshold)
        rows.append({"model": name, **_score(task, y, p, hard, names, threshold)})
    rows.append({"model": "ensemble_mean", **_score(task, y, mean, metrics.predictions_from_probs(mean, task,
                                                                                                  threshold),
                                                     names, threshold)})
    vote_row = {"model": "ensemble_vote", **_score(task, y, vote_share if task != "multiclass" else mean, vote,
                                                   names, threshold)}
    if task == "multiclass":
        vote_row["auc"] = float("nan")  # a vote has no ranking score
    rows.append(vote_row)
    test = metrics.oof_frame(y, mean, task, names, row=test_idx, group=ds.table[group_col].to_numpy()[test_idx])
    for name, p in test_probs.items():
        p2 = p.reshape(len(p), -1)
        for j in range(p2.shape[1]):
            test[f"{name}_p{j}"] = p2[:, j]
    test["vote"] = list(vote) if np.ndim(vote) > 1 else vote
    return _with_ids(test, ds), pd.DataFrame(rows)


# ----------------------------------------------------------------------------- figures


def figures(result: KFoldResult, task: str, label_names: list[str], threshold: float = 0.5,
            label: str | None = None) -> dict[str, Path]:
    """ROC, PR, calibration and confusion figures of the OOF table, saved beside ``metrics.json``."""
    curves = metrics.fold_curves(result.oof, task, label_names, label=label)
    out = {"roc": metrics.save_figure(metrics.plot_roc(curves), result.out_dir / "roc.png"),
           "pr": metrics.save_figure(metrics.plot_pr(curves), result.out_dir / "pr.png"),
           "calibration": metrics.save_figure(metrics.plot_calibration(curves), result.out_dir / "calibration.png")}
    y, p = metrics.oof_arrays(result.oof, task, label_names)
    if task == "multiclass":
        panel = {"pooled": (np.asarray(y, dtype=int), p.argmax(1))}
        names = label_names
    else:
        yv, pv = np.asarray(y, dtype=float).reshape(len(y), -1)[:, 0], np.asarray(p).reshape(len(p), -1)[:, 0]
        ok = np.isin(yv, (0, 1))
        panel = {f"pooled (threshold {threshold})": (yv[ok].astype(int), (pv[ok] >= threshold).astype(int))}
        names = ["negative", "positive"]
    out["confusion"] = metrics.save_figure(metrics.plot_confusion(panel, label_names=names),
                                           result.out_dir / "confusion.png")
    return out


def report_arm(ds_reports: CachedDataset, ds_truth: CachedDataset) -> tuple[CachedDataset, np.ndarray]:
    """Every crop with a ground-truth label (``ds_truth``'s rows and inputs) carrying its report label as the
    training target (matched on case_id, structure), and the mask of rows with a usable report label.

    Rows the reports leave blank or uncertain (under the dataset's policy) are NaN: not trained on, still
    predicted and scored against the truth, so a score on this dataset counts both costs of learning from
    text, wrong labels and missing ones.
    """
    key = ["case_id", "structure"]
    report_target = ds_reports.table.drop_duplicates(key).set_index(key)["target"] \
        .reindex(ds_truth.table.set_index(key).index).to_numpy(dtype=float)
    usable = ~np.isnan(report_target)
    if not usable.any():
        raise ValueError("no crop has a usable report label")
    y_r = torch.from_numpy(report_target.astype(np.float32)).reshape(ds_truth.y.shape)
    return replace(ds_truth, y=y_r, table=ds_truth.table.assign(target=report_target)), usable


def label_noise_study(ds_reports: CachedDataset, ds_truth: CachedDataset, out_dir: str | Path,
                      cfg: train.TrainConfig, folds: pd.Series | np.ndarray | None = None,
                      reports_result: KFoldResult | None = None, **kw) -> tuple[pd.DataFrame, dict[str, KFoldResult]]:
    """The same model, rows and folds trained on report-derived vs ground-truth labels, both scored on the truth.

    The report arm is ``report_arm``: it does not train on rows without a usable report label. So the AUC
    difference counts both costs of learning from text: wrong labels and missing ones. ``reports_result``:
    that arm already trained (stage 04's synthetic run is exactly it), so only the truth arm is trained here.
    """
    ds_r, usable = report_arm(ds_reports, ds_truth)
    if folds is None:
        folds = assign_folds(ds_truth, kw.get("group_col", "patient_id"), kw.get("n_splits", 5),
                             kw.get("test_fraction", 0.2), cfg.seed, eval_col="truth")
    out_dir = Path(out_dir)
    if reports_result is None:
        reports_result = run_kfold(ds_r, out_dir / "reports", cfg, folds=folds, eval_col="truth", train_mask=usable,
                                   **kw)
    results = {"reports": reports_result,
               "truth": run_kfold(ds_truth, out_dir / "truth", cfg, folds=folds, eval_col="truth", **kw)}
    return noise_summary(ds_r, usable, results, out_dir), results


def noise_summary(ds_r: CachedDataset, usable: np.ndarray, results: dict[str, KFoldResult],
                  out_dir: str | Path) -> pd.DataFrame:
    """``noise_table`` with the label counts behind it (wrong, missing), written to ``label_noise.csv``."""
    truth = ds_r.table["truth"].to_numpy(dtype=float)
    report_target = ds_r.table["target"].to_numpy(dtype=float)
    wrong = int((report_target[usable] != truth[usable]).sum())
    table = noise_table(results).assign(
        n_rows=len(truth), n_report_labels=[int(usable.sum()), len(truth)],
        n_wrong_labels=[wrong, 0], n_missing_labels=[int((~usable).sum()), 0])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(out_dir) / "label_noise.csv", index=False)
    return table


def noise_table(results: dict[str, KFoldResult]) -> pd.DataFrame:
    """Label-noise study: pooled OOF AUC (with CI) per training-label source, all scored on the same truth."""
    rows = []
    for source, res in results.items():
        pooled = res.summary["pooled"]
        ci = pooled.get("auc_ci") or [None, None]
        test = res.comparison.set_index("model")["auc"].get("ensemble_mean", np.nan) if len(res.comparison) else np.nan
        rows.append({"train_labels": source, "oof_auc": pooled.get("auc"), "auc_ci_low": ci[0], "auc_ci_high": ci[1],
                     "oof_ap": pooled.get("ap"), "ece": pooled.get("ece"), "test_auc_ensemble": test,
                     "n": pooled.get("n")})
    table = pd.DataFrame(rows)
    if "truth" in set(table["train_labels"]):
        ref = float(table.set_index("train_labels").loc["truth", "oof_auc"])
        table["auc_cost_vs_truth"] = ref - table["oof_auc"].astype(float)
    return table


def plot_label_noise(table: pd.DataFrame, title: str = "Cost of learning from report labels"):
    """Pooled OOF AUC with its bootstrap 95% CI per training-label source (all scored on the ground truth)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(5, 3.2))
    sns.pointplot(data=table, x="train_labels", y="oof_auc", hue="train_labels", linestyle="none", ax=ax,
                  legend=False)
    for i, r in enumerate(table.itertuples()):
        if r.auc_ci_low is not None and np.isfinite(r.auc_ci_low):
            ax.vlines(i, r.auc_ci_low, r.auc_ci_high, color="grey", lw=2)
    ax.set(xlabel="training labels", ylabel="OOF AUC vs ground truth (95% CI)", title=title)
    fig.tight_layout()
    return fig


def plot_ensembles(comparison: pd.DataFrame, metric: str = "auc", title: str | None = None):
    """Single fold models vs the mean / vote ensembles on the held-out test part (one bar each)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    frame = comparison.assign(kind=["ensemble" if str(m).startswith("ensemble") else "single fold"
                                    for m in comparison["model"]])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    sns.barplot(data=frame, x="model", y=metric, hue="kind", dodge=False, ax=ax)
    ax.set(ylim=(0, 1.02), title=title or f"held-out test part: {metric}", xlabel="")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- tables for the notebook


def leakage_report(out_dir: str | Path, seed: int = config.DEFAULT_SEED) -> dict:
    """Fold balance and leakage of a finished run (``folds.csv``): groups crossing folds in the grouped split
    used (must be 0; ``check_leakage`` already failed the run otherwise) vs a naive row-level split."""
    folds = pd.read_csv(Path(out_dir) / "folds.csv")
    group_col = "group" if "group" in folds else "patient_id"
    label_col = next(c for c in ("truth", "label", "target") if c in folds)
    k = int(folds["fold"].max()) + 1
    return {"group_col": group_col, "label_col": label_col, "n_groups": int(folds[group_col].nunique()),
            "groups_with_several_rows": splits.n_duplicate_groups(folds[group_col]),
            "table": splits.fold_table(folds, folds["fold"], label_col, group_col),
            "crossing_grouped": splits.crossing_groups(folds["fold"], folds[group_col]),
            "crossing_naive": splits.crossing_groups(splits.naive_folds(folds[label_col], k, seed), folds[group_col])}


def metrics_table(summary: dict) -> pd.DataFrame:
    """One row per fold plus ``pooled`` with the headline numbers of ``metrics.json`` (CI bounds as columns)."""
    keys = ("n", "auc", "auc_ci", "ap", "sensitivity", "specificity", "f1", "accuracy", "macro_f1", "macro_f1_ci",
            "macro_auc", "ece", "brier", "n_lesion", "dice", "dice_ci", "iou", "iou_ci", "dice_pos", "dice_pos_ci")
    rows = {**{f"fold {k}": v for k, v in summary["folds"].items()}, "pooled": summary["pooled"]}
    table = pd.DataFrame({name: {key: m.get(key) for key in keys if key in m} for name, m in rows.items()}).T
    for ci in ("auc_ci", "macro_f1_ci", "dice_ci", "iou_ci", "dice_pos_ci"):
        if ci in table:
            bounds = table.pop(ci)
            base = ci[:-3]
            table[f"{base}_lo"] = [b[0] if isinstance(b, list) else np.nan for b in bounds]
            table[f"{base}_hi"] = [b[1] if isinstance(b, list) else np.nan for b in bounds]
    return table.apply(pd.to_numeric, errors="coerce")


def predict_source(dataset: str | Path, run_dir: str | Path, profile: str = "smoke",
                   seed: int = config.DEFAULT_SEED) -> Path:
    """The folder ``predict`` reads for a dataset (any registered name or alias, or a folder/CSV): the run's
    crops for crop-based sets and CT cohort folders, else the set's image folder."""
    from lib import datasets
    from lib.crop import is_volume_cohort

    found = datasets.lookup(dataset, "04_kfold")
    if isinstance(found, Path):
        return Path(run_dir) / "crops" if is_volume_cohort(found) else found
    return Path(run_dir) / "crops" if found.inputs == "crops" else found.locate(profile, seed)


# ----------------------------------------------------------------------------- stage entry point (notebooks 04, 05, 07)

STAGE_NAME = "model"
PARAMS_FILE = "params.json"
# Notebook 04's parameters that do not shape the fold models (where the run goes, the optional label-noise study,
# the notebook's quality floors); every other parameter does.
_RUN_CONTROL = ("profile", "seed", "run_dir", "name", "label_noise", "label_noise_params", "min_oof_auc",
                "min_macro_f1")
# Parameters of notebook 04 that shape the fold models, with its defaults (the smoke profile, what nbval runs),
# read from the notebook's parameters cell: declared once. notebooks/profiles/04_kfold.yaml overrides them per
# profile, so notebooks 05/07 calling ``ensure_kfold`` standalone get the same models notebook 04 would have trained.
STAGE_DEFAULTS: dict = {k: v for k, v in stage_defaults("04_kfold").items() if k not in _RUN_CONTROL}


def stage_params(profile: str = "smoke", **overrides) -> dict:
    """Stage-04 parameters: smoke defaults < ``notebooks/profiles/04_kfold.yaml[profile]`` < ``overrides``; the
    profile is checked against the declared parameter types first (``lib.params.check_profile``)."""
    import yaml

    params = dict(STAGE_DEFAULTS)
    path = config.PROFILES / "04_kfold.yaml"
    if path.exists():
        table = yaml.safe_load(path.read_text()) or {}
        values = table.get(profile) or {}
        check_profile("04_kfold", values, path)
        params.update({k: v for k, v in values.items() if k in STAGE_DEFAULTS})
    unknown = sorted(set(overrides) - set(STAGE_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown k-fold parameter(s) {unknown}; known: {sorted(STAGE_DEFAULTS)}")
    params.update(overrides)
    return params


#: Modules whose source is part of a k-fold run's identity (``params.json``): editing them retrains the folds.
KFOLD_CODE = ("lib.kfold", "lib.train", "lib.models", "lib.datasets", "lib.metrics", "lib.splits", "lib.imageio")


def run_params(profile: str = "smoke", seed: int = config.DEFAULT_SEED, **overrides) -> dict:
    """What identifies a k-fold run (its ``params.json``): ``stage_params``, seed, profile and a digest of the
    code that trains and scores it (``lib.cache.source_digest``), so a changed trainer never reuses old folds."""
    return {**stage_params(profile, **overrides), "seed": int(seed), "profile": profile,
            "code": source_digest(KFOLD_CODE)}


def _jsonable(params: dict) -> dict:
    return to_jsonable(params)


def is_complete(out_dir: str | Path, params: dict | None = None) -> bool:
    """True when ``out_dir`` holds a finished k-fold run: its ``params.json``, every fold's best.pt and
    ``metrics.json`` (written at the end); when ``params`` is given, ``params.json`` must hold exactly these
    parameters. The one definition of a finished run (``find_run``, explanation and export use it)."""
    out_dir = Path(out_dir)
    pfile = out_dir / PARAMS_FILE
    if not pfile.exists() or not (out_dir / "metrics.json").exists():
        return False
    try:
        stored = read_json(pfile, "k-fold parameters")
    except DataError:
        return False
    n = int(stored.get("n_splits", 0)) if isinstance(stored, dict) else 0
    if not n or not all((out_dir / f"fold{k}" / "best.pt").exists() for k in range(n)):
        return False
    return params is None or stored == _jsonable(params)


def fold_checkpoints(out_dir: str | Path) -> list[Path]:
    """``out_dir/fold<k>/best.pt`` in numeric fold order (fold10 after fold2)."""
    found = [p for p in Path(out_dir).glob("fold*/best.pt") if p.parent.name.removeprefix("fold").isdigit()]
    return sorted(found, key=lambda p: int(p.parent.name.removeprefix("fold")))


def finished_runs(run_dir: str | Path) -> list[str]:
    """Names of the finished k-fold runs (``is_complete``) under ``run_dir/kfold``, sorted."""
    root = Path(run_dir) / "kfold"
    return sorted(p.name for p in root.iterdir() if is_complete(p)) if root.is_dir() else []


def find_run(run_dir: str | Path, name: str | None = None, checkpoints: Sequence[str | Path] | None = None,
             profile: str = "smoke", seed: int = config.DEFAULT_SEED, folds: Sequence[int] | None = None
             ) -> tuple[list[Path], str]:
    """Fold checkpoints of a finished k-fold run and the run's name: the one reader of stage 04's output for
    explanation (notebook 05) and export (notebook 07).

    Explicit ``checkpoints`` win. Else ``run_dir/kfold/<name>``: by default the stage's own name when that run
    is finished or none is, else the first finished one. A run that is not finished (``is_complete``) is made
    by ``ensure_kfold`` with notebook 04's parameters for ``profile`` and ``seed`` (resumed when interrupted);
    a finished one is used as it is, whatever its parameters. ``folds`` keeps those fold numbers only.
    """
    if checkpoints:
        paths = [Path(p) for p in checkpoints]
        return paths, name or paths[0].parent.parent.name
    finished = finished_runs(run_dir)
    name = name or (STAGE_NAME if STAGE_NAME in finished or not finished else finished[0])
    if name not in finished:
        ensure_kfold(run_dir, profile, seed, name=name)
    paths = fold_checkpoints(Path(run_dir) / "kfold" / name)
    if folds is not None:
        want = {int(k) for k in folds}
        paths = [p for p in paths if int(p.parent.name.removeprefix("fold")) in want]
    if not paths:
        raise DataError(Path(run_dir) / "kfold" / name, f"no fold checkpoints fold*/best.pt (folds {folds})")
    return paths, name


_DATASETS: dict[str, tuple[CachedDataset, str]] = {}  # last decoded dataset per input recipe (one process)
_INPUT_KEYS = ("dataset", "label_source", "lang", "organ", "label_cols", "input_kind", "n_slices", "image_size",
               "mask_mode", "uncertain", "channels")


def build_stage_dataset(params: dict, run_dir: str | Path, profile: str, seed: int,
                        label_source: str | None = None) -> tuple[CachedDataset, str]:
    """The dataset notebook 04's parameters name (``lib.datasets.build_dataset``) and its group column.

    Kept in memory per input recipe, so the k-fold run and the label-noise study of one notebook decode
    (and, for 2D sets, hash) the images once.
    """
    import json

    from lib import datasets

    source = label_source or params["label_source"]
    key = json.dumps([str(Path(run_dir).resolve()), profile, seed, source,
                      *(params[k] for k in _INPUT_KEYS if k != "label_source")], default=str)
    if key not in _DATASETS:
        while len(_DATASETS) >= 2:  # the two label sources of one study; older recipes are dropped
            _DATASETS.pop(next(iter(_DATASETS)))
        _DATASETS[key] = datasets.build_dataset(
            params["dataset"], run_dir, profile, seed, source, params["lang"], params["organ"],
            params["label_cols"], "binary", params["input_kind"], params["n_slices"], params["image_size"],
            mask_mode=params["mask_mode"], uncertain=params["uncertain"], channels=params["channels"])
    return _DATASETS[key]


def train_config(params: dict, task: str, seed: int, progress: bool = False) -> train.TrainConfig:
    return train.TrainConfig(epochs=params["epochs"], lr=params["lr"], optimizer=params["optimizer"],
                             scheduler=params["scheduler"], patience=params["patience"],
                             ema_decay=params["ema_decay"], select=params["select"], val_every=params["val_every"],
                             monitor="macro_f1" if task == "multiclass" else "auc", seed=seed, progress=progress)


_RUN_KEYS = ("model_name", "n_splits", "test_fraction", "augment", "batch_size", "uncertain", "pretrained",
             "threshold", "n_boot", "model_kwargs", "bn_momentum")


def _run_kwargs(params: dict, group_col: str) -> dict:
    """``run_kfold``'s keyword arguments from stage parameters: one mapping for the k-fold run and the label-noise
    study, so both train the same model the same way."""
    return {"group_col": group_col, **{k: params[k] for k in _RUN_KEYS}}


def ensure_kfold(run_dir: str | Path | None = None, profile: str = "smoke", seed: int = config.DEFAULT_SEED,
                 name: str = STAGE_NAME, force: bool = False, progress: bool = False, label_noise: bool = False,
                 **overrides) -> Path:
    """Idempotent stage 04: ``run_dir/kfold/<name>/`` with ``fold<k>/best.pt``, ``oof.csv``, ``metrics.json``, figures.

    Reuses a finished run with the same parameters (``params.json``); a run with other parameters under the
    same name is removed and retrained; an interrupted one resumes from its ``last.pt`` files. With
    ``label_noise`` on the synthetic cohort the label-noise study's truth arm (``ensure_label_noise`` with the
    same parameters) trains in the same worker pool, side by side with these folds. Parameters are
    ``stage_params(profile, **overrides)``: what notebook 04 uses for that profile, so notebooks 05 and 07
    get the same models when they call this standalone.
    """
    import json
    import shutil

    run_dir = config.resolve_run_dir(run_dir, profile)
    params = run_params(profile, seed, **overrides)
    out = run_dir / "kfold" / name
    if not force and is_complete(out, params):
        if not (out / "confusion.png").exists():
            result = load_result(out)
            figures(result, result.summary["task"], result.summary["label_names"], params["threshold"])
        return out
    stored, new = out / PARAMS_FILE, _jsonable(params)
    old = json.loads(stored.read_text()) if stored.exists() else None
    if out.exists() and (force or old != new):  # other (or unknown) parameters: start clean, never resume stale state
        if (out / "metrics.json").exists():  # a finished run is replaced: say so, and what changed
            changed = sorted(k for k in {*(old or {}), *new} if (old or {}).get(k) != new.get(k))
            print(f"[kfold] {out}: replacing a finished run ({'forced' if force else f'changed: {changed}'})",
                  flush=True)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(stored, new)  # same parameters next time -> resume the folds
    ds, group_col = build_stage_dataset(params, run_dir, profile, seed)
    eval_col = "truth" if "truth" in ds.table and ds.task == "binary" else None
    train_mask = None
    if eval_col and params["label_source"] == "reports":  # synthetic cohort: every crop scored against the truth
        ds_truth, _ = build_stage_dataset(params, run_dir, profile, seed, label_source="truth")
        ds, train_mask = report_arm(ds, ds_truth)
    cfg = train_config(params, ds.task, seed, progress)
    kw = _run_kwargs(params, group_col)
    if not (label_noise and train_mask is not None):
        result = run_kfold(ds, out, cfg, eval_col=eval_col, train_mask=train_mask, **kw)
    else:  # one pool for both arms: 2n folds keep every worker busy where n alone would leave one idle
        folds = assign_folds(ds, group_col, params["n_splits"], params["test_fraction"], cfg.seed, eval_col)
        noise_dir = out / "label_noise"
        if noise_dir.exists():
            shutil.rmtree(noise_dir)
        pool = fold_pool(2 * params["n_splits"])
        try:
            with ThreadPoolExecutor(1) as side:
                truth_arm = side.submit(run_kfold, ds_truth, noise_dir / "truth", cfg, folds=folds, eval_col="truth",
                                        pool=pool, **kw)
                result = run_kfold(ds, out, cfg, eval_col=eval_col, train_mask=train_mask, folds=folds, pool=pool,
                                   **kw)
                truth_result = truth_arm.result()
        finally:
            if pool[0] is not None:
                pool[0].shutdown()
        noise_summary(ds, train_mask, {"reports": result, "truth": truth_result}, noise_dir)
        write_json(noise_dir / PARAMS_FILE, new)  # written last: the study is complete
    figures(result, ds.task, ds.label_names, params["threshold"])
    return out


def load_result(out_dir: str | Path) -> KFoldResult:
    """A finished k-fold run read back from its folder (what ``run_kfold`` returned when it trained it)."""
    import json

    out_dir = Path(out_dir)
    if not (out_dir / "metrics.json").exists():
        raise DataError(out_dir, "no metrics.json: the k-fold run has not finished (call ensure_kfold)")

    def read(name: str) -> pd.DataFrame:
        path = out_dir / name
        return pd.read_csv(path) if path.exists() and path.stat().st_size > 1 else pd.DataFrame()

    ckpts = fold_checkpoints(out_dir)
    summary = json.loads((out_dir / "metrics.json").read_text())
    return KFoldResult(read("oof.csv"), read("test_predictions.csv"), summary, read("ensembles.csv"), read("logs.csv"),
                       ckpts, out_dir)


def ensure_label_noise(run_dir: str | Path | None = None, profile: str = "smoke", seed: int = config.DEFAULT_SEED,
                       name: str = STAGE_NAME, **overrides) -> tuple[pd.DataFrame, dict[str, KFoldResult]]:
    """Label-noise study on the synthetic cohort with stage 04's parameters (cached in ``kfold/<name>/label_noise/``):
    the same network and folds over every crop with a ground-truth label, trained on report vs true labels."""
    import json

    run_dir = config.resolve_run_dir(run_dir, profile)
    params = run_params(profile, seed, **overrides)
    from lib import datasets

    if not datasets.has_truth(params["dataset"]):
        raise ValueError(f"the label-noise study needs a data set with a ground truth beside its report labels "
                         f"(dataset='synthetic-ct'), got {params['dataset']!r}")
    main_dir = run_dir / "kfold" / name
    noise_dir = main_dir / "label_noise"
    table_path, pfile = noise_dir / "label_noise.csv", noise_dir / PARAMS_FILE
    # stage 04's own run is the report arm when the study trains the same model on the same inputs
    reuse = params["label_source"] == "reports" and is_complete(main_dir, params)
    if table_path.exists() and pfile.exists() and json.loads(pfile.read_text()) == _jsonable(params):
        reports_dir = noise_dir / "reports" if (noise_dir / "reports").exists() else main_dir
        return pd.read_csv(table_path), {"reports": load_result(reports_dir), "truth": load_result(noise_dir / "truth")}
    if noise_dir.exists():
        import shutil

        shutil.rmtree(noise_dir)
    ds_r, group_col = build_stage_dataset(params, run_dir, profile, seed, label_source="reports")
    ds_t, _ = build_stage_dataset(params, run_dir, profile, seed, label_source="truth")
    cfg = train_config(params, ds_t.task, seed)
    reports, folds = None, None
    if reuse:  # its folds too: the truth arm must train on exactly the same split
        reports = load_result(main_dir)
        folds = pd.read_csv(main_dir / "folds.csv")["fold"].to_numpy()
    table, results = label_noise_study(ds_r, ds_t, noise_dir, cfg, folds=folds, reports_result=reports,
                                       **_run_kwargs(params, group_col))
    write_json(pfile, params)  # written last: marks the study complete
    return table, results


# ----------------------------------------------------------------------------- predict / merge


#: Inputs decoded and scored at once by :func:`predict`: memory holds one chunk of arrays whatever the cohort's
#: size. A multiple of ``predict_probs``' batch, so the network sees the same batches as in one pass.
PREDICT_CHUNK = 512


def _input_items(source: Path, spec: dict) -> list:
    """What to predict in ``source``: crop index rows (a crops folder with ``index.csv``) or image paths."""
    if spec.get("source") == "crops" or (source / "index.csv").exists():
        index = pd.read_csv(source / "index.csv") if (source / "index.csv").exists() else pd.DataFrame(
            {"path": [str(p.relative_to(source)) for p in sorted(source.rglob("*.npz"))]})
        index = index[index["path"].astype(str).str.endswith(".npz")]
        for col in ("organ", "crop_mode"):  # only the crops the model was trained on (organ, bbox/seg/25d)
            if spec.get(col) and col.removeprefix("crop_") in index:
                index = index[index[col.removeprefix("crop_")] == spec[col]]
        return index.to_dict("records")
    return [str(p) for p in ([source] if source.is_file() else sorted(
        p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in splits.IMAGE_SUFFIXES))]


def _input_chunks(source: str | Path, spec: dict, skipped: SkippedCases, scheduler: str | None = None,
                  chunk: int = PREDICT_CHUNK) -> Iterator[tuple[list, np.ndarray]]:
    """(items kept, stacked network inputs) for a folder of images, a crops folder or a single file, ``chunk``
    inputs at a time and in listing order; unreadable inputs go to ``skipped``.

    Inputs decode in this process, or on a Dask cluster with ``scheduler`` (``lib.cluster``, one executor for
    all chunks). Only one chunk of arrays exists at a time.
    """
    from lib import cluster

    source = Path(source)
    items = _input_items(source, spec)
    with cluster.executor(scheduler, n_jobs=len(items), workers=None if scheduler else 1) as ex:
        window = max(1, cluster.JOBS_PER_WORKER * ex.n_workers)
        for start in range(0, len(items), max(1, chunk)):
            part = items[start:start + max(1, chunk)]
            decoded: list = [None] * len(part)
            for i, result in ex.imap(decode_input, enumerate((str(source), item, spec) for item in part), window):
                decoded[i] = result
            kept, xs = [], []
            for item, (x, skips) in zip(part, decoded, strict=True):
                skipped.rows.extend(skips)
                if x is not None:
                    kept.append(item)
                    xs.append(x)
            if xs:
                yield kept, np.stack(xs)


def decode_input(source: str, item: dict | str, spec: dict) -> tuple[np.ndarray | None, list[dict]]:
    """One input's network array (a crop index row under ``source``, or an image path), or None and the
    skip row naming the file and the problem: a worker's job for :func:`predict`."""
    from lib import imageio
    from lib.datasets import crop_to_input, read_crop

    try:
        if isinstance(item, dict):
            image, mask = read_crop(Path(source) / item["path"])
            return crop_to_input(image, mask, spec.get("kind", "slab"), int(spec.get("n_slices", 8)),
                                 int(spec.get("size", 64)), spec.get("mask_mode", "none")), []
        return imageio.load_input(Path(item), spec), []
    except DataError as exc:
        skipped = SkippedCases()
        name = str(item.get("case_id", item["path"])) if isinstance(item, dict) else Path(item).name
        skipped.add(name, exc, stage="predict")
        return None, skipped.rows


_PREDICT_CACHE: dict[str, object] = {}  # the inputs' id table, skip rows and per-checkpoint probabilities


def _cached_probs(checkpoints: Sequence[str | Path], source: str | Path, spec: dict, task: str,
                  device: torch.device, skipped: SkippedCases, scheduler: str | None = None,
                  chunk: int = PREDICT_CHUNK) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """(id table, probabilities of each checkpoint) for the inputs of ``source``, streamed chunk by chunk.

    Why a cache: notebook 04 predicts with each fold model and then with their ensemble; probabilities (a few
    numbers per input) are kept per folder content, recipe and checkpoint, so each input is decoded once per
    new checkpoint set, and decoded arrays are never kept.
    """
    source = Path(source)
    files = sorted(source.rglob("*")) if source.is_dir() else [source]
    key = fingerprint([spec, str(device)], stamps=[f.resolve() for f in files if f.is_file()])
    if _PREDICT_CACHE.get("key") != key:
        _PREDICT_CACHE.clear()
        _PREDICT_CACHE.update(key=key, table=None, skipped=[], probs={})
    probs: dict = _PREDICT_CACHE["probs"]
    ckpt_keys = [fingerprint(str(device), stamps=[Path(c).resolve()]) for c in checkpoints]
    missing = {k: c for k, c in zip(ckpt_keys, checkpoints, strict=True) if k not in probs}
    if missing or _PREDICT_CACHE["table"] is None:
        nets = {k: models.load_checkpoint(c, device)[0] for k, c in missing.items()}
        fresh, kept = SkippedCases(), []
        parts: dict[str, list[np.ndarray]] = {k: [] for k in nets}
        for items, x in _input_chunks(source, spec, fresh, scheduler, chunk):
            kept.extend(items)
            xt = torch.from_numpy(x)
            for k, net in nets.items():
                parts[k].append(predict_probs(net, xt, task))
        if not kept:
            raise DataError(source, f"no usable inputs to predict ({len(fresh)} skipped)")
        table = pd.DataFrame(kept) if isinstance(kept[0], dict) else pd.DataFrame({"path": kept})
        _PREDICT_CACHE.update(table=table.reset_index(drop=True), skipped=fresh.rows)
        probs.update({k: np.concatenate(p) for k, p in parts.items()})
    skipped.rows.extend(_PREDICT_CACHE["skipped"])
    return _PREDICT_CACHE["table"].copy(), [probs[k] for k in ckpt_keys]


def predict(checkpoints: Sequence[str | Path], source: str | Path, out_csv: str | Path | None = None,
            how: str = "mean", threshold: float = 0.5, device: str = "auto", scheduler: str | None = None,
            chunk: int = PREDICT_CHUNK) -> pd.DataFrame:
    """Predictions CSV for a folder of images or crops with one model or a fold ensemble (``mean`` | ``mode``).

    Columns: ids (``path`` or crop index columns), ``prob_<label>`` (mean over models), ``pred`` (argmax /
    threshold, or the majority vote with ``how='mode'``), ``n_models``. Unreadable inputs are listed in
    ``skipped_predict.csv`` beside the output. ``scheduler``: decode the inputs on a Dask cluster
    (``lib.cluster``); the models run in this process. Inputs are decoded and scored ``chunk`` at a time, so
    memory holds one chunk of arrays however many inputs the folder has.
    """
    if how not in ("mean", "mode"):
        raise ValueError(f"how must be mean|mode, got {how!r}")
    if not checkpoints:
        raise ValueError("predict: no checkpoints given")
    dev = config.device(device)
    meta = models.load_checkpoint(checkpoints[0], dev)[1]
    skipped = SkippedCases()
    table, probs = _cached_probs(checkpoints, source, meta.get("preprocessing", {}), meta["task"], dev, skipped,
                                 scheduler, chunk)
    names = list(meta.get("label_names") or [f"class{i}" for i in range(meta["num_classes"])])
    mean = metrics.ensemble_mean(probs)
    p2 = mean.reshape(len(mean), -1)
    cols = names if meta["task"] != "binary" else names[-1:]
    for j, n in enumerate(cols):
        table[f"prob_{n}"] = p2[:, j]
    hard = [metrics.predictions_from_probs(p, meta["task"], threshold) for p in probs]
    pred = metrics.ensemble_vote(hard) if how == "mode" else metrics.predictions_from_probs(mean, meta["task"],
                                                                                             threshold)
    pred = np.asarray(pred).reshape(len(table), -1)
    table["pred"] = pred[:, 0] if pred.shape[1] == 1 else ["|".join(map(str, r)) for r in pred]
    if meta["task"] == "multiclass":
        table["pred_label"] = [names[i] for i in table["pred"]]
    table["n_models"] = len(checkpoints)
    if out_csv is not None:
        out_csv = Path(out_csv)
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out_csv, index=False)
        if len(skipped):
            skipped.save(out_csv.with_name("skipped_predict.csv"))
    return table


def merge(csvs: Sequence[str | Path | pd.DataFrame], how: str = "mean", key: str | None = None,
          threshold: float = 0.5, out_csv: str | Path | None = None) -> pd.DataFrame:
    """Combine several predictions CSVs row-by-key: mean of ``prob_*`` columns, or mode of ``pred``."""
    if how not in ("mean", "mode"):
        raise ValueError(f"how must be mean|mode, got {how!r}")
    frames = [c if isinstance(c, pd.DataFrame) else pd.read_csv(c) for c in csvs]
    if not frames:
        raise ValueError("merge: no predictions given")
    key = key or next((k for k in ("path", "case_id") if k in frames[0]), None)
    if key is None or any(key not in f for f in frames):
        raise ValueError(f"merge: every CSV needs the key column {key!r}")
    prob_cols = [c for c in frames[0] if c.startswith("prob_")]
    stacked = pd.concat([f.assign(_model=i) for i, f in enumerate(frames)], ignore_index=True)
    counts = stacked.groupby(key)["_model"].nunique()
    if (counts < len(frames)).any():
        missing = list(counts.index[counts < len(frames)][:5])
        raise DataError(key, f"{int((counts < len(frames)).sum())} rows are not in every CSV (first: {missing})")
    out = stacked.groupby(key, sort=False)[prob_cols].mean().reset_index()
    if how == "mode":
        if "pred" not in stacked:
            raise ValueError("merge how='mode' needs a 'pred' column in every CSV")
        votes = stacked.pivot(index=key, columns="_model", values="pred").loc[out[key]]
        out["pred"] = metrics.ensemble_vote([votes[c].to_numpy() for c in votes.columns])
    else:
        p = out[prob_cols].to_numpy()
        out["pred"] = p.argmax(1) if len(prob_cols) > 1 else (p[:, 0] >= threshold).astype(int)
    out["n_models"] = len(frames)
    if out_csv is not None:
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        out.to_csv(out_csv, index=False)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lib.kfold", description="Predict with fold models; merge CSVs.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("predict", help="predictions CSV for a folder of images or crops")
    p.add_argument("--ckpt", nargs="+", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--how", default="mean", choices=["mean", "mode"])
    p.add_argument("--threshold", type=float, default=0.5)
    m = sub.add_parser("merge", help="combine predictions CSVs by mean or mode")
    m.add_argument("csvs", nargs="+")
    m.add_argument("--how", default="mean", choices=["mean", "mode"])
    m.add_argument("--key", default=None)
    m.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "predict":
        df = predict(args.ckpt, args.input, args.out, args.how, args.threshold)
    else:
        df = merge(args.csvs, args.how, args.key, out_csv=args.out)
    print(f"wrote {len(df)} rows to {args.out}")


if __name__ == "__main__":
    main()
