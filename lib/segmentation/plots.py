"""Figures of notebook 06 and the cases it shows (seaborn / matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from lib import config
from lib.datasets import CachedDataset
from lib.segmentation.preprocess import Preprocess, preprocess_image


def _save(fig, path: str | Path | None, dpi: int = 120):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def plot_fold_scores(table: pd.DataFrame, path: str | Path | None = None):
    """Per-fold and pooled mean Dice and IoU with 95% bootstrap CIs (``lib.kfold.metrics_table`` of the run)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    long = pd.concat([pd.DataFrame({"part": table.index, "metric": m, "value": table[m], "lo": table[f"{m}_lo"],
                                    "hi": table[f"{m}_hi"]}) for m in ("dice", "iou")], ignore_index=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sns.pointplot(data=long, x="part", y="value", hue="metric", dodge=0.3, linestyles="none", errorbar=None, ax=ax)
    for j, m in enumerate(("dice", "iou")):
        sub = long[long.metric == m].reset_index(drop=True)
        xs = np.arange(len(sub)) + (j - 0.5) * 0.3
        ax.errorbar(xs, sub.value, yerr=[sub.value - sub.lo, sub.hi - sub.value], fmt="none",
                    ecolor=sns.color_palette()[j], capsize=3)
    ax.set(ylim=(0, 1), xlabel="", title="out-of-fold Dice / IoU (95% CI, patients resampled)")
    return _save(fig, path)


def plot_ablation(abl: pd.DataFrame, path: str | Path | None = None):
    """Per-image Dice for each denoising filter (box + points): the spread matters as much as the mean."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(6, 3.5))
    sns.boxplot(data=abl, x="denoise", y="dice", color="0.85", fliersize=0, ax=ax)
    sns.stripplot(data=abl, x="denoise", y="dice", hue="has_lesion", dodge=True, size=3, alpha=0.6, ax=ax)
    ax.set(ylim=(-0.02, 1.02), title="denoising ablation: per-image Dice (same folds, model, seed)")
    return _save(fig, path)


def plot_examples(data: CachedDataset, n: int = 6, seed: int = config.DEFAULT_SEED, path: str | Path | None = None):
    """Prepared network inputs (first channel) with the truth contour: what the model actually sees."""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(data.table.has_lesion == 1), np.flatnonzero(data.table.has_lesion == 0)
    pick = list(rng.choice(pos, min(len(pos), n - min(len(neg), 1)), replace=False)) + list(neg[:1])
    fig, axes = plt.subplots(1, len(pick), figsize=(2.6 * len(pick), 2.9), squeeze=False)
    for ax, i in zip(axes[0], pick, strict=True):
        ax.imshow(data.x[i, 0].numpy(), cmap="gray")
        if data.y[i, 0].any():
            ax.contour(data.y[i, 0].numpy(), levels=[0.5], colors="lime", linewidths=1)
        ax.set_title(f"{data.table.case_id.iloc[i]}\n{int(data.y[i].sum())} px", fontsize=8)
        ax.axis("off")
    return _save(fig, path, 110)


def plot_denoisers(image: np.ndarray, pre: Preprocess, filters: Sequence[str], path: str | Path | None = None):
    """One raw image through the preprocessing with each filter (first channel), side by side."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(filters), figsize=(2.8 * len(filters), 3), squeeze=False)
    for ax, f in zip(axes[0], filters, strict=True):
        ax.imshow(preprocess_image(image, replace(pre, denoise=f))[0][0], cmap="gray")
        ax.set_title(f, fontsize=9)
        ax.axis("off")
    return _save(fig, path, 110)


def pick_overlay_cases(oof: pd.DataFrame, metric: str = "dice", lesion_only: bool = True) -> pd.DataFrame:
    """Best, median and worst validated cases by ``metric`` (among images with a lesion when asked)."""
    df = oof[oof.has_lesion == 1] if lesion_only and oof.has_lesion.any() else oof
    df = df.sort_values(metric, ascending=False, kind="stable").reset_index(drop=True)
    idx = [0, len(df) // 2, len(df) - 1]
    return df.iloc[idx].assign(which=["best", "median", "worst"])


def plot_overlays(data: CachedDataset, maps: np.ndarray, cases: pd.DataFrame, threshold: float = 0.5,
                  path: str | Path | None = None):
    """Image with truth (green) and out-of-fold prediction (red) contours for the chosen cases."""
    import matplotlib.pyplot as plt

    pos = {c: i for i, c in enumerate(data.table.case_id)}
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 3.4), squeeze=False)
    for ax, row in zip(axes[0], cases.itertuples(), strict=True):
        i = pos[row.case_id]
        ax.imshow(data.x[i, 0].numpy(), cmap="gray")
        for m, colour in ((data.y[i, 0].numpy(), "lime"), (maps[i] > threshold, "red")):
            if np.asarray(m).any():
                ax.contour(np.asarray(m, dtype=float), levels=[0.5], colors=colour, linewidths=1)
        ax.set_title(f"{row.which}: {row.case_id}\nDice {row.dice:.2f}", fontsize=9)
        ax.axis("off")
    fig.suptitle("truth (green) vs prediction (red)")
    return _save(fig, path)
