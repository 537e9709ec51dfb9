"""Quality figures of the 2D public sets: duplicate-aware 5-fold from scratch, scores with bootstrap 95% CIs.

Usage::

    .venv/bin/python scripts/quality_2d.py brain-mri [--size 96] [--epochs 15] [--folds 5] [--model resnet10t]
    .venv/bin/python scripts/quality_2d.py cxr-3class [--size 96] ...

Runs ``lib.kfold.ensure_kfold`` (cached: a second call with the same settings only prints) into
``outputs/quality-2d/kfold/<dataset>-<model>-<size>px-<epochs>ep/`` and prints the pooled out-of-fold AUC
(brain MRI, tumour yes/no) or
macro-F1 (chest X-ray, 3 classes) with 95% CIs from a bootstrap over duplicate groups, the fold spread, and
single folds vs ensembles on the held-out test part. Figures as measured on this machine go to the README.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import config, datasets, kfold  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", help="a registered 2D set: " + " | ".join(
        n for n in datasets.names("04_kfold") if datasets.get(n).kind == "2d"))
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--model", default="resnet10t")
    ap.add_argument("--augment", default="medium")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    # stated here rather than inherited from notebook 04's demo profile (same values): the figures in the README
    # should not move when the CT demo's recipe does
    ap.add_argument("--ema-decay", type=float, default=0.9, help="weight EMA (0: off)")
    ap.add_argument("--select", choices=["best", "last"], default="last", help="fold weights shipped")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    ap.add_argument("--run-dir", default=str(config.OUTPUTS / "quality-2d"))
    args = ap.parse_args(argv)
    if not config.shared_path().exists():
        print(f"shared data not found at {config.shared_path()}")
        return 2
    args.dataset = datasets.get(args.dataset, "04_kfold").name  # aliases accepted; unknown names say what is close
    t0 = time.perf_counter()
    # one folder per dataset, model, size and epochs: another setting never replaces a finished one
    name = f"{args.dataset}-{args.model}-{args.size}px-{args.epochs}ep"
    out = kfold.ensure_kfold(args.run_dir, "demo", args.seed, name=name, progress=False,
                             dataset=args.dataset, image_size=args.size, epochs=args.epochs, n_splits=args.folds,
                             test_fraction=args.test_fraction, model_name=args.model, augment=args.augment,
                             lr=args.lr, batch_size=args.batch_size, n_boot=args.n_boot, organ=None,
                             ema_decay=args.ema_decay, select=args.select,
                             label_cols="{organ}_abnormal")
    seconds = time.perf_counter() - t0
    res = kfold.load_result(out)
    s = res.summary
    pooled = s["pooled"]
    print(f"{args.dataset}: {args.folds}-fold grouped by duplicate, {args.model} from scratch, {args.size} px, "
          f"{args.epochs} epochs; {s['n_dev']} development + {s['n_test']} held-out test images "
          f"({seconds:.0f} s this call, training {s.get('timing_s', {}).get('train', float('nan')):.0f} s)")
    if s["task"] == "multiclass":
        lo, hi = pooled["macro_f1_ci"]
        print(f"pooled OOF macro-F1 {pooled['macro_f1']:.3f} [95% CI {lo:.3f}, {hi:.3f}], accuracy "
              f"{pooled['accuracy']:.3f}, macro AUC {pooled['macro_auc']:.3f}, ECE {pooled['ece']:.3f}")
        print("per class:", json.dumps({k: {m: round(v[m], 3) for m in ("precision", "recall", "f1")}
                                        for k, v in pooled["per_class"].items()}))
    else:
        lo, hi = pooled["auc_ci"]
        print(f"pooled OOF AUC {pooled['auc']:.3f} [95% CI {lo:.3f}, {hi:.3f}], AP {pooled['ap']:.3f}, "
              f"sensitivity {pooled['sensitivity']:.3f} / specificity {pooled['specificity']:.3f} at "
              f"{pooled['threshold']}, ECE {pooled['ece']:.3f}")
    print("fold mean +- sd:", {k: f"{v:.3f} +- {s['fold_sd'].get(k) or float('nan'):.3f}"
                               for k, v in s["fold_mean"].items() if v is not None and k in
                               ("auc", "macro_f1", "accuracy", "ece")})
    print("held-out test part, single folds vs ensembles:")
    print(res.comparison.round(3).to_string(index=False))
    print(f"outputs: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
