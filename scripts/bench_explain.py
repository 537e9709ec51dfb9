"""Maps per second of each lib.explain method on CPU, at the default model and input size.

Why: occlusion sensitivity runs the model once per occluded copy (seconds per image on CPU), while
Grad-CAM needs one forward and one backward pass; the notebook's case counts per profile are chosen
from these figures. Also times one deletion curve (the faithfulness check), which costs n_steps + 1
forward passes per map. Random weights: speed does not depend on training.

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_explain.py [--model resnet10t] [--size 64]
       [--chans 8] [--n 10] [--mask-size 16] [--stride 6] [--min-map-size 8] [--seed S]
       (--model mil:resnet10t: notebook 04's demo SliceMIL; --min-map-size 8: the demo's Grad-CAM layer)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import config, explain, models  # noqa: E402


def bench(fn, n: int) -> float:
    """Calls per second of ``fn(i)`` over ``n`` calls, after one warm-up call."""
    fn(0)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--size", type=int, default=64, help="input height/width (datasets default)")
    ap.add_argument("--chans", type=int, default=8, help="input channels (2.5D slices; datasets default)")
    ap.add_argument("--n", type=int, default=10, help="maps per method")
    ap.add_argument("--mask-size", type=int, default=16)
    ap.add_argument("--stride", type=int, default=None, help="occlusion step (default: overlap 0.6)")
    ap.add_argument("--min-map-size", type=int, default=4, help="automatic Grad-CAM layer: cells per side")
    ap.add_argument("--steps", type=int, default=20, help="deletion-curve steps")
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    args = ap.parse_args(argv)

    config.seed_everything(args.seed)
    model = models.create_model(args.model, in_chans=args.chans, num_classes=1)
    e = explain.Explainer(model, mask_size=args.mask_size, stride=args.stride, min_map_size=args.min_map_size)
    xs = torch.rand(args.n + 1, args.chans, args.size, args.size)
    print(f"{args.model} input {args.chans}x{args.size}x{args.size}, torch threads {torch.get_num_threads()}, "
          f"target layer {e.layer(xs[:1])}, occlusion mask {args.mask_size} overlap {e.occlusion_overlap():.2f}")
    rows = []
    methods = [m for m in explain.METHODS if not (m == "gradcampp" and isinstance(model, models.SliceMIL))]
    for method in methods:
        rate = bench(lambda i, m=method: e.map(xs[i:i + 1], m), args.n)
        rows.append((method, rate))
    sal = explain.random_map((args.size, args.size), 0)
    rate = bench(lambda i: explain.deletion_curve(e.prob, xs[i:i + 1], sal, args.steps), args.n)
    rows.append((f"deletion curve ({args.steps} steps)", rate))
    print(f"{'method':<28}{'maps/s':>10}{'s/map':>10}")
    for name, r in rows:
        print(f"{name:<28}{r:>10.2f}{1 / r:>10.3f}")


if __name__ == "__main__":
    main()
