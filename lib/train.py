"""One training loop for every task (classification and segmentation), resumable and torchrun-ready.

Why: classification, k-fold and segmentation differ only in the loss and in how validation outputs
are scored, so they share ``fit``. The loop owns what is easy to get wrong: exact resume after an
interruption (epoch-seeded RNG + optimizer/scheduler state in ``last.pt``), early stopping on a named
metric, AMP where it helps (CUDA), channels_last memory layout, and DistributedDataParallel under ``torchrun``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from lib import config, recipes
from lib.models import read_checkpoint, save_checkpoint, to_channels_last, unwrap

UNCERTAIN_POLICIES = ("ignore", "positive", "negative")


@dataclass
class TrainConfig:
    """Knobs of ``fit``; every field is a notebook parameter."""

    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | adam | sgd, or any torch.optim optimizer by name (case-insensitive)
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # cosine | plateau | none
    patience: int = 0  # early stopping after this many epochs without improvement; 0 = off
    monitor: str = "auc"  # key of evaluate_fn's dict, or "val_loss"
    mode: str = "max"  # max | min
    amp: bool = True  # only used on CUDA (CPU bfloat16 autocast cost AUC on small from-scratch CNNs)
    channels_last: bool = True  # CUDA, and float32 CPU convolutions (oneDNN; ~1.4x faster for the k-fold CNN)
    grad_clip: float = 0.0  # max grad norm; 0 = off
    seed: int = config.DEFAULT_SEED
    device: str = "auto"
    resume: bool = True
    progress: bool = True
    threads: int = 0  # torch intra-op threads; 0 = torch's default (set 1 on an oversubscribed machine)
    ema_decay: float = 0.0  # > 0: validate and checkpoint an exponential moving average of the weights (timm)
    select: str = "best"  # weights shipped as best.pt: best on the monitor | last epoch (no selection on val)
    save_every: int = 0  # > 0: also keep epoch<N>.pt every this many epochs
    val_every: int = 1  # validate every this many epochs and after the last; > 1 only where nothing selects on it
    loss: str = "auto"  # auto (BCE / cross-entropy) | cross-entropy | bce | focal | label-smoothing (lib.recipes)
    extend: bool = False  # resume a run saved with fewer epochs, stretching its schedule to ``epochs``

    def __post_init__(self) -> None:
        self.optimizer = optimizer_name(self.optimizer)
        self.loss = recipes.loss_name(self.loss)
        if self.scheduler not in ("cosine", "plateau", "none"):
            raise ValueError(f"scheduler must be cosine|plateau|none, got {self.scheduler!r}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode must be max|min, got {self.mode!r}")
        if self.select not in ("best", "last"):
            raise ValueError(f"select must be best|last, got {self.select!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
        if self.val_every < 1:
            raise ValueError(f"val_every must be >= 1, got {self.val_every}")
        if self.val_every > 1 and (self.select == "best" or self.patience or self.scheduler == "plateau"):
            raise ValueError(f"val_every={self.val_every} needs select='last', patience=0 and a scheduler other than "
                             "plateau: best-epoch selection, early stopping and the plateau schedule read every "
                             "epoch's validation score")


#: TrainConfig fields that do not change what is trained (a resumed run may differ in them).
RUNTIME_FIELDS = ("device", "resume", "progress", "threads", "extend", "save_every", "val_every")
#: Checkpoint fields describing the model and its inputs; a resumed run must match them.
RECIPE_FIELDS = ("model_name", "in_chans", "num_classes", "task", "label_names", "preprocessing", "model_kwargs")


class ConfigChangedError(ValueError):
    """Resuming ``last.pt`` with other settings than it was trained with (the message names each change)."""


def optimizer_name(name: str) -> str:
    """``adamw``/``adam``/``sgd`` (the tuned recipes), else the exact ``torch.optim`` class name, matched
    case-insensitively; an unknown name is an error listing the choices."""
    lower = str(name).lower()
    if lower in ("adamw", "adam", "sgd"):
        return lower
    classes = {n.lower(): n for n, c in vars(torch.optim).items()
               if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer}
    if lower not in classes:
        raise ValueError(f"optimizer must be one of torch.optim's: {', '.join(sorted(classes.values()))}; "
                         f"got {name!r}")
    return classes[lower]


def config_changes(stored: dict, cfg: TrainConfig, stored_recipe: dict | None = None,
                   recipe: dict | None = None, stored_settings: dict | None = None,
                   settings: dict | None = None) -> list[str]:
    """``"key: old -> new"`` for each training setting (``TrainConfig``, model recipe field, and the caller's
    ``settings`` outside both, e.g. augmentation or batch size) that differs from a checkpoint's.

    ``epochs`` counts as unchanged when ``cfg.extend`` is set and the run grows (the schedule is stretched).
    A setting the checkpoint did not record counts as changed (``None`` before): its old value is unknown.
    """
    import json

    now = asdict(cfg)
    plain = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731 - tuples vs lists, paths vs strings
    out = []
    for key in sorted(set(stored) | set(now)):
        if key in RUNTIME_FIELDS or (key == "epochs" and cfg.extend and now[key] >= stored.get(key, 0)):
            continue
        if key in now and key in stored and plain(stored[key]) != plain(now[key]):
            out.append(f"{key}: {stored[key]!r} -> {now[key]!r}")
    for key in RECIPE_FIELDS:
        old, new = (stored_recipe or {}).get(key), (recipe or {}).get(key)
        if plain(old) != plain(new):
            out.append(f"{key}: {old!r} -> {new!r}")
    stored_settings, settings = stored_settings or {}, settings or {}
    for key in sorted(set(stored_settings) | set(settings)):
        old, new = stored_settings.get(key), settings.get(key)
        if plain(old) != plain(new):
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


def rows_digest(idx: np.ndarray) -> str:
    """Short fingerprint of a row selection (a changed split is a changed training run)."""
    import hashlib

    return hashlib.sha1(np.asarray(idx, dtype=np.int64).tobytes()).hexdigest()[:12]


# ----------------------------------------------------------------------------- losses


def apply_uncertain_policy(targets: Tensor, policy: str = "ignore") -> tuple[Tensor, Tensor]:
    """CheXpert-style labels (1, 0, -1 uncertain, NaN missing) -> (targets in {0,1}, mask of usable entries)."""
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy must be one of {UNCERTAIN_POLICIES}, got {policy!r}")
    targets = targets.float()
    valid = ~torch.isnan(targets)
    uncertain = targets == -1
    if policy == "ignore":
        valid = valid & ~uncertain
    fill = 1.0 if policy == "positive" else 0.0
    out = torch.where(uncertain, torch.full_like(targets, fill), targets)
    return torch.nan_to_num(out, nan=0.0), valid


def positive_weights(labels: np.ndarray | pd.DataFrame, policy: str = "ignore", max_weight: float = 20.0) -> Tensor:
    """``pos_weight`` per label = negatives / positives among usable labels (clipped), for imbalance."""
    y, valid = apply_uncertain_policy(torch.as_tensor(np.asarray(labels, dtype=np.float32)), policy)
    if y.ndim == 1:
        y, valid = y[:, None], valid[:, None]
    pos = (y * valid).sum(0)
    neg = ((1 - y) * valid).sum(0)
    return (neg / pos.clamp(min=1)).clamp(min=1 / max_weight, max=max_weight)


def class_weights(labels: np.ndarray, num_classes: int) -> Tensor:
    """Balanced class weights ``n / (k * count)`` (sklearn's ``class_weight='balanced'``)."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).astype(np.float32)
    return torch.as_tensor(counts.sum() / (num_classes * np.maximum(counts, 1)))


def make_loss(task: str, weight: Tensor | None = None, uncertain: str = "ignore") -> Callable[[Tensor, Tensor], Tensor]:
    """Loss for ``binary`` (BCE, pos_weight), ``multiclass`` (CE, class weights) or ``multilabel``.

    Binary and multi-label losses mask missing (NaN) and, with policy ``ignore``, uncertain (-1) targets.
    """
    if task == "multiclass":
        ce = nn.CrossEntropyLoss(weight=weight)

        def multiclass(logits: Tensor, targets: Tensor) -> Tensor:
            ce.to(logits.device)
            return ce(logits.float(), targets.long().view(-1))

        return multiclass
    if task not in ("binary", "multilabel"):
        raise ValueError(f"task must be binary|multiclass|multilabel, got {task!r}")

    def masked_bce(logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float().reshape(len(logits), -1)
        y, valid = apply_uncertain_policy(targets.reshape(len(targets), -1).to(logits.device), uncertain)
        pw = None if weight is None else weight.to(logits.device).expand_as(logits)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=pw, reduction="none")
        return (loss * valid).sum() / valid.sum().clamp(min=1)

    return masked_bce


def probabilities(logits: Tensor, task: str) -> Tensor:
    """Logits -> probabilities (softmax for multi-class, sigmoid otherwise)."""
    return logits.float().softmax(1) if task == "multiclass" else logits.float().sigmoid()


def classification_metrics(task: str, label_names: list[str] | None = None,
                           uncertain: str = "ignore") -> Callable[[Tensor, Tensor], dict[str, float]]:
    """An ``evaluate_fn`` for classification: AUC (macro over labels/classes), accuracy, and F1 for multi-class."""
    from sklearn.metrics import f1_score, roc_auc_score

    def evaluate(logits: Tensor, targets: Tensor) -> dict[str, float]:
        p = probabilities(logits, task).numpy()
        if task == "multiclass":
            y = targets.long().view(-1).numpy()
            out = {"acc": float((p.argmax(1) == y).mean()),
                   "macro_f1": float(f1_score(y, p.argmax(1), average="macro", labels=range(p.shape[1])))}
            try:
                out["auc"] = float(roc_auc_score(y, p, multi_class="ovr", labels=range(p.shape[1])))
            except ValueError:  # a class absent from this validation set
                out["auc"] = float("nan")
            return out
        y, valid = apply_uncertain_policy(targets.reshape(len(targets), -1), uncertain)
        y, valid, p = y.numpy(), valid.numpy(), p.reshape(len(p), -1)
        aucs, accs = [], []
        for j in range(y.shape[1]):
            m = valid[:, j]
            accs.append(((p[m, j] > 0.5) == y[m, j]).mean() if m.any() else np.nan)
            aucs.append(roc_auc_score(y[m, j], p[m, j]) if len(np.unique(y[m, j])) == 2 else np.nan)
        out = {"auc": float(np.nanmean(aucs)) if not np.isnan(aucs).all() else float("nan"),
               "acc": float(np.nanmean(accs))}
        if task == "multilabel" and label_names:
            out.update({f"auc_{n}": float(a) for n, a in zip(label_names, aucs, strict=False)})
        return out

    return evaluate


# ----------------------------------------------------------------------------- distributed


def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (single process: 0, 0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: torch.device) -> bool:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA); True when this call created it."""
    _, _, world = dist_env()
    if world <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def _distributed_loader(loader: DataLoader, shuffle: bool, seed: int) -> DataLoader:
    """The same loader with a DistributedSampler (each rank sees its share of the data)."""
    sampler = DistributedSampler(loader.dataset, shuffle=shuffle, seed=seed, drop_last=False)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn, persistent_workers=loader.persistent_workers)


def _sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats) after an epoch.

    Why: DDP broadcasts buffers *before* each forward, so after the last batch every rank holds its own
    running stats; validation on each rank and rank 0's checkpoint must use the same ones.
    """
    for buf in unwrap(model).buffers():
        dist.broadcast(buf.data, src=0)


def _gather_in_order(t: Tensor, n_total: int) -> Tensor:
    """All ranks' validation outputs in dataset order (undoes DistributedSampler's interleave and padding)."""
    parts: list[Tensor] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(parts, t.cpu())
    per_rank = max(len(p) for p in parts)
    rows = [parts[r][i] for i in range(per_rank) for r in range(len(parts)) if i < len(parts[r])]
    return torch.stack(rows)[:n_total]


# ----------------------------------------------------------------------------- loop helpers


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: each loader worker re-seeds its copy of the augmentation from its own torch seed.

    Why: workers receive a copy of the dataset, so without this every worker would replay the same draws.
    The worker seed derives from the main process RNG, which ``fit`` re-seeds per epoch, so runs stay exact.
    """
    import random

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "set_random_state"):
        info.dataset.set_random_state(seed)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer in ("adamw", "adam"):
        cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    import inspect

    cls = getattr(torch.optim, cfg.optimizer)
    accepted = inspect.signature(cls).parameters
    extra = {k: v for k, v in (("weight_decay", cfg.weight_decay), ("momentum", cfg.momentum)) if k in accepted}
    return cls(params, lr=cfg.lr, **extra)


def stretch_schedule(opt: torch.optim.Optimizer, sched, epochs: int) -> None:
    """A resumed cosine schedule continued to ``epochs``: the learning rate of the current epoch on the longer
    curve, so added epochs do not train at the old curve's end (lr 0)."""
    if not isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR) or sched.T_max >= epochs:
        return
    sched.T_max = epochs
    for group, base in zip(opt.param_groups, sched.base_lrs, strict=True):
        group["lr"] = sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * sched.last_epoch / epochs)) / 2
    sched._last_lr = [g["lr"] for g in opt.param_groups]


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=cfg.mode, factor=0.5,
                                                          patience=max(cfg.patience // 2, 1))
    return None


def unpack(batch) -> tuple[Tensor, Tensor]:
    """(inputs, targets) from a tuple/list batch or a MONAI-style dict with ``image`` and ``label``."""
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    return batch[0], batch[1]


def _rng_state() -> dict:
    import random

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    import random

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_epoch(seed: int, epoch: int, rank: int, loaders: list[DataLoader]) -> None:
    """Seed every RNG from (seed, epoch, rank): an epoch's shuffles and augmentations do not depend on
    how many epochs ran before in this process, which is what makes resume exact."""
    config.seed_everything(seed + 1000 * epoch + rank)
    for loader in loaders:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        ds = loader.dataset
        if hasattr(ds, "set_random_state"):
            ds.set_random_state(seed + 1000 * epoch + rank)


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def _run_epoch(model: nn.Module, loader: DataLoader, loss_fn, opt, scaler, device, cfg: TrainConfig,
               use_amp: bool, channels_last: bool, show: bool, desc: str, ema=None) -> float:
    model.train()
    total, count = 0.0, 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not show):
        x, y = unpack(batch)
        x = x.to(device, non_blocking=True)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, enabled=use_amp):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        if ema is not None:
            ema.update(unwrap(model))
        total += float(loss.detach()) * len(x)
        count += len(x)
    if dist.is_initialized():
        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = float(t[0]), float(t[1])
    return total / max(count, 1)


@torch.no_grad()
def predict_logits(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
                   channels_last: bool = False, show: bool = False) -> tuple[Tensor, Tensor]:
    """Concatenated (logits, targets) of a loader in order; targets are empty when batches carry none."""
    model.eval()
    device = torch.device(device)
    outs, targets = [], []
    for batch in tqdm(loader, desc="predict", leave=False, disable=not show):
        if isinstance(batch, (tuple, list, dict)):
            x, y = unpack(batch)
        else:
            x, y = batch, None
        x = x.to(device)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            outs.append(model(x).float().cpu())
        if y is not None:
            targets.append(y.cpu())
    logits = torch.cat(outs) if outs else torch.empty(0)
    return logits, (torch.cat(targets) if targets else torch.empty(0))


def _validate(model, loader, loss_fn, evaluate_fn, device, channels_last, show) -> dict[str, float]:
    logits, targets = predict_logits(model, loader, device, channels_last, show)
    if dist.is_initialized():
        n = len(loader.dataset)
        logits, targets = _gather_in_order(logits, n), _gather_in_order(targets, n)
    metrics = {"val_loss": float(loss_fn(logits, targets))}
    metrics.update({k: float(v) for k, v in evaluate_fn(logits, targets).items()})
    return metrics


# ----------------------------------------------------------------------------- fit


def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        evaluate_fn: Callable[[Tensor, Tensor], dict[str, float]],
        cfg: TrainConfig, out_dir: str | Path, meta: dict, settings: dict | None = None) -> pd.DataFrame:
    """Train ``model`` in place; write ``best.pt``, ``last.pt`` and ``log.csv`` to ``out_dir``; return the log.

    ``evaluate_fn(logits, targets)`` scores the concatenated validation outputs (a dict of floats; the
    ``cfg.monitor`` key drives checkpointing, early stopping and the plateau scheduler). With
    ``cfg.resume`` an existing ``last.pt`` continues the run and gives the same result as an
    uninterrupted one, and only with the same settings: ``cfg``, the recipe in ``meta`` and ``settings`` (what
    else decides the weights: augmentation, batch size, training rows...) are stored in every checkpoint, and a
    difference raises :class:`ConfigChangedError` naming each changed key. Under torchrun (``WORLD_SIZE>1``)
    the model is wrapped in DDP and only rank 0 writes.
    On return the model holds the shipped weights (``best.pt``): the best epoch on ``cfg.monitor``, or with
    ``cfg.select='last'`` the last epoch -- for k-fold, where the validation fold is also the scored fold and
    picking its best epoch inflates the score and leaves each fold's probabilities at a different calibration.
    """
    out_dir = Path(out_dir)
    for what, loader in (("training", train_loader), ("validation", val_loader)):
        if len(loader.dataset) == 0:
            raise ValueError(f"empty {what} set: nothing to train on (did filtering remove every sample?)")
    dev = config.device(cfg.device)
    rank, local_rank, world = dist_env()
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    created_group = init_distributed(dev)
    main = rank == 0
    cuda = dev.type == "cuda"
    use_amp, channels_last = cfg.amp and cuda, cfg.channels_last
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    config.seed_everything(cfg.seed)
    model.to(dev)
    channels_last = channels_last and to_channels_last(model)  # 3D networks stay NCHW
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    scaler = torch.amp.GradScaler(dev.type, enabled=use_amp)
    # EMA of the weights (and BatchNorm statistics): on ~100-sample sets the validation score of the raw
    # weights swings from epoch to epoch, and the averaged model is the steadier one to select and ship.
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(unwrap(model), decay=cfg.ema_decay)
    state = {"epoch": 0, "best": None, "best_epoch": -1, "bad_epochs": 0, "stopped": False}
    rows: list[dict] = []

    last = out_dir / "last.pt"
    if cfg.resume and last.exists():
        ckpt = read_checkpoint(last)
        changed = config_changes(ckpt.get("train_config") or {}, cfg, ckpt, meta, ckpt.get("train_settings"),
                                 settings)
        if changed:
            hint = (" (set extend=True to continue to more epochs)" if any(c.startswith("epochs:") for c in changed)
                    else "")
            raise ConfigChangedError(f"{last} was trained with other settings; changed: {'; '.join(changed)}{hint}. "
                                     "Use another output folder (or name) for a new run, or delete it to restart")
        unwrap(model).load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None and ckpt.get("scheduler"):
            sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if cfg.extend:
            stretch_schedule(opt, sched, cfg.epochs)
        state.update(ckpt["train_state"])
        if cfg.extend and cfg.epochs > state["epoch"]:
            state["stopped"] = False  # more epochs asked for: early stopping starts counting again
        if ema is not None and ckpt.get("ema") is not None:
            ema.module.load_state_dict(ckpt["ema"])
        rows = list(ckpt["train_state"].get("log", []))
        _set_rng_state(ckpt["rng"])
        if main:
            print(f"resuming {out_dir} after epoch {state['epoch']}")

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if cuda else None)
        shuffle = isinstance(train_loader.sampler, RandomSampler)
        train_loader = _distributed_loader(train_loader, shuffle=shuffle, seed=cfg.seed)
        val_loader = _distributed_loader(val_loader, shuffle=False, seed=cfg.seed)

    show = cfg.progress and main
    bar = tqdm(range(state["epoch"], cfg.epochs), desc=out_dir.name, disable=not show, initial=state["epoch"],
               total=cfg.epochs)
    for epoch in bar:
        if state["stopped"]:
            break
        _seed_epoch(cfg.seed, epoch, rank, [train_loader, val_loader])
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        train_loss = _run_epoch(net, train_loader, loss_fn, opt, scaler, dev, cfg, use_amp, channels_last, show,
                                f"epoch {epoch + 1}", ema)
        if world > 1:
            _sync_buffers(net)
            if ema is not None:  # each rank averaged its own BatchNorm statistics: validate/ship rank 0's
                _sync_buffers(ema.module)
        shipped = ema.module if ema is not None else unwrap(net)  # the weights validated and saved as best.pt
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"{out_dir}: training loss is {train_loss} in epoch {epoch + 1} "
                                     f"(lower lr={cfg.lr}, set grad_clip, or check the inputs for extreme values)")
        validated = (epoch + 1) % cfg.val_every == 0 or epoch + 1 >= cfg.epochs
        metrics = _validate(shipped, val_loader, loss_fn, evaluate_fn, dev, channels_last, show) if validated else {}
        monitored = metrics.get(cfg.monitor, math.nan)
        if validated and cfg.monitor not in metrics:
            raise KeyError(f"monitor {cfg.monitor!r} not in validation metrics {sorted(metrics)}")
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(monitored if not math.isnan(monitored) else (-1e9 if cfg.mode == "max" else 1e9))
        elif sched is not None:
            sched.step()
        improved = validated and _is_better(monitored, state["best"], cfg.mode)
        if improved:
            state.update(best=monitored, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        state["stopped"] = bool(cfg.patience and state["bad_epochs"] >= cfg.patience)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, **metrics,
               "time_s": time.perf_counter() - t0, "best": improved}
        rows.append(row)
        bar.set_postfix({"loss": f"{train_loss:.3f}", cfg.monitor: f"{monitored:.3f}"})
        if main:
            ckpt_meta = {**meta, "epoch": epoch + 1, "metrics": metrics, "train_config": asdict(cfg),
                         "train_settings": dict(settings or {})}
            if improved or cfg.select == "last" or not (out_dir / "best.pt").exists():
                save_checkpoint(out_dir / "best.pt", shipped, ckpt_meta)
            save_checkpoint(last, net, ckpt_meta, optimizer=opt.state_dict(),
                            ema=ema.module.state_dict() if ema is not None else None,
                            scheduler=sched.state_dict() if sched is not None else None,
                            scaler=scaler.state_dict(), rng=_rng_state(), train_state={**state, "log": rows})
            pd.DataFrame(rows).to_csv(out_dir / "log.csv", index=False)
            if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
                save_checkpoint(out_dir / f"epoch{epoch + 1:03d}.pt", shipped, ckpt_meta)
    bar.close()

    if dist.is_initialized():
        dist.barrier()
    best = out_dir / "best.pt"
    if best.exists():
        unwrap(model).load_state_dict(read_checkpoint(best)["state_dict"])
    if created_group:
        dist.destroy_process_group()
    return pd.DataFrame(rows)


def plot_curves(log: pd.DataFrame, path: str | Path | None = None, metrics: list[str] | None = None):
    """Learning curves (loss and validation metrics per epoch) as a seaborn figure, saved when ``path`` is given."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    metrics = metrics or [c for c in log.columns if c in ("auc", "acc", "macro_f1", "dice")]
    losses = log.melt(id_vars="epoch", value_vars=[c for c in ("train_loss", "val_loss") if c in log],
                      var_name="curve", value_name="loss")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    sns.lineplot(data=losses, x="epoch", y="loss", hue="curve", marker="o", ax=axes[0])
    if metrics:
        scores = log.melt(id_vars="epoch", value_vars=metrics, var_name="metric", value_name="value")
        sns.lineplot(data=scores, x="epoch", y="value", hue="metric", marker="o", ax=axes[1])
    axes[0].set_title("loss")
    axes[1].set_title("validation")
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


# ----------------------------------------------------------------------------- classifiers on a CachedDataset


def loss_for(ds, idx: np.ndarray, uncertain: str = "ignore", loss: str = "auto") -> Callable[[Tensor, Tensor], Tensor]:
    """The task's loss (or ``loss`` by name, :func:`lib.recipes.named_loss`) with imbalance weights computed from
    the training rows ``idx`` only (no peeking at val)."""
    y = ds.y[np.asarray(idx, dtype=int)].numpy()
    weight = class_weights(y, len(ds.label_names)) if ds.task == "multiclass" else positive_weights(y, uncertain)
    named = recipes.named_loss(loss, ds.task, weight, uncertain)
    if named is not None:
        return named
    if ds.task == "multiclass":
        return make_loss("multiclass", weight)
    return make_loss(ds.task, weight, uncertain)


def make_loaders(ds, tr_idx: np.ndarray, va_idx: np.ndarray, batch_size: int = 32, augment: str | None = "light",
                 seed: int = config.DEFAULT_SEED, num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """Training loader (shuffled, MONAI augmentation: a preset or ``+``-joined flags, :func:`lib.recipes.build_augment`)
    and validation loader (in order, no augmentation)."""
    aug = recipes.build_augment(augment, spatial_dims=ds.x.ndim - 2, seed=seed)
    kw = {"num_workers": num_workers, "worker_init_fn": seed_worker if num_workers else None,
          "persistent_workers": False}
    tr = DataLoader(ds.subset(tr_idx, aug), batch_size=batch_size, shuffle=True,
                    drop_last=len(tr_idx) % batch_size == 1, **kw)  # a batch of one breaks BatchNorm
    va = DataLoader(ds.subset(va_idx), batch_size=max(batch_size, 64), **kw)
    return tr, va


def train_classifier(ds, tr_idx: np.ndarray, va_idx: np.ndarray, out_dir: str | Path, cfg: TrainConfig,
                     model_name: str | None = None, augment: str | None = "light", batch_size: int = 32,
                     uncertain: str = "ignore", pretrained: bool = False, model_kwargs: dict | None = None,
                     num_workers: int = 0, bn_momentum: float | None = None) -> tuple[nn.Module, pd.DataFrame]:
    """One classifier on rows ``tr_idx`` of a ``CachedDataset``, validated on ``va_idx``, through ``fit``.

    The model (timm name, ``in_chans``/outputs from the data) and the checkpoint recipe come from the dataset,
    so ``lib.models.load_checkpoint`` rebuilds it alone. Returns the model with its best weights and the log.
    ``bn_momentum`` (e.g. 0.5) lets BatchNorm running statistics follow the weights on small sets: with a few
    steps per epoch and the default 0.1 they lag behind, and eval-mode predictions collapse to one class
    (measured on brain MRI, 64 px: fold-0 validation loss 1.5 vs 0.31, accuracy 0.61 vs 0.81 after 6 epochs).
    Only training changes: the checkpoint holds the usual weights and running statistics.
    """
    from lib import models

    tr_idx, va_idx = np.asarray(tr_idx, dtype=int), np.asarray(va_idx, dtype=int)
    if not len(tr_idx) or not len(va_idx):
        raise ValueError(f"empty split: {len(tr_idx)} training and {len(va_idx)} validation rows")
    model_name = model_name or models.DEFAULT_MODEL
    config.seed_everything(cfg.seed)
    model = models.create_model(model_name, ds.in_chans, ds.num_classes, pretrained=pretrained, **(model_kwargs or {}))
    if bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = bn_momentum
    meta = models.checkpoint_meta(model_name, ds.in_chans, ds.num_classes, ds.task, ds.label_names,
                                  ds.preprocessing, **(model_kwargs or {}))
    tr, va = make_loaders(ds, tr_idx, va_idx, batch_size, augment, cfg.seed, num_workers)
    evaluate = classification_metrics(ds.task, ds.label_names, uncertain)
    settings = {"augment": augment, "batch_size": int(batch_size), "uncertain": uncertain,
                "pretrained": bool(pretrained), "bn_momentum": bn_momentum, "train_rows": rows_digest(tr_idx),
                "val_rows": rows_digest(va_idx)}
    log = fit(model, tr, va, loss_for(ds, tr_idx, uncertain, cfg.loss), evaluate, cfg, out_dir, meta, settings)
    return model, log


def predict_rows(model: nn.Module, ds, idx: np.ndarray | None = None, batch_size: int = 64) -> np.ndarray:
    """Probabilities of the rows ``idx`` of a ``CachedDataset`` (all rows by default), no augmentation."""
    x = ds.x if idx is None else ds.x[np.asarray(idx, dtype=int)]
    logits, _ = predict_logits(model, torch.split(x, batch_size), next(model.parameters()).device)
    return probabilities(logits, ds.task).numpy()


def evaluate_rows(model: nn.Module, ds, idx: np.ndarray, eval_cols: dict[str, str | list[str] | None] | None = None,
                  uncertain: str = "ignore", batch_size: int = 64) -> pd.DataFrame:
    """Validation scores (``classification_metrics``) of ``model`` on rows ``idx``, one row per label source.

    ``eval_cols`` maps a name to table column(s) holding other labels for the same rows (e.g. ``truth`` on the
    synthetic cohort, or ``truth_<label>`` columns for multi-label, while the model learnt from report labels);
    ``None`` = the training targets.
    """
    idx = np.asarray(idx, dtype=int)
    logits, _ = predict_logits(model, torch.split(ds.x[idx], batch_size), next(model.parameters()).device)
    score = classification_metrics(ds.task, ds.label_names, uncertain)
    rows = []
    for name, col in (eval_cols or {"train_labels": None}).items():
        if col is None:
            y = ds.y[idx]
        else:
            y = torch.as_tensor(ds.table[col if isinstance(col, str) else list(col)].to_numpy(dtype=float)[idx])
            y = y.long() if ds.task == "multiclass" else y.float().reshape(len(idx), -1)
        rows.append({"labels": name, "n": len(idx), **score(logits, y)})
    return pd.DataFrame(rows).set_index("labels")


if __name__ == "__main__":  # python -m lib.train: the same command as ``mednb train``
    import sys

    from lib.cli import main

    raise SystemExit(main(["train", *sys.argv[1:]]))
