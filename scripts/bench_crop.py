"""Benchmark: organ-crop pipeline vs plain nibabel read + write of the same files, and cases/s by workers.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_crop.py --profile demo --cases 40

(a) ``lib.crop.crop_cohort`` on a fresh output folder (reads CT + multilabel mask + lesion mask, crops six
structures, writes npz samples or NIfTI crops, manifest and index); (b) for the same cases, ``nib.load`` +
read data + ``nib.save`` to .nii.gz of the same three files. Both run in one process on a warm page cache
(every file is read once before timing); each figure is the best of ``--repeat`` runs because the machine is
shared. Target: (a) / (b) <= 1.25. Cases/s with 1 and 2 workers include the pool's start-up.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from lib import config, crop, synth


def read_write(cases: pd.DataFrame, out: Path) -> None:
    """The baseline: what any tool touching these files must at least do."""
    out.mkdir(parents=True, exist_ok=True)
    for r in cases.itertuples():
        for kind in ("image", "mask", "lesion"):
            src = getattr(r, kind)
            if not src:
                continue
            img = nib.load(src)
            data = np.asanyarray(img.dataobj)
            nib.save(nib.Nifti1Image(data, img.affine, img.header), str(out / f"{r.case_id}_{kind}.nii.gz"))


def timed(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` runs (each on a fresh output folder)."""
    best = float("inf")
    for _ in range(repeat):
        tmp = Path(tempfile.mkdtemp(prefix="bench_crop_"))
        try:
            t0 = time.perf_counter()
            fn(tmp)
            best = min(best, time.perf_counter() - t0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return best


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo", choices=sorted(synth.PROFILES))
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    ap.add_argument("--cases", type=int, default=40, help="first N cases of the cohort")
    ap.add_argument("--mode", default="bbox", choices=crop.MODES)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-workers", action="store_true", help="only the ratio, no process-pool figures")
    args = ap.parse_args(argv)

    cases = crop.discover_cases(synth.ensure_cohort(args.profile, args.seed)).head(args.cases)
    structures = crop.DEFAULT_STRUCTURES
    mb = sum(Path(p).stat().st_size for c in ("image", "mask", "lesion") for p in cases[c] if p) / 1e6
    print(f"{len(cases)} cases of the {args.profile} cohort ({mb:.1f} MB of .nii.gz inputs), "
          f"{len(structures)} structures, mode {args.mode}, best of {args.repeat}")
    read_write(cases, Path(tempfile.mkdtemp(prefix="bench_warm_")))  # warm the page cache for both sides

    def pipeline(fmt: str, workers: int = 1):
        return lambda out: crop.crop_cohort(cases, structures, out, mode=args.mode, fmt=fmt, workers=workers,
                                            progress=False)

    t_base = timed(lambda out: read_write(cases, out), args.repeat)
    results = {"cases": len(cases), "baseline_s": t_base}
    print(f"(b) nibabel read + write (.nii.gz):      {t_base:7.2f} s")
    for fmt in ("npz", "nifti"):
        t = timed(pipeline(fmt), args.repeat)
        results[f"crop_{fmt}_s"] = t
        print(f"(a) crop pipeline, {fmt:5s} outputs:        {t:7.2f} s   ratio (a)/(b) = {t / t_base:.2f}"
              f"  {'OK' if t / t_base <= 1.25 else 'ABOVE'} target 1.25")
    with tempfile.TemporaryDirectory() as tmp:  # idempotence: an unchanged cohort costs only hashing
        pipeline("npz")(Path(tmp))
        t0 = time.perf_counter()
        again, _ = pipeline("npz")(Path(tmp))
        results["cached_s"] = time.perf_counter() - t0
        print(f"    re-run, nothing changed:            {results['cached_s']:7.2f} s"
              f"   ({again.attrs['computed']} cases recomputed)")
    if not args.skip_workers:
        for w in (1, 2):
            t = timed(pipeline("npz", w), args.repeat)
            results[f"cases_per_s_{w}w"] = len(cases) / t
            print(f"    {w} worker{'s' if w > 1 else ' '} (npz, pool start-up incl.): {len(cases) / t:7.2f} cases/s")
    return results


if __name__ == "__main__":
    main()
