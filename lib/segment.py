"""2D segmentation: data sets, preprocessing, models by name, Dice/IoU, grouped k-fold, inference, ONNX.

Why: the TRUS lesion recipe (FPN + ResNet encoder, Dice + BCE, Adam + ReduceLROnPlateau,
crop-to-field-of-view + resize, diffusion denoising, k-fold, CLI/web inference) is rebuilt from
maintained parts: ``segmentation_models_pytorch`` and MONAI networks, MONAI losses/metrics/transforms,
SimpleITK / scikit-image filters, and the repository's one training loop ``lib.train.fit``.

Data flow: a loader returns a ``RawSet`` (images as read, binary masks, one table row per image with
``case_id`` and ``group`` = patient); ``prepare(raw, Preprocess)`` crops, denoises, resizes and
normalises into a ``SegData`` of tensors. Keeping the raw set lets the notebook re-prepare it for
the denoising ablation without reading files again. The ``Preprocess`` recipe is stored in every
checkpoint, so ``segment_array`` applies exactly the training preprocessing and maps the mask back
to the input's own size.

Dice convention: an image whose truth and prediction are both empty scores Dice = IoU = 1 (MONAI
``ignore_empty=False``); empty truth with a non-empty prediction scores 0. Lesion-free images are
therefore not dropped, and ``dice_pos`` reports Dice over images that do contain a lesion.

Mask files must hold 0/1 (or 0/255, the usual 8-bit encoding of a binary mask); anything else, such as
a multi-label map, is refused with a message naming the file, unless ``label=`` picks one structure.

Inference API (what the service's ``POST /segment`` uses; torch is imported, the network can be ONNX):

* ``export_onnx(checkpoint_or_fold_checkpoints, out_dir, sample=None)`` -> metadata dict; writes
  ``model.onnx`` (input ``input`` (N, C, S, S), output ``probabilities`` (N, 1, S, S), fold models averaged
  in the graph, recipe also embedded in the ONNX metadata), ``metadata.json``, ``labels.json``, ``sample.*``;
  raises ``RuntimeError`` when ONNX Runtime and torch differ by more than ``tol``.
* ``load_segmenter(best.pt | model.onnx | export folder)`` -> ``(torch model or ORT session, meta)``.
* ``segment_array(session_or_model, image)`` -> ``(mask uint8 0/1 on the image's grid, area dict)``;
  ``segment_source(session_or_model, path_or_bytes)`` decodes any supported file first; ``mask_png(mask)``.
* CLI: ``python -m lib.segment predict|export`` (see ``main``).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lib import config
from lib.io import DataError, SkippedCases

DATASETS = ("trus", "ms-lesion", "ct-organs")
SMP_ARCHS = ("fpn", "unet", "unetplusplus", "deeplabv3plus", "linknet", "pspnet", "manet")
MONAI_ARCHS = ("monai-unet", "monai-flexunet")
DEFAULT_MODEL, DEFAULT_ENCODER, DEFAULT_SIZE = "fpn", "resnet18", 128
LOSSES = ("dicece", "dice+bce", "dicefocal", "bce")
DENOISERS = ("none", "gradient", "curvature", "isotropic", "tv")
NORMALISERS = ("minmax", "zscore", "none")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz")
MS_MODALITIES = ("FLAIR", "T1", "T2")
MS_ROOT = ("ms-lesion-mri", "cross_sectional", "MNI")


# ----------------------------------------------------------------------------- containers


@dataclass
class RawSet:
    """Images as read (``(C, H, W)`` float32, sizes may differ), binary masks ``(H, W)`` uint8, one row each."""

    images: list[np.ndarray]
    masks: list[np.ndarray]
    table: pd.DataFrame  # case_id, group, + source columns
    channels: list[str]
    window: tuple[float, float] | None = None  # (level, width) for CT in HU
    skipped: SkippedCases = field(default_factory=SkippedCases)

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class SegData:
    """Prepared tensors: ``x`` (N, C, S, S) float32, ``y`` (N, 1, S, S) float32 0/1, and the table."""

    x: Tensor
    y: Tensor
    table: pd.DataFrame
    channels: list[str]
    preprocessing: dict
    skipped: SkippedCases = field(default_factory=SkippedCases)

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx: Sequence[int] | np.ndarray) -> SegData:
        idx = np.asarray(idx, dtype=int)
        return SegData(self.x[idx], self.y[idx], self.table.iloc[idx].reset_index(drop=True), self.channels,
                       self.preprocessing, self.skipped)


# ----------------------------------------------------------------------------- reading and checks


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_image_2d(path: str | Path) -> np.ndarray:
    """A 2D image as float32 ``(C, H, W)`` with its physical values, decoded by ``lib.imageio.read_image``."""
    from lib.imageio import read_image

    arr = np.squeeze(read_image(path))
    if arr.ndim == 3 and arr.shape[-1] == 3 and arr.shape[0] != 3:
        arr = arr.transpose(2, 0, 1)  # colour (H, W, 3) -> channels first
    elif arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise DataError(path, f"expected a 2D image, got shape {arr.shape}")
    return arr.astype(np.float32)


def read_chw(path: str | Path) -> np.ndarray:
    """One 2D image ``(C, H, W)`` from any input file, including a one-slice NIfTI with channels on the 4th axis
    (the layout ``write_demo_inputs`` and the folder CLI use for multi-channel MRI)."""
    path = Path(path)
    if _suffix(path) not in (".nii", ".nii.gz"):
        return read_image_2d(path)
    from lib.io import load_nifti

    vol = np.asarray(load_nifti(path).dataobj, dtype=np.float32)
    vol = np.moveaxis(vol, 3, 0) if vol.ndim == 4 else vol[None]
    if vol.shape[-1] != 1:
        raise DataError(path, f"a volume of {vol.shape[-1]} slices: segment it with segment_file / the folder CLI")
    return np.stack([axial_slice(c, 0) for c in vol])


def read_mask_2d(path: str | Path, label: int | None = None) -> np.ndarray:
    """A 2D mask file (PNG/TIFF/NIfTI) -> uint8 0/1 ``(H, W)``, refusing non-binary content clearly."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "mask not found")
    try:
        if _suffix(path) in (".nii", ".nii.gz"):
            import nibabel as nib

            arr = np.asarray(nib.load(str(path)).dataobj)
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im)
    except Exception as exc:
        raise DataError(path, f"unreadable mask ({type(exc).__name__}: {exc})") from exc
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # RGB(A) mask saved by an image editor
        if not (arr[..., :3] == arr[..., :1]).all():
            raise DataError(path, "mask is a colour image; save it as a single-channel 0/1 (or 0/255) image")
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DataError(path, f"expected a 2D mask, got shape {arr.shape}")
    return binarise_mask(arr, path, label)


def binarise_mask(mask: np.ndarray, path: str | Path = "<array>", label: int | None = None) -> np.ndarray:
    """0/1 mask from 0/1 or 0/255 values; a label map needs ``label=`` (which structure) or is refused."""
    if label is not None:
        return (mask == label).astype(np.uint8)
    if not np.isfinite(mask).all():
        raise DataError(path, "mask has NaN/inf values")
    values = np.unique(mask)
    if set(values.tolist()) <= {0, 1}:
        return mask.astype(np.uint8)
    if set(values.tolist()) <= {0, 255}:
        return (mask == 255).astype(np.uint8)
    shown = ", ".join(f"{v:g}" for v in values[:8]) + (" ..." if len(values) > 8 else "")
    if np.issubdtype(mask.dtype, np.floating) and values.min() >= 0 and values.max() <= 1:
        raise DataError(path, f"mask has fractional values ({shown}); threshold it to 0/1 first")
    raise DataError(path, f"mask is not binary: values {shown}. A label map? Pass label=<value> to segment one "
                          "structure, or save the mask as 0/1 (or 0/255)")


def check_pair(image: np.ndarray, mask: np.ndarray, image_path: str | Path, mask_path: str | Path) -> None:
    """Image ``(C, H, W)`` and mask ``(H, W)`` must cover the same pixels."""
    if tuple(image.shape[-2:]) != tuple(mask.shape[-2:]):
        raise DataError(mask_path, f"mask size {mask.shape[-1]}x{mask.shape[-2]} does not match image {image_path} "
                                   f"size {image.shape[-1]}x{image.shape[-2]}")


# ----------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes network input; stored in checkpoints so inference repeats it exactly.

    Steps: crop to the field of view (bounding box of pixels above ``fov_threshold`` in the raw image,
    e.g. the ultrasound fan or the skull-stripped brain), scale each channel to [0, 1] (CT: by the HU
    window; otherwise 0.5-99.5th percentiles inside the crop) so the diffusion ``conductance`` means the
    same for every source, denoise, resize to ``size`` x ``size``, then ``normalise``.
    """

    size: int = DEFAULT_SIZE
    crop_fov: bool = True
    fov_threshold: float = 0.0
    denoise: str = "none"
    denoise_iterations: int = 5
    conductance: float = 1.0
    normalise: str = "minmax"
    window: tuple[float, float] | None = None  # (level, width) in HU for CT

    def __post_init__(self) -> None:
        if self.size % 32:
            raise ValueError(f"size must be a multiple of 32 (encoder strides), got {self.size}")
        if self.denoise not in DENOISERS:
            raise ValueError(f"denoise must be one of {DENOISERS}, got {self.denoise!r}")
        if self.normalise not in NORMALISERS:
            raise ValueError(f"normalise must be one of {NORMALISERS}, got {self.normalise!r}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        keys = cls.__dataclass_fields__
        d = {k: v for k, v in d.items() if k in keys}
        if d.get("window") is not None:
            d["window"] = tuple(d["window"])
        return cls(**d)


def denoise(channel: np.ndarray, method: str = "curvature", iterations: int = 5,
            conductance: float = 1.0) -> np.ndarray:
    """Edge-preserving smoothing of one 2D channel in [0, 1] by SimpleITK / scikit-image filters.

    ``gradient``/``curvature`` = Perona-Malik / curvature anisotropic diffusion; ``isotropic`` = the
    heat equation run for the same time (a Gaussian with variance 2 * 0.125 * iterations pixels^2);
    ``tv`` = total-variation (Chambolle) with weight 0.1 / conductance.
    """
    if method == "none":
        return channel.astype(np.float32)
    if method == "tv":
        from skimage.restoration import denoise_tv_chambolle

        return denoise_tv_chambolle(channel.astype(np.float64), weight=0.1 / conductance).astype(np.float32)
    import SimpleITK as sitk  # noqa: N813

    img = sitk.GetImageFromArray(channel.astype(np.float32))
    if method == "gradient":
        out = sitk.GradientAnisotropicDiffusion(img, timeStep=0.125, conductanceParameter=conductance,
                                                numberOfIterations=iterations)
    elif method == "curvature":
        out = sitk.CurvatureAnisotropicDiffusion(img, timeStep=0.0625, conductanceParameter=conductance,
                                                 numberOfIterations=iterations)
    elif method == "isotropic":
        out = sitk.DiscreteGaussian(img, variance=2 * 0.125 * iterations, useImageSpacing=False)
    else:
        raise ValueError(f"denoise must be one of {DENOISERS}, got {method!r}")
    return sitk.GetArrayFromImage(out).astype(np.float32)


def fov_box(image: np.ndarray, pre: Preprocess) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the field of view (whole image when cropping is off or nothing is above threshold)."""
    h, w = image.shape[-2:]
    if not pre.crop_fov:
        return 0, h, 0, w
    from monai.transforms.utils import generate_spatial_bounding_box

    thr = pre.fov_threshold if pre.window is None else pre.window[0] - pre.window[1] / 2
    start, end = generate_spatial_bounding_box(image, select_fn=lambda a: a > thr)
    if end[0] - start[0] < 8 or end[1] - start[1] < 8:
        return 0, h, 0, w
    return int(start[0]), int(end[0]), int(start[1]), int(end[1])


def _scale01(channel: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    if window is not None:
        lo = window[0] - window[1] / 2
        return np.clip((channel - lo) / window[1], 0, 1).astype(np.float32)
    lo, hi = np.percentile(channel, [0.5, 99.5])
    return np.clip((channel - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def _resize(arr: np.ndarray, size: Sequence[int], mode: str) -> np.ndarray:
    from monai.transforms import Resize

    kw = {"anti_aliasing": True} if mode in ("bilinear", "area") else {}
    return np.asarray(Resize(tuple(size), mode=mode, **kw)(torch.as_tensor(arr)), dtype=np.float32)


def preprocess_image(image: np.ndarray, pre: Preprocess) -> tuple[np.ndarray, dict]:
    """Raw ``(C, H, W)`` -> network input ``(C, size, size)`` float32 and the geometry to undo the crop/resize."""
    y0, y1, x0, x1 = fov_box(image, pre)
    crop = image[:, y0:y1, x0:x1]
    chans = [denoise(_scale01(c, pre.window), pre.denoise, pre.denoise_iterations, pre.conductance) for c in crop]
    x = _resize(np.stack(chans), (pre.size, pre.size), "bilinear")
    if pre.normalise == "minmax":
        from monai.transforms import ScaleIntensity

        x = np.asarray(ScaleIntensity(0.0, 1.0, channel_wise=True)(x), dtype=np.float32)
    elif pre.normalise == "zscore":
        from monai.transforms import NormalizeIntensity

        x = np.asarray(NormalizeIntensity(channel_wise=True)(x), dtype=np.float32)
    return x, {"shape": [int(v) for v in image.shape[-2:]], "box": [y0, y1, x0, x1]}


def preprocess_mask(mask: np.ndarray, geometry: dict, size: int) -> np.ndarray:
    """The mask cropped and resized like its image (nearest neighbour keeps it 0/1)."""
    y0, y1, x0, x1 = geometry["box"]
    return _resize(mask[None, y0:y1, x0:x1].astype(np.float32), (size, size), "nearest")[0].astype(np.uint8)


def restore_probability(prob: np.ndarray, geometry: dict) -> np.ndarray:
    """A ``(size, size)`` probability map back on the input image's own pixel grid (zero outside the crop)."""
    y0, y1, x0, x1 = geometry["box"]
    out = np.zeros(geometry["shape"], np.float32)
    out[y0:y1, x0:x1] = _resize(prob[None], (y1 - y0, x1 - x0), "bilinear")[0]
    return out


def prepare(raw: RawSet, pre: Preprocess) -> SegData:
    """Preprocess every image/mask pair of a raw set into tensors."""
    xs, ys = [], []
    for img, mask in zip(raw.images, raw.masks, strict=True):
        x, geom = preprocess_image(img, pre if raw.window is None else replace(pre, window=raw.window))
        xs.append(x)
        ys.append(preprocess_mask(mask, geom, pre.size))
    p = pre if raw.window is None else replace(pre, window=raw.window)
    meta = {**p.to_dict(), "channels": list(raw.channels)}
    y = np.stack(ys)[:, None].astype(np.float32)
    table = raw.table.reset_index(drop=True).assign(has_lesion=(y.reshape(len(y), -1).max(1) > 0).astype(int))
    return SegData(torch.as_tensor(np.stack(xs)), torch.as_tensor(y), table, list(raw.channels), meta, raw.skipped)


# ----------------------------------------------------------------------------- loaders


def load_pairs(table: pd.DataFrame, root: str | Path, image_col: str = "image_path", mask_col: str = "mask_path",
               label: int | None = None, stage: str = "segment") -> RawSet:
    """Image/mask files listed in a table (paths relative to ``root``); bad pairs are skipped and recorded."""
    root = Path(root)
    images, masks, keep, skipped = [], [], [], SkippedCases()
    for i, row in table.reset_index(drop=True).iterrows():
        ip, mp = root / str(row[image_col]), root / str(row[mask_col])
        try:
            img = read_image_2d(ip)
            mask = read_mask_2d(mp, label)
            check_pair(img, mask, ip, mp)
        except DataError as exc:
            skipped.add(str(row.get("case_id", ip.stem)), exc, stage)
            continue
        images.append(img)
        masks.append(mask)
        keep.append(i)
    if not images:
        raise DataError(root, f"no usable image/mask pairs ({len(skipped)} skipped)")
    out = table.reset_index(drop=True).iloc[keep].reset_index(drop=True)
    return RawSet(images, masks, out, ["gray"] if images[0].shape[0] == 1 else [f"c{k}" for k in
                                                                                 range(images[0].shape[0])],
                  skipped=skipped)


def load_trus(root: str | Path, target: str = "lesion") -> RawSet:
    """The synthetic TRUS set written by ``lib.synth_trus.ensure_trus`` (target ``lesion`` or ``gland``)."""
    root = Path(root)
    if not (root / "index.csv").exists():
        raise DataError(root / "index.csv", "TRUS index not found (run lib.synth_trus.ensure_trus)")
    table = pd.read_csv(root / "index.csv")
    table["group"] = table["patient_id"]
    raw = load_pairs(table, root, mask_col={"lesion": "mask_path", "gland": "gland_path"}[target])
    raw.channels = ["bmode"]
    return raw


def axial_slice(volume: np.ndarray, k: int) -> np.ndarray:
    """Slice ``k`` of the last axis, rotated so anterior is up for RAS/LAS volumes (display convention)."""
    return np.rot90(volume[..., k]).copy()


def from_axial(slice2d: np.ndarray) -> np.ndarray:
    """Inverse of ``axial_slice``'s rotation (back to the volume's own (i, j) order)."""
    return np.rot90(slice2d, -1).copy()


def load_ms_lesion(root: str | Path | None = None, patients: Sequence[str] | None = None,
                   modalities: Sequence[str] = MS_MODALITIES, min_brain_fraction: float = 0.15,
                   max_slices_per_patient: int | None = None, slice_step: int = 1) -> RawSet:
    """Axial slices of the MS-lesion MRI (one channel per modality, consensus lesion mask), group = patient.

    Slices where the brain covers less than ``min_brain_fraction`` of the image are left out (top and
    bottom of the head); ``max_slices_per_patient`` keeps evenly spaced slices for quick runs.
    """
    from lib.io import check_same_grid, load_nifti

    root = Path(root) if root else config.shared_path(*MS_ROOT)
    if not root.exists():
        raise DataError(root, "MS-lesion folder not found (expected ../shared/data/ms-lesion-mri/cross_sectional/MNI)")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and (patients is None or p.name in patients))
    images, masks, rows, skipped = [], [], [], SkippedCases()
    for d in dirs:
        try:
            mpath = next(iter(sorted(d.glob("GOLD_STANDARD*.nii*"))), d / "GOLD_STANDARD.nii.gz")
            mask_img = load_nifti(mpath)
            vols = []
            for mod in modalities:
                path = next(iter(sorted(d.glob(f"{mod}_*.nii*"))), d / f"{mod}.nii.gz")
                img = load_nifti(path)
                check_same_grid(img, mask_img, path, mpath)
                vols.append(np.asarray(img.dataobj, dtype=np.float32))
            mask = binarise_mask(np.asarray(mask_img.dataobj), mpath)
        except DataError as exc:
            skipped.add(d.name, exc, "segment")
            continue
        brain = (vols[0] > 0).reshape(-1, vols[0].shape[2]).mean(0)
        ks = np.flatnonzero(brain >= min_brain_fraction)[::slice_step]
        if max_slices_per_patient and len(ks) > max_slices_per_patient:
            ks = ks[np.linspace(0, len(ks) - 1, max_slices_per_patient).round().astype(int)]
        for k in ks:
            images.append(np.stack([axial_slice(v, int(k)) for v in vols]))
            masks.append(axial_slice(mask, int(k)))
            rows.append({"case_id": f"{d.name}_z{int(k):03d}", "group": d.name, "patient_id": d.name,
                         "slice": int(k), "lesion_area_px": int(masks[-1].sum()), "spacing_mm": 1.0})
    if not images:
        raise DataError(root, f"no usable MS-lesion patients ({len(skipped)} skipped)")
    table = pd.DataFrame(rows)
    table["has_lesion"] = (table.lesion_area_px > 0).astype(int)
    return RawSet(images, masks, table, list(modalities), skipped=skipped)


def load_ct_organs(cohort: str | Path, structure: str = "liver", window: tuple[float, float] = (50.0, 400.0),
                   max_slices_per_study: int | None = None, min_body_fraction: float = 0.2) -> RawSet:
    """Axial slices of the synthetic CT cohort (``lib.synth.ensure_cohort``) with one organ's mask.

    Slices come straight from the cohort's ``ct/`` and ``seg/`` NIfTIs (the same volumes the crop stage
    reads), windowed by ``window`` (level, width) in HU at preprocessing; group = patient.
    """
    from lib.io import load_case

    cohort = Path(cohort)
    studies = pd.read_csv(cohort / "studies.csv")
    class_map = {v: int(k) for k, v in json.loads((cohort / "class_map.json").read_text()).items()}
    if structure not in class_map:
        raise ValueError(f"unknown structure {structure!r}; choose from {sorted(class_map)}")
    images, masks, rows, skipped = [], [], [], SkippedCases()
    for st in studies.itertuples():
        try:
            ct, seg = load_case(cohort / st.ct_path, cohort / st.seg_path)
        except DataError as exc:
            skipped.add(st.study_id, exc, "segment")
            continue
        hu = np.asarray(ct.dataobj, dtype=np.float32)
        organ = (np.asarray(seg.dataobj) == class_map[structure]).astype(np.uint8)
        body = (hu > -500).reshape(-1, hu.shape[2]).mean(0)
        ks = np.flatnonzero(body >= min_body_fraction)
        if max_slices_per_study and len(ks) > max_slices_per_study:
            ks = ks[np.linspace(0, len(ks) - 1, max_slices_per_study).round().astype(int)]
        spacing = float(abs(ct.affine[0, 0]))
        for k in ks:
            images.append(axial_slice(hu, int(k))[None])
            masks.append(axial_slice(organ, int(k)))
            rows.append({"case_id": f"{st.study_id}_z{int(k):03d}", "group": st.patient_id,
                         "patient_id": st.patient_id, "study_id": st.study_id, "slice": int(k),
                         "lesion_area_px": int(masks[-1].sum()), "spacing_mm": spacing})
    if not images:
        raise DataError(cohort, f"no usable CT studies ({len(skipped)} skipped)")
    table = pd.DataFrame(rows)
    table["has_lesion"] = (table.lesion_area_px > 0).astype(int)
    return RawSet(images, masks, table, ["ct"], window=tuple(window), skipped=skipped)


def load_ct_crops(crops_dir: str | Path, structure: str = "liver", target: str = "organ", mode: str = "bbox",
                  max_slices_per_study: int | None = None) -> RawSet:
    """Axial slices of notebook 02's organ crops (``crops/index.csv`` + ``.npz``; ARCHITECTURE "Crop index").

    Images are already HU-windowed to [0, 1]; the mask is the organ (``target='organ'``) or its lesions
    (``'lesion'``). Margin slices without organ are kept, so empty masks occur; group = patient.
    """
    from lib.crop import load_crop, read_index

    crops_dir = Path(crops_dir)
    if not (crops_dir / "index.csv").exists():
        raise DataError(crops_dir / "index.csv", "crop index not found (run notebook 02 or lib.crop.ensure_crops)")
    if target not in ("organ", "lesion"):
        raise ValueError(f"target must be organ|lesion, got {target!r}")
    index = read_index(crops_dir)
    index = index[(index.structure == structure) & (index["mode"] == mode) & index.path.str.endswith(".npz")]
    if index.empty:
        raise DataError(crops_dir / "index.csv", f"no {mode} .npz crops of {structure!r}")
    images, masks, rows, skipped = [], [], [], SkippedCases()
    for r in index.itertuples():
        try:
            crop = load_crop(crops_dir, r.path)
            key = "mask" if target == "organ" else "lesion"
            if key not in crop:
                raise DataError(crops_dir / r.path, f"crop has no {key!r} array")
            img, m = crop["image"].astype(np.float32), binarise_mask(crop[key], crops_dir / r.path)
            check_pair(img, m, crops_dir / r.path, crops_dir / r.path)
        except (DataError, OSError, ValueError) as exc:
            skipped.add(str(r.case_id), exc if isinstance(exc, DataError) else DataError(r.path, str(exc)), "segment")
            continue
        ks = np.arange(len(img))
        if max_slices_per_study and len(ks) > max_slices_per_study:
            ks = ks[np.linspace(0, len(ks) - 1, max_slices_per_study).round().astype(int)]
        spacing = float(str(r.spacing).split("x")[-1])
        for k in ks:
            images.append(img[k][None])
            masks.append(m[k])
            rows.append({"case_id": f"{r.case_id}_{structure}_s{int(k):02d}", "group": str(r.patient_id),
                         "patient_id": str(r.patient_id), "study_id": str(r.case_id), "slice": int(k),
                         "lesion_area_px": int(m[k].sum()), "spacing_mm": spacing})
    if not images:
        raise DataError(crops_dir, f"no usable crops ({len(skipped)} skipped)")
    table = pd.DataFrame(rows)
    table["has_lesion"] = (table.lesion_area_px > 0).astype(int)
    return RawSet(images, masks, table, ["ct"], skipped=skipped)


def load_dataset(name: str = "trus", profile: str = "smoke", seed: int = config.DEFAULT_SEED,
                 run_dir: str | Path | None = None, **kw: Any) -> RawSet:
    """One of ``DATASETS`` by name; synthetic sets are generated (cached) for ``profile`` and ``seed``.

    ``ct-organs`` reads notebook 02's crops in ``run_dir/crops`` (made by ``lib.crop.ensure_crops`` when
    missing); ``source='cohort'`` takes whole axial slices from the cohort NIfTIs instead. Extra keywords go
    to the loader (``max_slices_per_patient``/``patients`` for ``ms-lesion``, ``structure``/``target`` for
    ``ct-organs``, ``target`` for ``trus``).
    """
    if name == "trus":
        from lib.synth_trus import ensure_trus

        return load_trus(ensure_trus(profile, seed), **kw)
    if name == "ms-lesion":
        return load_ms_lesion(**kw)
    if name == "ct-organs":
        if kw.pop("source", "crops") == "cohort":
            from lib.synth import ensure_cohort

            return load_ct_organs(ensure_cohort(profile, seed), **kw)
        run = config.resolve_run_dir(run_dir, profile)
        if not (run / "crops" / "index.csv").exists():
            from lib.crop import ensure_crops

            ensure_crops(run, profile, seed)
        return load_ct_crops(run / "crops", **kw)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


# ----------------------------------------------------------------------------- models, losses, metrics


def build_model(name: str = DEFAULT_MODEL, in_chans: int = 1, num_classes: int = 1, encoder: str = DEFAULT_ENCODER,
                pretrained: bool = False, **kw: Any) -> nn.Module:
    """A 2D segmentation network by name: smp architectures (``fpn``, ``unet``, ...; encoder = smp name or
    ``tu-<timm name>``) or MONAI ``monai-unet`` / ``monai-flexunet``. Signature matches
    ``lib.models.load_checkpoint``'s ``builder``."""
    if name in SMP_ARCHS:
        import segmentation_models_pytorch as smp

        return smp.create_model(name, encoder_name=encoder, encoder_weights="imagenet" if pretrained else None,
                                in_channels=in_chans, classes=num_classes, **kw)
    if name == "monai-unet":
        from monai.networks.nets import UNet

        return UNet(spatial_dims=2, in_channels=in_chans, out_channels=num_classes,
                    channels=tuple(kw.get("channels", (16, 32, 64, 128))), strides=(2, 2, 2),
                    num_res_units=int(kw.get("num_res_units", 2)))
    if name == "monai-flexunet":
        from monai.networks.nets import FlexibleUNet

        backbone = encoder if encoder.startswith(("efficientnet", "resnet")) else "resnet18"
        return FlexibleUNet(in_chans, num_classes, backbone=backbone, pretrained=pretrained, spatial_dims=2)
    raise ValueError(f"model must be one of {SMP_ARCHS + MONAI_ARCHS}, got {name!r}")


def make_seg_loss(name: str = "dicece") -> Callable[[Tensor, Tensor], Tensor]:
    """Binary segmentation loss on logits: MONAI ``DiceCELoss`` (Dice + BCE), smp Dice + soft BCE, Dice + focal.

    Dice terms are computed over the whole batch (MONAI ``batch=True``, smp's default): with per-image Dice,
    small lesions and lesion-free images made the network collapse to empty masks on the demo sets.
    """
    if name == "dicece":
        from monai.losses import DiceCELoss

        loss = DiceCELoss(sigmoid=True, batch=True)  # batch Dice: lesion-free images do not pull towards empty
    elif name == "dice+bce":
        import segmentation_models_pytorch as smp

        dice, bce = smp.losses.DiceLoss("binary", from_logits=True), smp.losses.SoftBCEWithLogitsLoss()
        loss = lambda logits, y: dice(logits, y) + bce(logits, y)
    elif name == "dicefocal":
        from monai.losses import DiceFocalLoss

        loss = DiceFocalLoss(sigmoid=True, batch=True)
    elif name == "bce":
        loss = nn.BCEWithLogitsLoss()
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    return lambda logits, targets: loss(logits.float(), targets.float())


def dice_iou(pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice and IoU of binary masks ``(N, 1, H, W)`` by MONAI; both empty -> 1 (see module doc)."""
    from monai.metrics import compute_dice, compute_iou

    p, t = torch.as_tensor(np.asarray(pred)).float(), torch.as_tensor(np.asarray(target)).float()
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} differs from target shape {tuple(t.shape)}")
    if p.ndim == 3:
        p, t = p[:, None], t[:, None]
    dice = compute_dice(p, t, include_background=True, ignore_empty=False)[:, 0]
    iou = compute_iou(p, t, include_background=True, ignore_empty=False)[:, 0]
    return dice.numpy().astype(float), iou.numpy().astype(float)


def seg_metrics(threshold: float = 0.5) -> Callable[[Tensor, Tensor], dict[str, float]]:
    """An ``evaluate_fn`` for ``lib.train.fit``: mean Dice, IoU, and Dice over images with a lesion."""

    def evaluate(logits: Tensor, targets: Tensor) -> dict[str, float]:
        dice, iou = dice_iou(logits.float().sigmoid() > threshold, targets > 0.5)
        pos = targets.reshape(len(targets), -1).amax(1).numpy() > 0.5
        return {"dice": float(dice.mean()), "iou": float(iou.mean()),
                "dice_pos": float(dice[pos].mean()) if pos.any() else float("nan")}

    return evaluate


# ----------------------------------------------------------------------------- training


class SegDataset(Dataset):
    """(image, mask) pairs from a ``SegData`` with joint MONAI augmentation (re-seeded every epoch by ``fit``).

    With ``patch_size`` > 0 every item is a ``patch_size`` square patch instead of the whole image (lesion-aware
    sampling for small lesions, as MONAI ``RandCropByPosNegLabeld``): with probability ``pos_fraction`` a patch
    is centred on a foreground pixel of a random image that has foreground, otherwise on a random in-field pixel
    (image > 0 in any channel) of any image. Why: MS lesions cover ~0.1-0.5 % of a slice, so whole slices give
    the loss almost no lesion pixels; patches raise that share while the fully convolutional network still
    runs on whole images at validation and inference. Item ``i`` is drawn from its own generator seeded by
    ``(seed, i)``, so the patches of an epoch do not depend on loader order or workers; ``len`` is
    ``samples_per_epoch`` (default: the number of images).
    """

    def __init__(self, data: SegData, augment: str | None = "light", seed: int = 0, patch_size: int = 0,
                 pos_fraction: float = 0.5, samples_per_epoch: int = 0) -> None:
        self.x, self.y = data.x, data.y
        self.transform = make_seg_augment(augment, seed)
        self.patch_size, self.pos_fraction, self.seed = int(patch_size), float(pos_fraction), int(seed)
        self.n = int(samples_per_epoch) or len(self.x)
        if not 0.0 <= self.pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
        if self.patch_size:
            from monai.transforms import RandCropByPosNegLabeld

            if self.patch_size > min(self.x.shape[-2:]):
                raise ValueError(f"patch_size {self.patch_size} exceeds the image size {tuple(self.x.shape[-2:])}")
            self.with_fg = np.flatnonzero(self.y.reshape(len(self.y), -1).amax(1).numpy() > 0.5)
            kw = {"keys": ["image", "label"], "label_key": "label", "spatial_size": (self.patch_size,) * 2,
                  "num_samples": 1, "image_key": "image", "image_threshold": 0.0}
            self.crops = {True: RandCropByPosNegLabeld(pos=1.0, neg=0.0, **kw),
                          False: RandCropByPosNegLabeld(pos=0.0, neg=1.0, **kw)}

    def __len__(self) -> int:
        return self.n if self.patch_size else len(self.x)

    def draw(self, i: int) -> tuple[int, bool, int]:
        """Which image item ``i`` comes from, whether its patch is centred on foreground, and the crop's seed."""
        rng = np.random.default_rng([self.seed % 2**32, int(i)])
        positive = len(self.with_fg) > 0 and rng.random() < self.pos_fraction
        j = int(rng.choice(self.with_fg)) if positive else int(rng.integers(len(self.x)))
        return j, bool(positive), int(rng.integers(2**31))

    def sample(self, i: int) -> dict[str, Tensor]:
        """Item ``i`` before augmentation: the whole image, or a patch drawn as ``draw(i)`` says."""
        if not self.patch_size:
            return {"image": self.x[i], "label": self.y[i]}
        j, positive, crop_seed = self.draw(i)
        crop = self.crops[positive]
        crop.set_random_state(seed=crop_seed)
        with warnings.catch_warnings():  # an image without foreground in-field: MONAI warns, then samples background
            warnings.simplefilter("ignore")
            out = crop({"image": self.x[j], "label": self.y[j]})[0]
        return {"image": torch.as_tensor(out["image"]).float(), "label": torch.as_tensor(out["label"]).float()}

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        item = self.sample(i)
        if self.transform is None:
            return item["image"], item["label"]
        out = self.transform(item)
        return torch.as_tensor(out["image"]).float(), (torch.as_tensor(out["label"]) > 0.5).float()

    def set_random_state(self, seed: int) -> None:
        self.seed = int(seed)
        if self.transform is not None:
            self.transform.set_random_state(seed=seed % 2**32)


def make_seg_augment(kind: str | None = "light", seed: int = 0):
    """Joint image/mask augmentation: ``light`` = left-right flip (a fan is not up-down symmetric),
    ``medium`` = + small rotation/zoom and intensity jitter."""
    if kind in (None, "none", ""):
        return None
    from monai import transforms as mt

    if kind not in ("light", "medium"):
        raise ValueError(f"augment must be none|light|medium, got {kind!r}")
    keys = ["image", "label"]
    ops: list = [mt.RandFlipd(keys, prob=0.5, spatial_axis=1)]
    if kind == "medium":
        ops += [mt.RandAffined(keys, prob=0.5, rotate_range=0.15, scale_range=0.1, mode=("bilinear", "nearest"),
                               padding_mode="zeros"),
                mt.RandScaleIntensityd("image", factors=0.1, prob=0.5),
                mt.RandShiftIntensityd("image", offsets=0.05, prob=0.5)]
    compose = mt.Compose(ops, lazy=False)
    compose.set_random_state(seed=seed)
    return compose


@dataclass
class SegConfig:
    """Knobs of a segmentation run (model, loss, optimisation); every field is a notebook parameter."""

    model: str = DEFAULT_MODEL
    encoder: str = DEFAULT_ENCODER
    loss: str = "dicece"
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 8  # early stop after this many epochs without a better Dice; the LR halves after half of it
    augment: str = "light"
    threshold: float = 0.5
    patch_size: int = 0  # > 0: train on lesion-aware patches of this size (whole images at validation/inference)
    pos_fraction: float = 0.5  # share of training patches centred on a foreground pixel (patch_size > 0 only)
    patches_per_epoch: int = 0  # training patches per epoch (0: one per training image)
    n_splits: int = 5
    seed: int = config.DEFAULT_SEED
    resume: bool = True
    progress: bool = False
    threads: int = 0  # torch intra-op threads for lib.train.fit (0 = torch's default; 1 on a crowded CPU)


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


def model_meta(cfg: SegConfig, data: SegData, target: str = "lesion") -> dict:
    """Checkpoint recipe (``lib.models.checkpoint_meta``) for a segmentation network."""
    from lib.models import checkpoint_meta

    meta = checkpoint_meta(cfg.model, in_chans=data.x.shape[1], num_classes=1, task="segmentation",
                           label_names=[target], preprocessing=data.preprocessing, encoder=cfg.encoder)
    return {**meta, "threshold": float(cfg.threshold)}


@torch.no_grad()
def predict_probs(model: nn.Module, x: Tensor, batch_size: int = 32) -> Tensor:
    """Sigmoid probabilities ``(N, 1, S, S)`` for prepared inputs."""
    model.eval()
    dev = next(model.parameters()).device
    return torch.cat([model(x[i:i + batch_size].to(dev)).float().sigmoid().cpu() for i in range(0, len(x), batch_size)])


def train_fold(data: SegData, train_idx: np.ndarray, val_idx: np.ndarray, cfg: SegConfig, out_dir: str | Path,
               target: str = "lesion") -> tuple[nn.Module, pd.DataFrame]:
    """One fold through the shared loop ``lib.train.fit`` (Adam + ReduceLROnPlateau on validation Dice)."""
    from lib.train import TrainConfig, fit, rows_digest

    config.seed_everything(cfg.seed)
    model = build_model(cfg.model, data.x.shape[1], 1, cfg.encoder)
    g = torch.Generator().manual_seed(cfg.seed)
    train_ds = SegDataset(data.subset(train_idx), cfg.augment, cfg.seed, cfg.patch_size, cfg.pos_fraction,
                          cfg.patches_per_epoch)
    val_ds = SegDataset(data.subset(val_idx), None)  # whole images: the networks are fully convolutional
    # a last batch of one image breaks batch norm at a 1x1 bottleneck (size 32): drop that single image
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=g,
                              drop_last=len(train_ds) % cfg.batch_size == 1)
    val_loader = DataLoader(val_ds, batch_size=max(cfg.batch_size, 32), shuffle=False)
    tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, optimizer="adam",
                       scheduler="plateau", patience=cfg.patience, monitor="dice", mode="max", seed=cfg.seed,
                       device="cpu" if not torch.cuda.is_available() else "auto", resume=cfg.resume,
                       progress=cfg.progress,
                       **({"threads": cfg.threads} if "threads" in TrainConfig.__dataclass_fields__ else {}))
    settings = {"loss": cfg.loss, "augment": cfg.augment, "batch_size": cfg.batch_size, "patch_size": cfg.patch_size,
                "pos_fraction": cfg.pos_fraction, "patches_per_epoch": cfg.patches_per_epoch,
                "train_rows": rows_digest(train_idx), "val_rows": rows_digest(val_idx)}
    log = fit(model, train_loader, val_loader, make_seg_loss(cfg.loss), seg_metrics(cfg.threshold), tcfg, out_dir,
              model_meta(cfg, data, target), settings)
    return model, log


@dataclass
class KFoldResult:
    """Out-of-fold per-image scores, validation probabilities, and training logs of a grouped k-fold run."""

    per_case: pd.DataFrame  # case_id, group, fold, dice, iou, true_px, pred_px, has_lesion
    probs: np.ndarray  # (N, S, S) out-of-fold probabilities (NaN where a case was not validated)
    logs: dict[int, pd.DataFrame]
    out_dir: Path


def _fold_job(data: SegData, k: int, tr: np.ndarray, va: np.ndarray, cfg: SegConfig, out_dir: Path, target: str,
              threads: int) -> tuple[pd.DataFrame, torch.Tensor]:
    """Train fold ``k`` and predict its validation images (runs in a worker process)."""
    if threads:
        torch.set_num_threads(threads)
    model, log = train_fold(data, tr, va, cfg, out_dir / f"fold{k}", target)
    return log, predict_probs(model, data.x[va])


def _train_folds(data: SegData, jobs: list[tuple[int, np.ndarray, np.ndarray]], cfg: SegConfig, out_dir: Path,
                 target: str) -> list[tuple[pd.DataFrame, torch.Tensor]]:
    """Every fold's ``_fold_job``, one worker process per granted core (in this process with one core or on a
    GPU); each fold is seeded by its settings alone, so the numbers do not depend on the number of workers."""
    from lib import resources

    pool, threads = (None, 0) if torch.cuda.is_available() else resources.worker_pool(len(jobs), "lib.segment")
    if pool is None:
        return [_fold_job(data, k, tr, va, cfg, out_dir, target, cfg.threads) for k, tr, va in jobs]
    with pool:
        futures = [pool.submit(_fold_job, data, k, tr, va, cfg, out_dir, target, threads) for k, tr, va in jobs]
        return [f.result() for f in futures]


def run_kfold(data: SegData, cfg: SegConfig, out_dir: str | Path, folds: Sequence[int] | None = None,
              target: str = "lesion") -> KFoldResult:
    """Grouped k-fold training; writes ``fold<k>/{best,last}.pt, log.csv``, ``oof.csv`` and ``metrics.json``.

    ``folds`` restricts which folds are trained (e.g. ``[0]`` for a quick ablation); the others keep NaN.
    """
    out_dir = Path(out_dir)
    fold_of = make_folds(data.table, cfg.n_splits, cfg.seed)
    todo = sorted(set(fold_of.tolist())) if folds is None else list(folds)
    # resume only a run of the same data and settings; anything else in out_dir is retrained over
    stamp = run_stamp(data, cfg, target)
    stamp_path = out_dir / "stamp.json"
    same = stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp
    cfg_run = replace(cfg, resume=cfg.resume and same)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp_path.write_text(json.dumps(stamp, indent=1))
    probs = np.full((len(data), data.x.shape[-2], data.x.shape[-1]), np.nan, np.float32)
    rows, logs = [], {}
    jobs = [(k, np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)) for k in todo]
    for (k, _, va), (logs[k], p) in zip(jobs, _train_folds(data, jobs, cfg_run, out_dir, target), strict=True):
        probs[va] = p[:, 0].numpy()
        pred, truth = p > cfg.threshold, data.y[va] > 0.5
        dice, iou = dice_iou(pred, truth)
        for j, i in enumerate(va):
            rows.append({"case_id": data.table.case_id.iloc[i], "group": data.table.group.iloc[i], "fold": k,
                         "dice": dice[j], "iou": iou[j], "true_px": int(truth[j].sum()), "pred_px": int(pred[j].sum())})
    per_case = pd.DataFrame(rows)
    per_case["has_lesion"] = (per_case.true_px > 0).astype(int)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_case.to_csv(out_dir / "oof.csv", index=False)
    summary = summarise(per_case, seed=cfg.seed)
    (out_dir / "metrics.json").write_text(json.dumps({"config": asdict(cfg), "preprocessing": data.preprocessing,
                                                      "summary": summary.to_dict(orient="records")}, indent=1))
    return KFoldResult(per_case, probs, logs, out_dir)


def run_stamp(data: SegData, cfg: SegConfig, target: str = "lesion") -> dict:
    """What a k-fold run depends on (settings, preprocessing, a hash of the tensors): resume needs a match."""
    import hashlib

    digest = hashlib.sha256(data.x.numpy().tobytes())
    digest.update(data.y.numpy().tobytes())
    digest.update("|".join(map(str, data.table.case_id)).encode())
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "progress", "threads")}
    return json.loads(json.dumps({"config": settings, "preprocessing": data.preprocessing, "target": target,
                                  "data_sha256": digest.hexdigest()}))


def bootstrap_ci(values: np.ndarray, seed: int = config.DEFAULT_SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (scipy); NaN when fewer than 2 values."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) < 2 or np.ptp(values) == 0:
        v = float(values.mean()) if len(values) else float("nan")
        return (v, v) if len(values) else (float("nan"), float("nan"))
    res = bootstrap((values,), np.mean, confidence_level=level, n_resamples=2000, method="percentile",
                    random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def summarise(per_case: pd.DataFrame, seed: int = config.DEFAULT_SEED) -> pd.DataFrame:
    """Mean Dice/IoU with 95% bootstrap CIs per fold and overall (``fold = 'all'``), plus Dice on lesion images."""
    rows = []
    parts = [(str(k), g) for k, g in per_case.groupby("fold")] + [("all", per_case)]
    for name, g in parts:
        row: dict[str, Any] = {"fold": name, "n": len(g), "n_lesion": int(g.has_lesion.sum())}
        for metric, vals in (("dice", g.dice), ("iou", g.iou), ("dice_pos", g.dice[g.has_lesion == 1])):
            lo, hi = bootstrap_ci(vals.to_numpy(), seed)
            row.update({metric: float(vals.mean()) if len(vals) else float("nan"), f"{metric}_lo": lo,
                        f"{metric}_hi": hi})
        rows.append(row)
    return pd.DataFrame(rows)


def denoise_ablation(raw: RawSet, pre: Preprocess, cfg: SegConfig, filters: Sequence[str], out_dir: str | Path,
                     folds: Sequence[int] = (0,), target: str = "lesion",
                     reuse: KFoldResult | None = None) -> pd.DataFrame:
    """Same data, model and folds with each diffusion filter: per-image Dice/IoU plus preprocessing time.

    ``reuse`` is the main run (trained with ``pre.denoise``): its scores on ``folds`` stand for that filter
    instead of training it again (same data, settings and seed give the same model).
    """
    frames = []
    for f in filters:
        t0 = time.perf_counter()
        data = prepare(raw, replace(pre, denoise=f))
        prep_s = time.perf_counter() - t0
        if reuse is not None and f == pre.denoise and set(folds) <= set(reuse.logs):
            per_case = reuse.per_case[reuse.per_case.fold.isin(list(folds))]
        else:
            per_case = run_kfold(data, cfg, Path(out_dir) / f"denoise-{f}", folds, target).per_case
        frames.append(per_case.assign(denoise=f, preprocess_s=prep_s))
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- plots


def plot_fold_scores(summary: pd.DataFrame, path: str | Path | None = None):
    """Per-fold mean Dice and IoU with 95% bootstrap CIs (seaborn point plot with explicit error bars)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    long = pd.concat([summary.assign(metric=m, value=summary[m], lo=summary[f"{m}_lo"], hi=summary[f"{m}_hi"])
                      for m in ("dice", "iou")], ignore_index=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sns.pointplot(data=long, x="fold", y="value", hue="metric", dodge=0.3, linestyles="none", errorbar=None, ax=ax)
    for j, m in enumerate(("dice", "iou")):
        sub = long[long.metric == m].reset_index(drop=True)
        xs = np.arange(len(sub)) + (j - 0.5) * 0.3
        ax.errorbar(xs, sub.value, yerr=[sub.value - sub.lo, sub.hi - sub.value], fmt="none",
                    ecolor=sns.color_palette()[j], capsize=3)
    ax.set_ylim(0, 1)
    ax.set_title("out-of-fold Dice / IoU (95% bootstrap CI)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def ablation_summary(abl: pd.DataFrame, reference: str = "none", seed: int = config.DEFAULT_SEED) -> pd.DataFrame:
    """Per filter: mean Dice/IoU with 95% CIs and the paired Dice change vs ``reference`` on the same images."""
    rows = []
    ref = abl[abl.denoise == reference].set_index("case_id").dice if reference in set(abl.denoise) else None
    for f, g in abl.groupby("denoise", sort=False):
        row: dict[str, Any] = {"denoise": f, "n": len(g), "preprocess_s": float(g.preprocess_s.iloc[0])}
        for metric in ("dice", "iou"):
            lo, hi = bootstrap_ci(g[metric].to_numpy(), seed)
            row.update({metric: float(g[metric].mean()), f"{metric}_lo": lo, f"{metric}_hi": hi})
        if ref is not None:
            delta = g.set_index("case_id").dice - ref.reindex(g.case_id).to_numpy()
            lo, hi = bootstrap_ci(delta.to_numpy(), seed)
            row.update({"delta_dice": float(delta.mean()), "delta_lo": lo, "delta_hi": hi})
        rows.append(row)
    return pd.DataFrame(rows)


def plot_ablation(abl: pd.DataFrame, path: str | Path | None = None):
    """Per-image Dice for each denoising filter (box + points): the spread matters as much as the mean."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(6, 3.5))
    sns.boxplot(data=abl, x="denoise", y="dice", color="0.85", fliersize=0, ax=ax)
    sns.stripplot(data=abl, x="denoise", y="dice", hue="has_lesion", dodge=True, size=3, alpha=0.6, ax=ax)
    ax.set(ylim=(-0.02, 1.02), title="denoising ablation: per-image Dice (same folds, model, seed)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_examples(data: SegData, n: int = 6, seed: int = config.DEFAULT_SEED, path: str | Path | None = None):
    """Prepared network inputs (first channel) with the truth contour: what the model actually sees."""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(data.table.has_lesion == 1), np.flatnonzero(data.table.has_lesion == 0)
    pick = list(rng.choice(pos, min(len(pos), n - min(len(neg), 1)), replace=False)) + list(neg[:1])
    fig, axes = plt.subplots(1, len(pick), figsize=(2.6 * len(pick), 2.9), squeeze=False)
    for ax, i in zip(axes[0], pick, strict=True):
        ax.imshow(data.x[i, 0].numpy(), cmap="gray")
        if data.y[i, 0].any():
            ax.contour(data.y[i, 0].numpy(), levels=[0.5], colors="lime", linewidths=1)
        ax.set_title(f"{data.table.case_id.iloc[i]}\n{int(data.y[i].sum())} px", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_denoisers(image: np.ndarray, pre: Preprocess, filters: Sequence[str], path: str | Path | None = None):
    """One raw image through the preprocessing with each filter (first channel), side by side."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(filters), figsize=(2.8 * len(filters), 3), squeeze=False)
    for ax, f in zip(axes[0], filters, strict=True):
        ax.imshow(preprocess_image(image, replace(pre, denoise=f))[0][0], cmap="gray")
        ax.set_title(f, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def write_demo_inputs(raw: RawSet, folder: str | Path, n: int = 3, corrupt: bool = True) -> list[Path]:
    """A small inference folder from a raw set: 1-channel images as 8-bit PNG, multi-channel as a one-slice NIfTI
    (channels on the 4th axis), plus a corrupt file that batch inference must skip and list."""
    import nibabel as nib
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(min(n, len(raw))):
        img, case = raw.images[i], str(raw.table.case_id.iloc[i])
        if img.shape[0] == 1:
            lo, hi = float(img.min()), float(img.max())
            u8 = np.round((img[0] - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
            paths.append(folder / f"{case}.png")
            Image.fromarray(u8, mode="L").save(paths[-1])
        else:
            vol = np.stack([from_axial(c) for c in img], -1)[:, :, None, :]
            paths.append(folder / f"{case}.nii.gz")
            nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), str(paths[-1]))
    if corrupt:
        paths.append(folder / "corrupt.png")
        paths[-1].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    return paths


def pick_cases(per_case: pd.DataFrame, metric: str = "dice", lesion_only: bool = True) -> pd.DataFrame:
    """Best, median and worst validated cases by ``metric`` (among images with a lesion when asked)."""
    df = per_case[per_case.has_lesion == 1] if lesion_only and per_case.has_lesion.any() else per_case
    df = df.sort_values(metric, ascending=False, kind="stable").reset_index(drop=True)
    idx = [0, len(df) // 2, len(df) - 1]
    return df.iloc[idx].assign(which=["best", "median", "worst"])


def plot_overlays(data: SegData, probs: np.ndarray, cases: pd.DataFrame, threshold: float = 0.5,
                  path: str | Path | None = None):
    """Image with truth (green) and prediction (red) contours for the chosen cases."""
    import matplotlib.pyplot as plt

    pos = {c: i for i, c in enumerate(data.table.case_id)}
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 3.4), squeeze=False)
    for ax, row in zip(axes[0], cases.itertuples(), strict=True):
        i = pos[row.case_id]
        ax.imshow(data.x[i, 0].numpy(), cmap="gray")
        for m, colour in ((data.y[i, 0].numpy(), "lime"), (probs[i] > threshold, "red")):
            if np.asarray(m).any():
                ax.contour(np.asarray(m, dtype=float), levels=[0.5], colors=colour, linewidths=1)
        ax.set_title(f"{row.which}: {row.case_id}\nDice {row.dice:.2f}", fontsize=9)
        ax.axis("off")
    fig.suptitle("truth (green) vs prediction (red)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# ----------------------------------------------------------------------------- inference

ONNX_META_KEY = "mednb_segment"  # key of the JSON recipe stored in model.onnx's metadata_props


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, dict]:
    """A trained segmenter and its recipe: ``best.pt`` -> ``(torch model, meta)``; ``model.onnx`` or an export
    folder -> ``(onnxruntime session, metadata)``. Both go straight into ``segment_array``."""
    path = Path(path)
    if path.is_dir() or _suffix(path) == ".onnx":
        onnx_path = path / "model.onnx" if path.is_dir() else path
        if not onnx_path.exists():
            raise DataError(onnx_path, "ONNX model not found")
        from lib.export import ort_session

        try:
            sess = ort_session(onnx_path)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise DataError(onnx_path, f"unreadable ONNX model ({type(exc).__name__}: {exc})") from exc
        meta = _meta_of(sess)
        if meta is None:
            raise DataError(onnx_path, "not a segmentation export (no recipe in its metadata; use export_onnx)")
        return sess, meta
    from lib.models import load_checkpoint

    model, meta = load_checkpoint(path, device, builder=build_model)
    if meta.get("task") != "segmentation":
        raise DataError(path, f"not a segmentation checkpoint (task {meta.get('task')!r})")
    model.mednb_meta = meta  # lets segment_array(model, image) find the preprocessing
    return model, meta


def _meta_of(session_or_model: Any) -> dict | None:
    """Recipe attached by ``load_segmenter`` (torch) or stored inside the ONNX file (session)."""
    if isinstance(session_or_model, nn.Module):
        return getattr(session_or_model, "mednb_meta", None)
    if hasattr(session_or_model, "get_modelmeta"):
        raw = session_or_model.get_modelmeta().custom_metadata_map.get(ONNX_META_KEY)
        return json.loads(raw) if raw else None
    return None


def _probabilities(session_or_model: Any, x: np.ndarray) -> np.ndarray:
    """Foreground probabilities ``(N, S, S)`` of prepared inputs ``(N, C, S, S)`` (torch model or ORT session)."""
    if isinstance(session_or_model, nn.Module):
        return predict_probs(session_or_model, torch.as_tensor(x))[:, 0].numpy()
    name = session_or_model.get_inputs()[0].name
    return np.asarray(session_or_model.run(None, {name: np.ascontiguousarray(x, np.float32)})[0])[:, 0]


def _as_chw(image: np.ndarray, in_chans: int) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) -> (in_chans, H, W): RGB is averaged for 1-channel models."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] not in (1, 3, 4):
        a = a[..., :3].transpose(2, 0, 1)
    if a.ndim != 3:
        raise ValueError(f"expected a 2D image (H, W[, C]), got shape {np.shape(image)}")
    if a.shape[0] != in_chans:
        if in_chans == 1:
            a = a.mean(0, keepdims=True)
        else:
            raise ValueError(f"model expects {in_chans} channels, image has {a.shape[0]}")
    return a


def segment_probability(session_or_model: Any, image: np.ndarray, meta: dict | None = None) -> np.ndarray:
    """Foreground probability on the image's own grid (the checkpoint's preprocessing, then undone)."""
    meta = meta or _meta_of(session_or_model)
    if meta is None:
        raise ValueError("no preprocessing recipe: load the model with load_segmenter or pass meta=")
    pre = Preprocess.from_dict(meta["preprocessing"])
    a = _as_chw(image, int(meta["in_chans"]))
    if min(a.shape[-2:]) < 8:
        raise ValueError(f"image too small to segment ({a.shape[-1]}x{a.shape[-2]} pixels)")
    if not np.isfinite(a).all():
        raise ValueError("image has NaN/inf pixels")
    x, geom = preprocess_image(a, pre)
    return restore_probability(_probabilities(session_or_model, x[None])[0], geom)


def segment_array(session_or_model: Any, image: np.ndarray, meta: dict | None = None,
                  threshold: float | None = None,
                  spacing_mm: float | Sequence[float] | None = None) -> tuple[np.ndarray, dict[str, float | None]]:
    """Segment one 2D image: ``(mask, area)``, what ``POST /segment`` calls.

    ``session_or_model`` comes from ``load_segmenter`` (a torch model from ``best.pt`` or an ONNX Runtime
    session from an ``export_onnx`` folder); either carries its preprocessing, so ``meta`` is only needed for
    models built by hand. ``image`` is ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` in its own values (8-bit,
    HU, MRI units): the recipe scales it. ``mask`` is uint8 0/1 with the image's height and width; ``area`` is
    ``{"pixels": n, "mm2": n * spacing^2 or None}``. ``threshold`` defaults to the one used in validation.
    """
    meta = meta or _meta_of(session_or_model)
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
                                               "CLI (python -m lib.segment predict), which keeps the affine")
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
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _write_png(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(mask_png(mask))


def _write_nifti(mask: np.ndarray, affine: np.ndarray, path: Path, header=None) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(mask.astype(np.uint8), affine, header)
    img.set_data_dtype(np.uint8)
    nib.save(img, str(path))


def segment_file(path: str | Path, session_or_model: Any, meta: dict, out_dir: str | Path, fmt: str = "auto",
                 threshold: float | None = None) -> dict:
    """Segment one file and write its mask: NIfTI in -> NIfTI out with the source affine and header (slice by
    slice along the last axis, channels on a 4th axis); 2D images -> PNG (0/255) or, with ``fmt='nifti'``,
    NIfTI with an identity affine."""
    path, out_dir = Path(path), Path(out_dir)
    stem = path.name[: -len(_suffix(path))] if _suffix(path) else path.name
    if _suffix(path) in (".nii", ".nii.gz"):
        from lib.io import load_nifti

        try:
            img = load_nifti(path)
        except DataError as exc:
            if "expected a 3D volume" not in exc.problem:
                raise
            img = None
        if img is not None:
            vol = np.asarray(img.dataobj, dtype=np.float32)
            vol = np.moveaxis(vol, 3, 0) if vol.ndim == 4 else vol[None]  # channels on the 4th axis
            mask = np.zeros(vol.shape[1:], np.uint8)
            for k in range(vol.shape[-1]):
                chw = np.stack([axial_slice(c, k) for c in vol])
                if chw.max() > chw.min():  # blank slices (outside the scan) stay empty
                    mask[..., k] = from_axial(segment_array(session_or_model, chw, meta, threshold)[0])
            out = out_dir / f"{stem}_mask.nii.gz"
            _write_nifti(mask, img.affine, out, img.header)
            zooms = img.header.get_zooms()[:3]
            return {"file": str(path), "output": str(out), "pixels": int(mask.sum()), "mm2": None,
                    "ml": float(mask.sum() * np.prod(zooms) / 1000.0)}
    image = read_image_2d(path)
    mask, area = segment_array(session_or_model, image, meta, threshold)
    if fmt == "nifti":
        out = out_dir / f"{stem}_mask.nii.gz"
        _write_nifti(from_axial(mask)[..., None], np.eye(4), out)  # same orientation rule as NIfTI inputs
    else:
        out = out_dir / f"{stem}_mask.png"
        _write_png(mask, out)
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
    files = sorted(p for p in input_dir.rglob("*") if p.is_file() and _suffix(p) in IMAGE_SUFFIXES)
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


# ----------------------------------------------------------------------------- ONNX


class ProbabilityMean(nn.Module):
    """Mean sigmoid probability of one or more (fold) segmentation models: what the ONNX graph computes."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([m(x).float().sigmoid() for m in self.members]).mean(0)


def export_onnx(checkpoint: str | Path | Sequence[str | Path], out_dir: str | Path, sample: str | Path | None = None,
                tol: float = 1e-4, n_parity: int = 4) -> dict:
    """Export a segmentation checkpoint (or fold checkpoints, averaged in the graph) to ``out_dir``.

    Writes ``model.onnx`` (input ``input`` (N, C, S, S) preprocessed, output ``probabilities`` (N, 1, S, S),
    dynamic batch; the recipe is also stored in the file's metadata so ``load_segmenter`` needs nothing
    else), ``metadata.json`` (recipe, threshold, input/output, parity), ``labels.json`` and, when given,
    ``sample.<ext>`` (a real image, also used in the parity check). Parity = max |ONNX Runtime - torch|
    probability on the sample plus random inputs; above ``tol`` raises ``RuntimeError``. Returns the metadata.
    """
    import shutil

    import onnx

    from lib import export

    paths = [Path(checkpoint)] if isinstance(checkpoint, (str, Path)) else [Path(p) for p in checkpoint]
    loaded = [load_segmenter(p) for p in paths]
    models, meta = [m for m, _ in loaded], loaded[0][1]
    for p, (_, m) in zip(paths[1:], loaded[1:], strict=True):
        if (m["preprocessing"], m["in_chans"], m["model_name"]) != (meta["preprocessing"], meta["in_chans"],
                                                                     meta["model_name"]):
            raise DataError(p, f"checkpoint recipe differs from {paths[0]}: cannot average them")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size, chans = int(meta["preprocessing"]["size"]), int(meta["in_chans"])
    net = ProbabilityMean(models).eval()
    onnx_path = export.export_onnx(net, out_dir / "model.onnx", (chans, size, size))
    recipe = {"format": "mednb-onnx-1", "task": "segmentation", "model_name": meta["model_name"],
              "model_kwargs": meta.get("model_kwargs", {}), "in_chans": chans, "n_models": len(models),
              "label_names": meta.get("label_names", []), "preprocessing": meta["preprocessing"],
              "threshold": float(meta.get("threshold", 0.5)),
              "input": {"name": "input", "shape": [None, chans, size, size], "dtype": "float32"},
              "output": {"name": "probabilities", "shape": [None, 1, size, size],
                         "meaning": "foreground probability (mean sigmoid over fold models) on the network grid; "
                                    "segment_array maps it back to the image and thresholds it"}}
    graph = onnx.load(str(onnx_path))
    onnx.helper.set_model_props(graph, {ONNX_META_KEY: json.dumps(recipe, default=str)})
    onnx.save(graph, str(onnx_path))
    rng = np.random.default_rng(0)
    x = rng.random((n_parity, chans, size, size), dtype=np.float32)
    sample_info = None
    if sample is not None:
        sample = Path(sample)
        target = out_dir / f"sample{_suffix(sample)}"
        shutil.copyfile(sample, target)
        img = _as_chw(read_chw(target), chans)
        x = np.concatenate([preprocess_image(img, Preprocess.from_dict(meta["preprocessing"]))[0][None], x])
        sample_info = {"file": target.name}
    diff = export.parity(net, onnx_path, x)
    metadata = {**recipe, "checkpoints": [str(p) for p in paths], "metrics": meta.get("metrics", {}),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "sample": sample_info,
                "parity": {"max_abs_diff": diff, "tolerance": tol, "n_inputs": int(len(x))},
                "onnx": {"file": onnx_path.name, "bytes": onnx_path.stat().st_size}}
    (out_dir / "metadata.json").write_text(json.dumps(metadata, indent=1, default=str) + "\n")
    (out_dir / "labels.json").write_text(json.dumps({"0": (meta.get("label_names") or ["foreground"])[0]}) + "\n")
    if not diff <= tol:
        raise RuntimeError(f"ONNX Runtime vs torch max |diff| {diff:.3g} > {tol} ({onnx_path})")
    return metadata


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lib.segment", description="2D segmentation inference and export.")
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
    e.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args(argv)
    if args.cmd == "predict":
        table, skipped = predict_folder(args.model, args.input, args.out, args.format, args.threshold)
        print(f"wrote {len(table)} masks to {args.out}; skipped {len(skipped)}")
        for row in skipped.rows:
            print(f"skipped {row['case']}: {row['reason']}")
        return 0
    try:
        meta = export_onnx(args.model, args.out, args.sample, args.tolerance)
    except RuntimeError as exc:
        print(exc)
        return 1
    print(f"wrote {args.out / 'model.onnx'}; max |torch - onnxruntime| = {meta['parity']['max_abs_diff']:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
