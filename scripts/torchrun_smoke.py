"""Tiny DistributedDataParallel run for tests and for checking a multi-process setup.

Why: ``fit`` must work unchanged under ``torchrun`` (gloo on CPU, nccl on GPU). Run:
``torchrun --standalone --nproc_per_node 2 scripts/torchrun_smoke.py --out outputs/scratch/ddp``; it trains a
tiny CNN (or a timm model with ``--model``) on a separable toy problem and writes ``best.pt``/``last.pt``/``log.csv``
from rank 0. Each rank prints one ``DDP {json}`` line (samples it trained on, a checksum of its weights, the
validation metrics it saw) so a caller can check that the ranks split the data and stayed in sync.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, TensorDataset  # noqa: E402

from lib import models, train  # noqa: E402


def toy_data(n: int = 48, size: int = 16, seed: int = 0) -> TensorDataset:
    """Bright-square-vs-none images: learnable in a few epochs (noise makes it not quite trivial)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 0.6
    y = (torch.arange(n) % 2).float()[:, None]
    x[y[:, 0] == 1, :, 4:10, 4:10] += 0.25
    return TensorDataset(x, y)


class Counting(Dataset):
    """Counts the samples this process reads (shows DistributedSampler gave each rank its share)."""

    def __init__(self, base: Dataset) -> None:
        self.base, self.reads = base, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.base[i]


def tiny_cnn() -> torch.nn.Module:
    """A few-kilobyte CNN with BatchNorm (exercises DDP buffer sync) that imports nothing heavy."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=48)
    ap.add_argument("--n-val", type=int, default=21, help="odd on purpose: DistributedSampler pads, fit must not")
    ap.add_argument("--model", default="tiny", help="'tiny' (fast test CNN) or a timm model name")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = tiny_cnn() if args.model == "tiny" else models.create_model(args.model, in_chans=1, num_classes=1)
    train_ds = Counting(toy_data(args.n_train, seed=1))
    tr = DataLoader(train_ds, batch_size=8, shuffle=True)
    va = DataLoader(toy_data(args.n_val, seed=2), batch_size=8)
    cfg = train.TrainConfig(epochs=args.epochs, lr=3e-3, progress=False, resume=False)
    meta = models.checkpoint_meta(args.model, 1, 1, "binary", ["square"])
    score = train.classification_metrics("binary")
    checksums: list[float] = []

    def evaluate(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        # called on every rank after each epoch: snapshot this rank's live weights (DDP must keep them equal)
        checksums.append(round(float(sum(p.double().sum() for p in model.state_dict().values()
                                         if p.is_floating_point())), 6))
        return {**score(logits, targets), "n_val": float(len(targets))}

    log = train.fit(model, tr, va, train.make_loss("binary"), evaluate, cfg, args.out, meta)
    report = {"rank": int(os.environ.get("RANK", 0)), "world": int(os.environ.get("WORLD_SIZE", 1)),
              "train_reads": train_ds.reads, "epochs": len(log), "auc": log["auc"].round(6).tolist(),
              "val_loss": log["val_loss"].round(6).tolist(), "n_val": log["n_val"].astype(int).tolist(),
              "checksums": checksums}
    print("DDP " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
