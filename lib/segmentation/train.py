"""Segmentation training and grouped k-fold through the shared stages, and the denoising ablation.

One fold is ``train_segmenter``: ``lib.train.fit`` with a Dice + BCE loss and a Dice score on the validation
images, starting from an output bias at the training foreground's log-odds (``model.init_output_bias``). The
k-fold run is ``lib.kfold.run_kfold`` with that trainer: the same fold jobs, worker pool, leakage check and
out-of-fold tables as classification. Nothing in training reads the validation fold, which is the scored fold:
a fixed cosine schedule, no early stopping, last-epoch weights (``select='last'``). ``lib.metrics`` scores each
image (Dice/IoU) and bootstraps the means by patient.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lib import config, kfold, metrics, train
from lib.datasets import CachedDataset
from lib.segmentation.data import RawSet
from lib.segmentation.dataset import SegDataset, prepare_dataset
from lib.segmentation.model import DEFAULT_SEGMENTER, build_model, init_output_bias, make_seg_loss, network_kwargs
from lib.segmentation.preprocess import Preprocess


@dataclass
class SegConfig:
    """Knobs of a segmentation run (model, loss, optimisation); every field is a notebook parameter."""

    model: str = DEFAULT_SEGMENTER  # lib.models name: smp:<arch>-<encoder> or monai:<net>
    loss: str = "dicece"
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    augment: str = "light"
    threshold: float = 0.5
    patch_size: int = 0  # > 0: train on lesion-aware patches of this size (whole images at validation/inference)
    pos_fraction: float = 0.5  # share of training patches centred on a foreground pixel (patch_size > 0 only)
    patches_per_epoch: int = 0  # training patches per epoch (0: one per training image)
    n_splits: int = 5
    n_boot: int = 1000  # bootstrap replicates of the confidence intervals (patients resampled)
    seed: int = config.DEFAULT_SEED
    resume: bool = True
    progress: bool = False
    threads: int = 0  # torch intra-op threads for lib.train.fit (0 = torch's default; 1 on a crowded CPU)

    def train_config(self) -> train.TrainConfig:
        """``lib.train.fit``'s settings: Adam with a cosine schedule for a fixed number of epochs, last epoch shipped.

        Nothing in training reads the validation fold (no plateau schedule, no early stopping, no best epoch): in
        the k-fold that fold is the one scored, so anything tuned on it would flatter the score.
        """
        return train.TrainConfig(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, optimizer="adam",
                                 scheduler="cosine", patience=0, monitor="dice", mode="max",
                                 seed=self.seed, resume=self.resume, progress=self.progress, threads=self.threads,
                                 select="last")


def seg_metrics(threshold: float = 0.5):
    """An ``evaluate_fn`` for ``lib.train.fit``: mean Dice, IoU, Dice over images with a lesion, and the share of
    pixels predicted foreground (``pred_fg``: 0 when a fold collapses to empty masks)."""

    def evaluate(logits: Tensor, targets: Tensor) -> dict[str, float]:
        pred = logits.float().sigmoid().numpy() > threshold
        dice, iou = metrics.dice_iou(pred, targets.numpy() > 0.5)
        pos = targets.reshape(len(targets), -1).amax(1).numpy() > 0.5
        return {"dice": float(dice.mean()), "iou": float(iou.mean()),
                "dice_pos": float(dice[pos].mean()) if pos.any() else float("nan"), "pred_fg": float(pred.mean())}

    return evaluate


def train_segmenter(ds: CachedDataset, tr_idx: np.ndarray, va_idx: np.ndarray, out_dir: str | Path,
                    cfg: train.TrainConfig, model_name: str = DEFAULT_SEGMENTER, augment: str | None = "light",
                    batch_size: int = 16, uncertain: str = "ignore", pretrained: bool = False,
                    model_kwargs: dict | None = None, bn_momentum: float | None = None, loss: str = "dicece",
                    threshold: float = 0.5, patch_size: int = 0, pos_fraction: float = 0.5,
                    patches_per_epoch: int = 0) -> tuple[nn.Module, pd.DataFrame]:
    """One fold of a segmentation set through ``lib.train.fit`` (``lib.kfold.run_kfold``'s ``trainer``).

    Validation runs on whole images (the networks are fully convolutional); training on whole images or, with
    ``patch_size``, on lesion-aware patches. ``uncertain`` and ``bn_momentum`` are classification settings that
    ``run_kfold`` passes to every trainer; they do not apply here.
    """
    tr_idx, va_idx = np.asarray(tr_idx, dtype=int), np.asarray(va_idx, dtype=int)
    config.seed_everything(cfg.seed)
    kw = {**network_kwargs(model_name), **(model_kwargs or {})}
    model = build_model(model_name, ds.in_chans, 1, pretrained=pretrained, **kw)
    init_output_bias(model, float(ds.y[tr_idx].float().mean()))  # the training folds' foreground share
    train_ds = SegDataset(ds.subset(tr_idx), augment, cfg.seed, patch_size, pos_fraction, patches_per_epoch)
    val_ds = SegDataset(ds.subset(va_idx), None)
    # a last batch of one image breaks batch norm at a 1x1 bottleneck (size 32): drop that single image
    train_loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(cfg.seed),
                              drop_last=len(train_ds) % batch_size == 1)
    val_loader = DataLoader(val_ds, batch_size=max(batch_size, 32), shuffle=False)
    from lib.models import checkpoint_meta

    meta = {**checkpoint_meta(model_name, ds.in_chans, 1, "segmentation", ds.label_names, ds.preprocessing, **kw),
            "threshold": float(threshold)}
    settings = {"loss": loss, "augment": augment, "batch_size": batch_size, "patch_size": patch_size,
                "pos_fraction": pos_fraction, "patches_per_epoch": patches_per_epoch, "pretrained": pretrained,
                "train_rows": train.rows_digest(tr_idx), "val_rows": train.rows_digest(va_idx)}
    log = train.fit(model, train_loader, val_loader, make_seg_loss(loss), seg_metrics(threshold), cfg, out_dir, meta,
                    settings)
    return model, log


def make_folds(table: pd.DataFrame, n_splits: int = 5, seed: int = config.DEFAULT_SEED) -> np.ndarray:
    """Fold per row by ``lib.splits.group_kfold``: a patient (``group``) never spans folds; ``n_splits >=``
    the number of patients gives leave-one-patient-out. Lesion/no-lesion images are balanced across folds
    when both kinds occur in at least ``n_splits`` patients (else folds are grouped only)."""
    from lib.splits import group_kfold

    n_groups = table["group"].nunique()
    if n_groups < 2:
        raise ValueError(f"need at least 2 groups (patients) for grouped k-fold, got {n_groups}")
    k = min(n_splits, n_groups)
    t = table.reset_index(drop=True).copy()
    t["stratum"] = t.get("has_lesion", 0)
    if t.groupby("stratum")["group"].nunique().min() < k:
        t["stratum"] = 0
    return group_kfold(t, n_splits=k, group_col="group", label_col="stratum", seed=seed).to_numpy()


def run_stamp(data: CachedDataset, cfg: SegConfig) -> dict:
    """What a k-fold run depends on (settings, preprocessing, target, a hash of the tensors): resume needs a match."""
    import hashlib

    digest = hashlib.sha256(data.x.numpy().tobytes())
    digest.update(data.y.numpy().tobytes())
    digest.update("|".join(map(str, data.table.case_id)).encode())
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "progress", "threads")}
    return json.loads(json.dumps({"config": settings, "preprocessing": data.preprocessing,
                                  "target": data.label_names, "data_sha256": digest.hexdigest()}))


def cross_validate(data: CachedDataset, cfg: SegConfig, out_dir: str | Path,
                   folds: Sequence[int] | None = None) -> kfold.KFoldResult:
    """Grouped k-fold of a prepared set by ``lib.kfold.run_kfold`` with ``train_segmenter``.

    Writes what every k-fold run writes (``fold<k>/{best,last}.pt, log.csv``, ``oof.csv`` with per-image Dice/IoU,
    ``folds.csv``, ``metrics.json`` with CIs resampling patients) plus ``stamp.json``: a run resumes from its
    ``last.pt`` files only when data and settings are the same. ``folds`` trains and scores those folds alone.
    """
    out_dir = Path(out_dir)
    fold_of = make_folds(data.table, cfg.n_splits, cfg.seed)
    stamp, stamp_path = run_stamp(data, cfg), out_dir / "stamp.json"
    same = stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp_path.write_text(json.dumps(stamp, indent=1))
    tcfg = replace(cfg.train_config(), resume=cfg.resume and same)
    return kfold.run_kfold(
        data, out_dir, tcfg, model_name=cfg.model, group_col="group", n_splits=int(fold_of.max()) + 1,
        test_fraction=0.0, augment=cfg.augment, batch_size=cfg.batch_size, threshold=cfg.threshold,
        n_boot=cfg.n_boot, folds=fold_of, trainer=train_segmenter,
        trainer_kwargs={"loss": cfg.loss, "threshold": cfg.threshold, "patch_size": cfg.patch_size,
                        "pos_fraction": cfg.pos_fraction, "patches_per_epoch": cfg.patches_per_epoch},
        only_folds=folds)


def denoise_ablation(raw: RawSet, pre: Preprocess, cfg: SegConfig, filters: Sequence[str], out_dir: str | Path,
                     folds: Sequence[int] = (0,), target: str = "lesion",
                     reuse: kfold.KFoldResult | None = None) -> pd.DataFrame:
    """Same data, model and folds with each diffusion filter: per-image Dice/IoU plus preprocessing time.

    ``reuse`` is the main run (trained with ``pre.denoise``): its scores on ``folds`` stand for that filter
    instead of training it again (same data, settings and seed give the same model).
    """
    frames = []
    for f in filters:
        t0 = time.perf_counter()
        data = prepare_dataset(raw, replace(pre, denoise=f), target)
        prep_s = time.perf_counter() - t0
        if reuse is not None and f == pre.denoise and set(folds) <= set(reuse.oof.fold):
            oof = reuse.oof[reuse.oof.fold.isin(list(folds))]
        else:
            oof = cross_validate(data, cfg, Path(out_dir) / f"denoise-{f}", folds).oof
        frames.append(oof.assign(denoise=f, preprocess_s=prep_s))
    return pd.concat(frames, ignore_index=True)


def ablation_summary(abl: pd.DataFrame, reference: str = "none", n_boot: int = metrics.N_BOOT,
                     seed: int = config.DEFAULT_SEED) -> pd.DataFrame:
    """Per filter: mean Dice/IoU with 95% CIs and the paired Dice change vs ``reference`` on the same images,
    every interval resampling patients (``lib.metrics.mean_ci``)."""
    rows = []
    ref = abl[abl.denoise == reference].set_index("case_id").dice if reference in set(abl.denoise) else None
    for f, g in abl.groupby("denoise", sort=False):
        row: dict[str, Any] = {"denoise": f, "n": len(g), "preprocess_s": float(g.preprocess_s.iloc[0])}
        for metric in ("dice", "iou"):
            lo, hi = metrics.mean_ci(g[metric].to_numpy(), g.group.to_numpy(), n_boot, seed)
            row.update({metric: float(g[metric].mean()), f"{metric}_lo": lo, f"{metric}_hi": hi})
        if ref is not None:
            delta = g.dice.to_numpy() - ref.reindex(g.case_id).to_numpy()
            lo, hi = metrics.mean_ci(delta, g.group.to_numpy(), n_boot, seed)
            row.update({"delta_dice": float(np.nanmean(delta)), "delta_lo": lo, "delta_hi": hi})
        rows.append(row)
    return pd.DataFrame(rows)
