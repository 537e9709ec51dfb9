"""Evaluate trained classifiers: ``metrics.json``, ROC, PR and confusion figures, per fold (or model) and pooled.

Two inputs: a finished k-fold run (its out-of-fold table: each fold scored on the rows it never trained on, then
all of them pooled), or weights files plus a class-per-folder image set (each model scored on the set, then their
mean as the ensemble). The numbers come from :mod:`lib.metrics` (bootstrap intervals, calibration), the figures
from its plotting functions, so they match what notebook 04 reports for the same predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lib import config, metrics
from lib.io import DataError

#: Files each evaluation writes into its output folder.
OUTPUTS = ("metrics.json", "roc.png", "pr.png", "confusion.png", "predictions.csv")


def _hard(task: str, y: np.ndarray, p: np.ndarray, label_names: Sequence[str], threshold: float
          ) -> tuple[np.ndarray, np.ndarray]:
    """(true class, predicted class) for a confusion panel; multilabel uses the first label."""
    if task == "multiclass":
        yi = np.asarray(y)
        if yi.dtype.kind in "OUS":
            yi = np.array([list(label_names).index(v) for v in yi])
        return yi.astype(int), np.asarray(p).argmax(1)
    yv = np.asarray(y, dtype=float).reshape(len(y), -1)[:, 0]
    pv = np.asarray(p, dtype=float).reshape(len(p), -1)[:, 0]
    ok = np.isin(yv, (0, 1))
    return yv[ok].astype(int), (pv[ok] >= threshold).astype(int)


def write_figures(frame: pd.DataFrame, task: str, label_names: Sequence[str], out_dir: Path, threshold: float,
                  group_col: str = "fold", pooled: str | None = "pooled") -> dict[str, Path]:
    """ROC, PR and confusion figures with one curve / panel per ``group_col`` value, plus ``pooled`` over all rows
    (None: no pooled panel, e.g. when the groups are models scored on the same rows)."""
    curves = metrics.fold_curves(frame, task, label_names, fold_col=group_col, pooled=pooled is not None)
    if pooled is not None and pooled != "pooled":
        curves[pooled] = curves.pop("pooled")
    names = list(label_names) if task == "multiclass" else ["negative", "positive"]
    panels = {}
    for key, part in frame.groupby(group_col, sort=True):
        panels[f"{group_col} {key}"] = _hard(task, *metrics.oof_arrays(part, task, label_names), label_names,
                                             threshold)
    if pooled is not None:
        panels[pooled] = _hard(task, *metrics.oof_arrays(frame, task, label_names), label_names, threshold)
    return {"roc": metrics.save_figure(metrics.plot_roc(curves), out_dir / "roc.png"),
            "pr": metrics.save_figure(metrics.plot_pr(curves), out_dir / "pr.png"),
            "confusion": metrics.save_figure(metrics.plot_confusion(panels, label_names=names),
                                             out_dir / "confusion.png")}


def evaluate_kfold(kfold_dir: str | Path, out_dir: str | Path | None = None, threshold: float | None = None,
                   n_boot: int = 200, seed: int = config.DEFAULT_SEED) -> dict:
    """Metrics per fold and pooled from a finished k-fold run's out-of-fold table (``lib.kfold.load_result``).

    Writes :data:`OUTPUTS` to ``out_dir`` (default ``<kfold_dir>/evaluate``) and returns the metrics.
    """
    from lib import kfold

    result = kfold.load_result(kfold_dir)
    summary = result.summary
    task, names = summary["task"], list(summary["label_names"])
    threshold = float(summary.get("threshold", 0.5) if threshold is None else threshold)
    if result.oof.empty or "fold" not in result.oof:
        raise DataError(Path(kfold_dir) / "oof.csv", "missing or without a fold column")
    out = Path(out_dir) if out_dir else Path(kfold_dir) / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    scores = metrics.per_fold(result.oof, task, names, threshold=threshold, n_boot=n_boot, seed=seed)
    scores["source"] = {"kfold_dir": str(kfold_dir), "n_rows": len(result.oof)}
    metrics.save_metrics(scores, out / "metrics.json")
    result.oof.to_csv(out / "predictions.csv", index=False)
    write_figures(result.oof, task, names, out, threshold)
    return scores


def folder_truth(data: str | Path) -> pd.DataFrame:
    """``path, label`` of a class-per-folder image set (``<root>/[<split>/]<class>/<image>``)."""
    from lib import splits

    root = Path(data)
    if not root.is_dir():
        raise DataError(root, "not a folder (expected class-per-folder images: <root>/[<split>/]<class>/<image>)")
    table = splits.scan_images(root)
    if table.empty:
        raise DataError(root, "no images found in class sub-folders")
    return table[["path", "label"]].assign(path=lambda t: t["path"].map(lambda p: str(Path(p).resolve())))


def evaluate_weights(checkpoints: Sequence[str | Path], data: str | Path, out_dir: str | Path,
                     threshold: float = 0.5, n_boot: int = 200, seed: int = config.DEFAULT_SEED,
                     scheduler: str | None = None) -> dict:
    """Score each checkpoint, and their mean when there are several, on a class-per-folder image set.

    Inputs are read as the models were trained (``lib.kfold.predict``: the checkpoint's preprocessing); the
    truth is the class folder, mapped to the checkpoint's label names. Writes :data:`OUTPUTS` to ``out_dir``.
    ``scheduler``: where the images are decoded (``lib.cluster``); the scores do not depend on it.
    """
    from lib import kfold, models

    if not checkpoints:
        raise ValueError("evaluate: no weights files given")
    for ckpt in checkpoints:
        if not Path(ckpt).is_file():
            raise DataError(ckpt, "weights file not found")
    meta = models.load_checkpoint(checkpoints[0], "cpu")[1]
    task, names = meta["task"], list(meta.get("label_names") or [])
    if task == "multilabel":
        raise ValueError(f"{checkpoints[0]}: multilabel models need a label table, not class folders")
    truth = folder_truth(data)
    classes = sorted(set(truth["label"]))
    if task == "binary":  # outputs name the positive class; any one other folder is the negative class
        if names[-1] not in classes or len(classes) != 2:
            raise DataError(data, f"class folders {classes}: a binary model of {names[-1]!r} needs a folder "
                                  f"{names[-1]!r} and one negative-class folder")
    elif set(classes) - set(names):
        raise DataError(data, f"class folders {sorted(set(classes) - set(names))} are not outputs of "
                              f"{checkpoints[0]} (outputs {names})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = []
    if len(checkpoints) > 1:  # one pass over the images scores every model; the calls below reuse its results
        kfold.predict(list(checkpoints), data, threshold=threshold, scheduler=scheduler)
    for k, ckpt in enumerate(checkpoints):
        pred = kfold.predict([ckpt], data, threshold=threshold, scheduler=scheduler)
        pred["path"] = pred["path"].map(lambda p: str(Path(p).resolve()))
        frames.append(pred.merge(truth, on="path", how="inner").assign(model=k))
    if len(checkpoints) > 1:
        probs = [f.filter(like="prob_").to_numpy() for f in frames]
        frames.append(frames[0].assign(model="ensemble", **dict(zip(frames[0].filter(like="prob_").columns,
                                                                     metrics.ensemble_mean(probs).T, strict=True))))
    table = pd.concat(frames, ignore_index=True)
    if task == "multiclass":
        table["y_true"] = table["label"].map(names.index)
    else:
        table[f"true_{names[-1]}"] = (table["label"] == names[-1]).astype(int)
    scores = {"task": task, "label_names": names, "threshold": threshold,
              "source": {"weights": [str(c) for c in checkpoints], "data": str(data), "n_rows": len(frames[0])},
              "models": {}}
    for key, part in table.groupby("model", sort=False):
        y, p = metrics.oof_arrays(part, task, names)
        scores["models"][str(key)] = metrics.summarize(y, p, task, names, threshold, n_boot=n_boot, seed=seed)
    metrics.save_metrics(scores, out / "metrics.json")
    table.to_csv(out / "predictions.csv", index=False)
    write_figures(table.assign(model=table["model"].astype(str)), task, names, out, threshold, group_col="model",
                  pooled=None)
    return scores


if __name__ == "__main__":  # python -m lib.evaluate: the same command as ``mednb evaluate``
    import sys

    from lib.cli import main

    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
