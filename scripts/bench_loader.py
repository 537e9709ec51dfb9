"""Is data loading the bottleneck? Images/s of the real training input pipeline + model step vs the model step alone.

(a) what ``lib.train.train_classifier`` runs: the ``CachedDataset`` of a real dataset, its MONAI augmentation and
the training ``DataLoader`` (``lib.train.make_loaders``), then forward + backward + optimizer step;
(b) the same model step on batches already stacked in memory (no dataset, no augmentation, no loader).
Rounds of (a) and (b) alternate and the median of each is reported, so a busy machine hurts both alike.
Target: ratio (a)/(b) >= 0.9. The one-time decode into the cache is timed and printed separately.

    python scripts/bench_loader.py --dataset synthetic-ct --profile smoke
    python scripts/bench_loader.py --dataset brain-mri --size 128 --kind 2d
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from itertools import cycle, islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib import config, datasets, models, train  # noqa: E402


def step_fn(model: torch.nn.Module, loss_fn, opt: torch.optim.Optimizer, dev: torch.device):
    """One training step exactly as ``fit`` does it on CPU (no AMP / channels_last there)."""
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(dev), y.to(dev)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return step


def timed(batches, step, n_batches: int) -> float:
    """Images/s over ``n_batches`` batches drawn from the iterable ``batches`` (loading time included)."""
    t0, n = time.perf_counter(), 0
    for x, y in islice(batches, n_batches):
        step(x, y)
        n += len(x)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="synthetic-ct",
                    help=" | ".join(datasets.names("03_train")) + " (or an alias) | folder | csv")
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--kind", default="slab")
    ap.add_argument("--n-slices", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--augment", default="medium")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--batches", type=int, default=6, help="batches per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config.seed_everything(args.seed)

    t0 = time.perf_counter()
    ds, _ = datasets.build_dataset(args.dataset, args.run_dir, args.profile, args.seed, kind=args.kind,
                                   n_slices=args.n_slices, size=args.size)
    decode_s = time.perf_counter() - t0
    idx = np.arange(len(ds))
    tr, _ = train.make_loaders(ds, idx, idx[:1], args.batch_size, args.augment, args.seed, args.num_workers)
    dev = config.device("auto")
    model = models.create_model(args.model, ds.in_chans, ds.num_classes).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = step_fn(model, train.loss_for(ds, idx), opt, dev)

    # (b): the same model steps on batches stacked once in memory, with the loader's batch sizes per epoch
    # (a last partial batch too, unless the loader drops it) so both sides pay the same small-batch cost
    parts = list(torch.randperm(len(ds)).split(args.batch_size))
    if tr.drop_last and len(parts[-1]) < args.batch_size:
        parts = parts[:-1]
    memory = [(ds.x[b].clone(), ds.y[b].clone()) for b in parts]

    def loader_batches():
        while True:
            yield from tr

    pipe, mem = loader_batches(), cycle(memory)
    timed(pipe, step, 1)  # warm-up (first-call allocations, worker start)
    timed(mem, step, 1)
    a, b = [], []
    for _ in range(args.rounds):
        a.append(timed(pipe, step, args.batches))
        b.append(timed(mem, step, args.batches))
    ra, rb = statistics.median(a), statistics.median(b)
    out = {"dataset": args.dataset, "n": len(ds), "input": list(ds.x.shape[1:]), "model": args.model,
           "augment": args.augment, "num_workers": args.num_workers, "threads": torch.get_num_threads(),
           "device": str(dev), "decode_images_per_s": len(ds) / decode_s, "pipeline_images_per_s": ra,
           "memory_images_per_s": rb, "ratio": ra / rb}
    print(f"dataset {args.dataset}: {len(ds)} samples, input {tuple(ds.x.shape[1:])}, model {args.model}, "
          f"augment {args.augment}, workers {args.num_workers}, torch threads {torch.get_num_threads()}, {dev}")
    print(f"one-time decode into the cache: {decode_s:.1f} s ({len(ds) / decode_s:.0f} images/s)")
    print(f"(a) input pipeline + step: {ra:8.1f} images/s  (rounds: {', '.join(f'{v:.0f}' for v in a)})")
    print(f"(b) in-memory tensors + step: {rb:8.1f} images/s  (rounds: {', '.join(f'{v:.0f}' for v in b)})")
    print(f"ratio (a)/(b) = {ra / rb:.3f}  (target >= 0.9)")
    return out


if __name__ == "__main__":
    main()
