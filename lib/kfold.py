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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from lib import config, metrics, models, splits, train
from lib.datasets import CachedDataset, make_augment
from lib.io import DataError, SkippedCases


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
    frame = pd.DataFrame({"group": ds.table[group_col].astype(str).to_numpy(),
                          "label": _strata(ds, eval_col).to_numpy()})
    folds = pd.Series(np.zeros(len(frame), dtype=int), name="fold")
    dev = np.ones(len(frame), dtype=bool)
    if test_fraction > 0:
        outer = splits.group_kfold(frame, max(2, round(1 / test_fraction)), "group", "label", seed=seed)
        dev = (outer != 0).to_numpy()
        folds[~dev] = -1
    inner = splits.group_kfold(frame[dev].reset_index(drop=True), n_splits, "group", "label", seed=seed + 1)
    folds[dev] = inner.to_numpy()
    splits.check_leakage(folds, frame["group"])
    return folds


def _loss_for(ds: CachedDataset, idx: np.ndarray, uncertain: str) -> train.Callable:
    y = ds.y[idx].numpy()
    if ds.task == "multiclass":
        return train.make_loss("multiclass", train.class_weights(y, len(ds.label_names)))
    return train.make_loss(ds.task, train.positive_weights(y, uncertain), uncertain)


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
              model_kwargs: dict | None = None) -> tuple[torch.nn.Module, pd.DataFrame]:
    """One model on rows ``tr_idx``, validated on ``va_idx`` (weights for imbalance from the training rows only).

    Returns the model holding its best weights and the epoch log; ``out_dir`` gets best/last.pt and log.csv.
    """
    if not len(tr_idx) or not len(va_idx):
        raise ValueError(f"empty split: {len(tr_idx)} training and {len(va_idx)} validation rows")
    config.seed_everything(cfg.seed)
    model = models.create_model(model_name, ds.in_chans, ds.num_classes, pretrained=pretrained, **(model_kwargs or {}))
    meta = models.checkpoint_meta(model_name, ds.in_chans, ds.num_classes, ds.task, ds.label_names,
                                  ds.preprocessing, **(model_kwargs or {}))
    aug = make_augment(augment, spatial_dims=ds.x.ndim - 2, seed=cfg.seed)
    tr = DataLoader(ds.subset(tr_idx, aug), batch_size=batch_size, shuffle=True,
                    drop_last=len(tr_idx) % batch_size == 1)  # a batch of one breaks BatchNorm
    va = DataLoader(ds.subset(va_idx), batch_size=max(batch_size, 64))
    evaluate = train.classification_metrics(ds.task, ds.label_names, uncertain)
    log = train.fit(model, tr, va, _loss_for(ds, tr_idx, uncertain), evaluate, cfg, out_dir, meta)
    return model, log


def run_kfold(ds: CachedDataset, out_dir: str | Path, cfg: train.TrainConfig, model_name: str = models.DEFAULT_MODEL,
              group_col: str = "patient_id", n_splits: int = 5, test_fraction: float = 0.2, augment: str = "light",
              batch_size: int = 32, eval_col: str | None = None, uncertain: str = "ignore", pretrained: bool = False,
              threshold: float = 0.5, n_boot: int = 1000, folds: pd.Series | None = None,
              model_kwargs: dict | None = None) -> KFoldResult:
    """Train one model per fold (``out_dir/fold<k>/best.pt``), predict its validation fold and the test part.

    ``eval_col`` names a table column with the labels to score against (e.g. ``truth`` on the synthetic
    cohort while training on report labels); default = the training labels. Writes ``oof.csv``,
    ``test_predictions.csv``, ``metrics.json``, ``ensembles.csv`` and ``logs.csv``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folds = assign_folds(ds, group_col, n_splits, test_fraction, cfg.seed, eval_col) if folds is None else folds
    folds = np.asarray(folds)
    names = ds.label_names
    test_idx = np.flatnonzero(folds == -1)
    oof_parts, logs, ckpts, test_probs = [], [], [], {}
    for k in range(n_splits):
        tr_idx, va_idx = np.flatnonzero((folds != k) & (folds >= 0)), np.flatnonzero(folds == k)
        model, log = train_one(ds, tr_idx, va_idx, out_dir / f"fold{k}", replace(cfg, seed=cfg.seed + k), model_name,
                               augment, batch_size, uncertain, pretrained, model_kwargs)
        logs.append(log.assign(fold=k))
        ckpts.append(out_dir / f"fold{k}" / "best.pt")
        p = predict_probs(model, ds.x[va_idx], ds.task)
        extra = {"fold": np.full(len(va_idx), k), "row": va_idx, "group": ds.table[group_col].to_numpy()[va_idx]}
        oof_parts.append(metrics.oof_frame(_truth(ds, va_idx, eval_col), p, ds.task, names, **extra))
        if len(test_idx):
            test_probs[f"fold{k}"] = predict_probs(model, ds.x[test_idx], ds.task)
    oof = pd.concat(oof_parts, ignore_index=True)
    oof = _with_ids(oof, ds)
    summary = metrics.per_fold(oof, ds.task, names, threshold=threshold, group_col="group", n_boot=n_boot,
                               seed=cfg.seed)
    test, comparison = _test_comparison(ds, test_idx, test_probs, eval_col, threshold, group_col)
    summary["test"] = comparison.to_dict(orient="records")
    summary["n_dev"], summary["n_test"], summary["n_splits"] = int((folds >= 0).sum()), len(test_idx), n_splits
    oof.to_csv(out_dir / "oof.csv", index=False)
    test.to_csv(out_dir / "test_predictions.csv", index=False)
    comparison.to_csv(out_dir / "ensembles.csv", index=False)
    logs_df = pd.concat(logs, ignore_index=True)
    logs_df.to_csv(out_dir / "logs.csv", index=False)
    metrics.save_metrics(summary, out_dir / "metrics.json")
    ds.skipped.save(out_dir / "skipped_dataset.csv")
    return KFoldResult(oof, test, summary, comparison, logs_df, ckpts, out_dir)


def _with_ids(frame: pd.DataFrame, ds: CachedDataset) -> pd.DataFrame:
    ids = [c for c in ("case_id", "patient_id", "organ", "path", "target", "label") if c in ds.table]
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


def label_noise_study(ds_reports: CachedDataset, ds_truth: CachedDataset, out_dir: str | Path,
                      cfg: train.TrainConfig, **kw) -> tuple[pd.DataFrame, dict[str, KFoldResult]]:
    """The same model and folds trained on report-derived vs ground-truth labels, both scored on the truth.

    Rows are matched on (case_id, structure) so both runs see the same crops and the same folds; the
    difference in out-of-fold AUC is the cost of learning from text.
    """
    key = ["case_id", "structure"]
    truth_pos = ds_truth.table.reset_index().set_index(key)["index"]
    rows = ds_reports.table.set_index(key).index
    common = rows.isin(truth_pos.index)
    ds_r = ds_reports.subset(np.flatnonzero(common), ds_reports.transform)
    ds_t = ds_truth.subset(truth_pos.loc[rows[common]].to_numpy(), ds_truth.transform)
    folds = assign_folds(ds_r, kw.get("group_col", "patient_id"), kw.get("n_splits", 5), kw.get("test_fraction", 0.2),
                         cfg.seed, eval_col="truth")
    results = {"reports": run_kfold(ds_r, Path(out_dir) / "reports", cfg, folds=folds, eval_col="truth", **kw),
               "truth": run_kfold(ds_t, Path(out_dir) / "truth", cfg, folds=folds, eval_col="truth", **kw)}
    agree = float((ds_r.table["target"].to_numpy() == ds_t.table["target"].to_numpy()).mean())
    table = noise_table(results).assign(label_agreement=agree)
    table.to_csv(Path(out_dir) / "label_noise.csv", index=False)
    return table, results


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


# ----------------------------------------------------------------------------- predict / merge


def _inputs_for(source: str | Path, spec: dict, skipped: SkippedCases) -> tuple[pd.DataFrame, np.ndarray]:
    """Network inputs for a folder of images, a crops folder (with ``index.csv``) or a single file."""
    from lib import imageio
    from lib.datasets import crop_to_input, read_crop

    source = Path(source)
    if spec.get("source") == "crops" or (source / "index.csv").exists():
        index = pd.read_csv(source / "index.csv") if (source / "index.csv").exists() else pd.DataFrame(
            {"path": [str(p.relative_to(source)) for p in sorted(source.rglob("*.npz"))]})
        if spec.get("organ") and "organ" in index:
            index = index[index["organ"] == spec["organ"]]
        rows, xs = [], []
        for r in index.to_dict("records"):
            try:
                image, mask = read_crop(source / r["path"])
                xs.append(crop_to_input(image, mask, spec.get("kind", "slab"), int(spec.get("n_slices", 8)),
                                        int(spec.get("size", 64)), spec.get("mask_mode", "none")))
                rows.append(r)
            except DataError as exc:
                skipped.add(str(r.get("case_id", r["path"])), exc, stage="predict")
        table = pd.DataFrame(rows)
    else:
        files = [source] if source.is_file() else sorted(
            p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in splits.IMAGE_SUFFIXES)
        kept, xs = [], []
        for p in files:
            try:
                xs.append(imageio.load_input(p, spec))
                kept.append(str(p))
            except DataError as exc:
                skipped.add(p.name, exc, stage="predict")
        table = pd.DataFrame({"path": kept})
    if not xs:
        raise DataError(source, f"no usable inputs to predict ({len(skipped)} skipped)")
    return table.reset_index(drop=True), np.stack(xs)


def predict(checkpoints: Sequence[str | Path], source: str | Path, out_csv: str | Path | None = None,
            how: str = "mean", threshold: float = 0.5, device: str = "auto") -> pd.DataFrame:
    """Predictions CSV for a folder of images or crops with one model or a fold ensemble (``mean`` | ``mode``).

    Columns: ids (``path`` or crop index columns), ``prob_<label>`` (mean over models), ``pred`` (argmax /
    threshold, or the majority vote with ``how='mode'``), ``n_models``. Unreadable inputs are listed in
    ``skipped_predict.csv`` beside the output.
    """
    if how not in ("mean", "mode"):
        raise ValueError(f"how must be mean|mode, got {how!r}")
    if not checkpoints:
        raise ValueError("predict: no checkpoints given")
    dev = config.device(device)
    loaded = [models.load_checkpoint(c, dev) for c in checkpoints]
    meta = loaded[0][1]
    skipped = SkippedCases()
    table, x = _inputs_for(source, meta.get("preprocessing", {}), skipped)
    probs = [predict_probs(m, torch.from_numpy(x), meta["task"]) for m, _ in loaded]
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
    table["n_models"] = len(loaded)
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
