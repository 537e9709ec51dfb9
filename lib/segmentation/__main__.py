"""``python -m lib.segmentation predict|export``: folder inference and ONNX export of segmentation models."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.segmentation", description="2D segmentation inference and export.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("predict", help="segment every image (PNG/JPG/TIFF/DICOM/NIfTI) in a folder")
    p.add_argument("--model", required=True, type=Path, help="checkpoint (best.pt) or ONNX export folder")
    p.add_argument("--input", required=True, type=Path, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="folder for masks, predictions.csv, skipped_segment.csv")
    p.add_argument("--format", default="auto", choices=("auto", "png", "nifti"),
                   help="auto/png: NIfTI for NIfTI inputs (source affine), PNG otherwise; nifti: NIfTI for all")
    p.add_argument("--threshold", type=float, default=None, help="default: the threshold used in validation")
    e = sub.add_parser("export", help="export checkpoint(s) to ONNX (model.onnx + metadata.json), check parity")
    e.add_argument("--model", required=True, type=Path, nargs="+", help="best.pt (several: fold ensemble)")
    e.add_argument("--out", required=True, type=Path, help="export folder")
    e.add_argument("--sample", type=Path, default=None, help="an image copied as sample.* and used for parity")
    e.add_argument("--tolerance", type=float, default=None, help="largest |ONNX - torch| probability allowed "
                   "(default: lib.export.PARITY_TOL)")
    args = ap.parse_args(argv)
    if args.cmd == "predict":
        from lib.segmentation.infer import predict_folder

        table, skipped = predict_folder(args.model, args.input, args.out, args.format, args.threshold)
        print(f"wrote {len(table)} masks to {args.out}; skipped {len(skipped)}")
        for row in skipped.rows:
            print(f"skipped {row['case']}: {row['reason']}")
        return 0
    from lib.segmentation.onnx_export import export_segmenter

    try:
        meta = export_segmenter(args.model, args.out, args.sample,
                                **({} if args.tolerance is None else {"tol": args.tolerance}))
    except RuntimeError as exc:
        print(exc)
        return 1
    print(f"wrote {args.out / 'model.onnx'}; max |torch - onnxruntime| = {meta['parity']['max_abs_diff']:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
