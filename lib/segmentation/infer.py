"""A trained segmenter applied to images, uploads, files and folders (what ``POST /segment`` and the CLI call).

``load_segmenter(best.pt | model.onnx | export folder)`` gives ``(torch model or ONNX Runtime session, recipe)``;
``segment_array`` preprocesses with the recipe (``lib.segmentation.preprocess``), runs the network and maps the
mask back to the image's own grid. Torch is imported only to load or run a torch model: a service that serves
an ONNX export never loads it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lib.io import DataError, SkippedCases
from lib.segmentation.data import INPUT_SUFFIXES, file_suffix, read_image_2d, slices_to_volume, volume_slices
from lib.segmentation.preprocess import Preprocess, as_chw, preprocess_image, restore_probability

ONNX_META_KEY = "mednb_segment"  # key of the JSON recipe stored in model.onnx's metadata_props


def load_segmenter(path: str | Path, device: str = "cpu") -> tuple[Any, dict]:
    """A trained segmenter and its recipe: ``best.pt`` -> ``(torch model, meta)``; ``model.onnx`` or an export
    folder -> ``(onnxruntime session, metadata)``. Both go straight into ``segment_array``."""
    path = Path(path)
    if path.is_dir() or file_suffix(path) == ".onnx":
        onnx_path = path / "model.onnx" if path.is_dir() else path
        if not onnx_path.exists():
            raise DataError(onnx_path, "ONNX model not found")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        try:
            sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise DataError(onnx_path, f"unreadable ONNX model ({type(exc).__name__}: {exc})") from exc
        meta = meta_of(sess)
        if meta is None:
            raise DataError(onnx_path, "not a segmentation export (no recipe in its metadata; use export_segmenter)")
        return sess, meta
    from lib.models import load_checkpoint
    from lib.segmentation.model import build_model

    model, meta = load_checkpoint(path, device, builder=build_model)
    if meta.get("task") != "segmentation":
        raise DataError(path, f"not a segmentation checkpoint (task {meta.get('task')!r})")
    model.mednb_meta = meta  # lets segment_array(model, image) find the preprocessing
    return model, meta


def _is_session(session_or_model: Any) -> bool:
    return hasattr(session_or_model, "get_modelmeta")


def meta_of(session_or_model: Any) -> dict | None:
    """Recipe attached by ``load_segmenter`` (torch) or stored inside the ONNX file (session)."""
    if _is_session(session_or_model):
        raw = session_or_model.get_modelmeta().custom_metadata_map.get(ONNX_META_KEY)
        return json.loads(raw) if raw else None
    return getattr(session_or_model, "mednb_meta", None)


def network_probabilities(session_or_model: Any, x: np.ndarray) -> np.ndarray:
    """Foreground probabilities ``(N, S, S)`` of prepared inputs ``(N, C, S, S)`` (ORT session or torch model)."""
    if _is_session(session_or_model):
        name = session_or_model.get_inputs()[0].name
        return np.asarray(session_or_model.run(None, {name: np.ascontiguousarray(x, np.float32)})[0])[:, 0]
    import torch

    from lib.kfold import predict_probs

    return predict_probs(session_or_model, torch.as_tensor(np.ascontiguousarray(x, np.float32)), "segmentation")[:, 0]


def segment_probability(session_or_model: Any, image: np.ndarray, meta: dict | None = None) -> np.ndarray:
    """Foreground probability on the image's own grid (the checkpoint's preprocessing, then undone)."""
    meta = meta or meta_of(session_or_model)
    if meta is None:
        raise ValueError("no preprocessing recipe: load the model with load_segmenter or pass meta=")
    pre = Preprocess.from_dict(meta["preprocessing"])
    a = as_chw(image, int(meta["in_chans"]))
    if min(a.shape[-2:]) < 8:
        raise ValueError(f"image too small to segment ({a.shape[-1]}x{a.shape[-2]} pixels)")
    if not np.isfinite(a).all():
        raise ValueError("image has NaN/inf pixels")
    x, geom = preprocess_image(a, pre)
    return restore_probability(network_probabilities(session_or_model, x[None])[0], geom)


def segment_array(session_or_model: Any, image: np.ndarray, meta: dict | None = None,
                  threshold: float | None = None,
                  spacing_mm: float | Sequence[float] | None = None) -> tuple[np.ndarray, dict[str, float | None]]:
    """Segment one 2D image: ``(mask, area)``, what ``POST /segment`` calls.

    ``session_or_model`` comes from ``load_segmenter`` (a torch model from ``best.pt`` or an ONNX Runtime
    session from an export folder); either carries its preprocessing, so ``meta`` is only needed for
    models built by hand. ``image`` is ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` in its own values (8-bit,
    HU, MRI units): the recipe scales it. ``mask`` is uint8 0/1 with the image's height and width; ``area`` is
    ``{"pixels": n, "mm2": n * spacing^2 or None}``. ``threshold`` defaults to the one used in validation.
    """
    meta = meta or meta_of(session_or_model)
    if meta is None:
        raise ValueError("no preprocessing recipe: load the model with load_segmenter or pass meta=")
    thr = float(meta.get("threshold", 0.5)) if threshold is None else float(threshold)
    mask = (segment_probability(session_or_model, image, meta) > thr).astype(np.uint8)
    return mask, mask_area(mask, spacing_mm)


def segment_source(session_or_model: Any, src: str | Path | bytes, name: str | None = None,
                   threshold: float | None = None) -> tuple[np.ndarray, dict[str, float | None]]:
    """``segment_array`` on a file or uploaded bytes (PNG/JPEG/TIFF/BMP/DICOM/one-slice NIfTI), decoded by content
    with ``lib.imageio``; the area is also in mm^2 when the file states a pixel spacing (DICOM, NIfTI)."""
    from lib.imageio import read_image_with_meta

    image, info = read_image_with_meta(src, name=name)
    image = np.squeeze(image)
    if image.ndim == 3 and image.shape[-1] not in (3, 4) and image.shape[0] not in (1, 3, 4):
        raise DataError(name or str(src)[:80], f"a volume of shape {image.shape}: segment volumes with the folder "
                                               "CLI (python -m lib.segmentation predict), which keeps the affine")
    return segment_array(session_or_model, image, threshold=threshold, spacing_mm=pixel_spacing(info))


def pixel_spacing(info: dict) -> list[float] | None:
    """(row, column) pixel spacing in mm from ``lib.imageio.read_image_with_meta``'s info: DICOM tags sit under
    ``info["dicom"]`` (``PixelSpacing``), NIfTI zooms under ``info["spacing"]``; None when the file states none."""
    spacing = (info.get("dicom") or {}).get("PixelSpacing") or info.get("spacing")
    if spacing is None:
        return None
    spacing = [spacing, spacing] if np.isscalar(spacing) else list(spacing)[:2]
    try:
        values = [float(v) for v in spacing]
    except (TypeError, ValueError):
        return None
    return values if len(values) == 2 and all(np.isfinite(v) and v > 0 for v in values) else None


def mask_area(mask: np.ndarray, spacing_mm: float | Sequence[float] | None = None) -> dict[str, float | None]:
    """Mask area in pixels and, with a pixel spacing (row, column) in mm, in mm^2."""
    px = int(np.asarray(mask).astype(bool).sum())
    if spacing_mm is None:
        return {"pixels": px, "mm2": None}
    sy, sx = (spacing_mm, spacing_mm) if np.isscalar(spacing_mm) else tuple(spacing_mm)[:2]
    return {"pixels": px, "mm2": float(px * sy * sx)}


def mask_png(mask: np.ndarray) -> bytes:
    """A mask as PNG bytes (0/255, 8-bit grey): the body ``POST /segment`` returns."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _write_nifti(mask: np.ndarray, affine: np.ndarray, path: Path, header=None) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(mask.astype(np.uint8), affine, header)
    img.set_data_dtype(np.uint8)
    nib.save(img, str(path))


def _volume(path: Path):
    """A NIfTI volume (3D, or 4D with channels), or None for a 2D NIfTI (read as an image)."""
    from lib.io import load_nifti

    try:
        return load_nifti(path)
    except DataError as exc:
        if "expected a 3D volume" not in exc.problem:
            raise
        return None


def segment_file(path: str | Path, session_or_model: Any, meta: dict, out_dir: str | Path, fmt: str = "auto",
                 threshold: float | None = None) -> dict:
    """Segment one file and write its mask: NIfTI in -> NIfTI out on the source's voxel grid, affine and header
    (axial slices cut by the affine, channels on a 4th axis); 2D images -> PNG (0/255) or, with ``fmt='nifti'``,
    NIfTI with an identity affine."""
    path, out_dir = Path(path), Path(out_dir)
    stem = path.name[: -len(file_suffix(path))] if file_suffix(path) else path.name
    img = _volume(path) if file_suffix(path) in (".nii", ".nii.gz") else None
    if img is not None:
        vol = np.asarray(img.dataobj, dtype=np.float32)
        vol = np.moveaxis(vol, 3, 0) if vol.ndim == 4 else vol[None]  # channels on the 4th axis
        slices = np.stack([volume_slices(c, img.affine) for c in vol])  # (C, S, H, W)
        mask = np.zeros(slices.shape[1:], np.uint8)
        for k in range(slices.shape[1]):
            chw = slices[:, k]
            if chw.max() > chw.min():  # blank slices (outside the scan) stay empty
                mask[k] = segment_array(session_or_model, chw, meta, threshold)[0]
        out = out_dir / f"{stem}_mask.nii.gz"
        _write_nifti(slices_to_volume(mask, img.affine), img.affine, out, img.header)
        zooms = img.header.get_zooms()[:3]
        return {"file": str(path), "output": str(out), "pixels": int(mask.sum()), "mm2": None,
                "ml": float(mask.sum() * np.prod(zooms) / 1000.0)}
    image = read_image_2d(path)
    mask, area = segment_array(session_or_model, image, meta, threshold)
    if fmt == "nifti":
        out = out_dir / f"{stem}_mask.nii.gz"
        _write_nifti(slices_to_volume(mask[None], np.eye(4)), np.eye(4), out)  # same slicing rule as NIfTI inputs
    else:
        out = out_dir / f"{stem}_mask.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(mask_png(mask))
    return {"file": str(path), "output": str(out), **area, "ml": None}


def predict_folder(model_path: str | Path, input_dir: str | Path, out_dir: str | Path, fmt: str = "auto",
                   threshold: float | None = None) -> tuple[pd.DataFrame, SkippedCases]:
    """Segment every image (PNG/JPG/TIFF/DICOM/NIfTI) below a folder with a checkpoint or ONNX export; bad
    files are skipped and listed in ``skipped_segment.csv`` beside ``predictions.csv``."""
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if not input_dir.is_dir():
        raise DataError(input_dir, "input folder not found")
    if fmt not in ("auto", "png", "nifti"):
        raise ValueError(f"format must be auto|png|nifti, got {fmt!r}")
    segmenter, meta = load_segmenter(model_path)
    files = sorted(p for p in input_dir.rglob("*") if p.is_file() and file_suffix(p) in INPUT_SUFFIXES)
    rows, skipped = [], SkippedCases()
    for p in files:
        try:
            rows.append(segment_file(p, segmenter, meta, out_dir, fmt, threshold))
        except (DataError, ValueError) as exc:
            skipped.add(str(p.relative_to(input_dir)), exc if isinstance(exc, DataError) else DataError(p, str(exc)),
                        "segment")
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=["file", "output", "pixels", "mm2", "ml"])
    table.to_csv(out_dir / "predictions.csv", index=False)
    skipped.save(out_dir / "skipped_segment.csv")
    return table, skipped
