"""Tiny DistributedDataParallel run for tests and for checking a multi-process setup.

Why: ``fit`` must work unchanged under ``torchrun`` (gloo on CPU, nccl on GPU). Run:
``torchrun --nproc_per_node 2 scripts/torchrun_smoke.py --out outputs/scratch/ddp``; it trains a tiny CNN (or
a timm model with ``--model``) on a separable toy problem and writes ``best.pt``/``last.pt``/``log.csv`` from rank 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lib import models, train  # noqa: E402


def toy_data(n: int = 48, size: int = 16, seed: int = 0) -> TensorDataset:
    """Bright-square-vs-none images: learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 0.2
    y = (torch.arange(n) % 2).float()[:, None]
    x[y[:, 0] == 1, :, 4:10, 4:10] += 0.8
    return TensorDataset(x, y)


def tiny_cnn() -> torch.nn.Module:
    """A few-kilobyte CNN with BatchNorm (exercises DDP buffer sync) that imports nothing heavy."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--model", default="tiny", help="'tiny' (fast test CNN) or a timm model name")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = tiny_cnn() if args.model == "tiny" else models.create_model(args.model, in_chans=1, num_classes=1)
    tr = DataLoader(toy_data(48, seed=1), batch_size=8, shuffle=True)
    va = DataLoader(toy_data(20, seed=2), batch_size=8)
    cfg = train.TrainConfig(epochs=args.epochs, lr=3e-3, progress=False, resume=False)
    meta = models.checkpoint_meta(args.model, 1, 1, "binary", ["square"])
    log = train.fit(model, tr, va, train.make_loss("binary"), train.classification_metrics("binary"), cfg,
                    args.out, meta)
    print(f"rank {os.environ.get('RANK', 0)}/{os.environ.get('WORLD_SIZE', 1)} done: "
          f"{len(log)} epochs, last auc {log['auc'].iloc[-1]:.3f}")


if __name__ == "__main__":
    main()
