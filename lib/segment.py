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
"""

from __future__ import annotations

import json
import time
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


def load_dataset(name: str = "trus", profile: str = "smoke", seed: int = config.DEFAULT_SEED,
                 **kw: Any) -> RawSet:
    """One of ``DATASETS`` by name; synthetic sets are generated (cached) for ``profile`` and ``seed``.

    Extra keywords go to the loader (e.g. ``max_slices_per_patient`` for ``ms-lesion``, ``structure``
    for ``ct-organs``, ``target`` for ``trus``).
    """
    if name == "trus":
        from lib.synth_trus import ensure_trus

        return load_trus(ensure_trus(profile, seed), **kw)
    if name == "ms-lesion":
        return load_ms_lesion(**kw)
    if name == "ct-organs":
        from lib.synth import ensure_cohort

        return load_ct_organs(ensure_cohort(profile, seed), **kw)
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
    """Binary segmentation loss on logits: MONAI ``DiceCELoss`` (Dice + BCE), smp Dice + soft BCE, Dice + focal."""
    if name == "dicece":
        from monai.losses import DiceCELoss

        loss = DiceCELoss(sigmoid=True)
    elif name == "dice+bce":
        import segmentation_models_pytorch as smp

        dice, bce = smp.losses.DiceLoss("binary", from_logits=True), smp.losses.SoftBCEWithLogitsLoss()
        loss = lambda logits, y: dice(logits, y) + bce(logits, y)
    elif name == "dicefocal":
        from monai.losses import DiceFocalLoss

        loss = DiceFocalLoss(sigmoid=True)
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
    """(image, mask) pairs from a ``SegData`` with joint MONAI augmentation (re-seeded every epoch by ``fit``)."""

    def __init__(self, data: SegData, augment: str | None = "light", seed: int = 0) -> None:
        self.x, self.y = data.x, data.y
        self.transform = make_seg_augment(augment, seed)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if self.transform is None:
            return self.x[i], self.y[i]
        out = self.transform({"image": self.x[i], "label": self.y[i]})
        return torch.as_tensor(out["image"]).float(), (torch.as_tensor(out["label"]) > 0.5).float()

    def set_random_state(self, seed: int) -> None:
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
    patience: int = 0
    augment: str = "light"
    threshold: float = 0.5
    n_splits: int = 5
    seed: int = config.DEFAULT_SEED
    resume: bool = True
    progress: bool = False


def make_folds(table: pd.DataFrame, n_splits: int = 5, seed: int = config.DEFAULT_SEED) -> np.ndarray:
    """Fold per row by ``lib.splits.group_kfold``: a patient (``group``) never spans folds, lesion/no-lesion
    images balanced; ``n_splits >= n_groups`` gives leave-one-patient-out."""
    from lib.splits import group_kfold

    n_groups = table["group"].nunique()
    if n_groups < 2:
        raise ValueError(f"need at least 2 groups (patients) for grouped k-fold, got {n_groups}")
    return group_kfold(table.reset_index(drop=True), n_splits=min(n_splits, n_groups), group_col="group",
                       label_col="has_lesion", seed=seed, rare="merge").to_numpy()


def model_meta(cfg: SegConfig, data: SegData, target: str = "lesion") -> dict:
    """Checkpoint recipe (``lib.models.checkpoint_meta``) for a segmentation network."""
    from lib.models import checkpoint_meta

    return checkpoint_meta(cfg.model, in_chans=data.x.shape[1], num_classes=1, task="segmentation",
                           label_names=[target], preprocessing=data.preprocessing, encoder=cfg.encoder)


@torch.no_grad()
def predict_probs(model: nn.Module, x: Tensor, batch_size: int = 32) -> Tensor:
    """Sigmoid probabilities ``(N, 1, S, S)`` for prepared inputs."""
    model.eval()
    dev = next(model.parameters()).device
    return torch.cat([model(x[i:i + batch_size].to(dev)).float().sigmoid().cpu() for i in range(0, len(x), batch_size)])


def train_fold(data: SegData, train_idx: np.ndarray, val_idx: np.ndarray, cfg: SegConfig, out_dir: str | Path,
               target: str = "lesion") -> tuple[nn.Module, pd.DataFrame]:
    """One fold through the shared loop ``lib.train.fit`` (Adam + ReduceLROnPlateau on validation Dice)."""
    from lib.train import TrainConfig, fit

    config.seed_everything(cfg.seed)
    model = build_model(cfg.model, data.x.shape[1], 1, cfg.encoder)
    g = torch.Generator().manual_seed(cfg.seed)
    train_ds = SegDataset(data.subset(train_idx), cfg.augment, cfg.seed)
    val_ds = SegDataset(data.subset(val_idx), None)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=g, drop_last=False)
    val_loader = DataLoader(val_ds, batch_size=max(cfg.batch_size, 32), shuffle=False)
    tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, optimizer="adam",
                       scheduler="plateau", patience=cfg.patience, monitor="dice", mode="max", seed=cfg.seed,
                       device="cpu" if not torch.cuda.is_available() else "auto", resume=cfg.resume,
                       progress=cfg.progress)
    log = fit(model, train_loader, val_loader, make_seg_loss(cfg.loss), seg_metrics(cfg.threshold), tcfg, out_dir,
              model_meta(cfg, data, target))
    return model, log


@dataclass
class KFoldResult:
    """Out-of-fold per-image scores, validation probabilities, and training logs of a grouped k-fold run."""

    per_case: pd.DataFrame  # case_id, group, fold, dice, iou, true_px, pred_px, has_lesion
    probs: np.ndarray  # (N, S, S) out-of-fold probabilities (NaN where a case was not validated)
    logs: dict[int, pd.DataFrame]
    out_dir: Path


def run_kfold(data: SegData, cfg: SegConfig, out_dir: str | Path, folds: Sequence[int] | None = None,
              target: str = "lesion") -> KFoldResult:
    """Grouped k-fold training; writes ``fold<k>/{best,last}.pt, log.csv``, ``oof.csv`` and ``metrics.json``.

    ``folds`` restricts which folds are trained (e.g. ``[0]`` for a quick ablation); the others keep NaN.
    """
    out_dir = Path(out_dir)
    fold_of = make_folds(data.table, cfg.n_splits, cfg.seed)
    todo = sorted(set(fold_of.tolist())) if folds is None else list(folds)
    probs = np.full((len(data), data.x.shape[-2], data.x.shape[-1]), np.nan, np.float32)
    rows, logs = [], {}
    for k in todo:
        tr, va = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        model, logs[k] = train_fold(data, tr, va, cfg, out_dir / f"fold{k}", target)
        p = predict_probs(model, data.x[va])
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
                     folds: Sequence[int] = (0,), target: str = "lesion") -> pd.DataFrame:
    """Same data, model and folds with each diffusion filter: per-image Dice/IoU plus preprocessing time."""
    frames = []
    for f in filters:
        t0 = time.perf_counter()
        data = prepare(raw, replace(pre, denoise=f))
        prep_s = time.perf_counter() - t0
        res = run_kfold(data, cfg, Path(out_dir) / f"denoise-{f}", folds, target)
        frames.append(res.per_case.assign(denoise=f, preprocess_s=prep_s))
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


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A trained segmentation checkpoint -> ``(model.eval(), meta)`` (meta holds the preprocessing)."""
    from lib.models import load_checkpoint

    model, meta = load_checkpoint(path, device, builder=build_model)
    if meta.get("task") != "segmentation":
        raise DataError(path, f"not a segmentation checkpoint (task {meta.get('task')!r})")
    return model, meta


def _as_chw(image: np.ndarray, in_chans: int) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) -> (in_chans, H, W): RGB is averaged for 1-channel models."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] not in (1, 3, 4):
        a = a[..., :3].transpose(2, 0, 1)
    if a.ndim != 3:
        raise ValueError(f"expected a 2D image (H, W[, C]), got shape {image.shape}")
    if a.shape[0] != in_chans:
        if in_chans == 1:
            a = a.mean(0, keepdims=True)
        else:
            raise ValueError(f"model expects {in_chans} channels, image has {a.shape[0]}")
    return a


def segment_probability(image: np.ndarray, model: nn.Module, meta: dict) -> np.ndarray:
    """Lesion probability on the image's own grid (preprocessing from the checkpoint, then undone)."""
    pre = Preprocess.from_dict(meta["preprocessing"])
    a = _as_chw(image, int(meta["in_chans"]))
    if not np.isfinite(a).all():
        raise ValueError("image has NaN/inf pixels")
    x, geom = preprocess_image(a, pre)
    prob = predict_probs(model, torch.as_tensor(x)[None])[0, 0].numpy()
    return restore_probability(prob, geom)


def segment_array(image: np.ndarray, model: nn.Module, meta: dict, threshold: float = 0.5) -> np.ndarray:
    """Binary mask (uint8 0/1, same height/width as ``image``) for one 2D image: what ``POST /segment`` calls."""
    return (segment_probability(image, model, meta) > threshold).astype(np.uint8)


def mask_area(mask: np.ndarray, spacing_mm: float | Sequence[float] | None = None) -> dict[str, float | None]:
    """Mask area in pixels and, with a pixel spacing, in mm^2."""
    px = int(np.asarray(mask).astype(bool).sum())
    if spacing_mm is None:
        return {"pixels": px, "mm2": None}
    sy, sx = (spacing_mm, spacing_mm) if np.isscalar(spacing_mm) else tuple(spacing_mm)[:2]
    return {"pixels": px, "mm2": float(px * sy * sx)}


def _write_png(mask: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask > 0).astype(np.uint8) * 255, mode="L").save(path)


def _write_nifti(mask: np.ndarray, affine: np.ndarray, path: Path, header=None) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(mask.astype(np.uint8), affine, header)
    img.set_data_dtype(np.uint8)
    nib.save(img, str(path))


def segment_file(path: str | Path, model: nn.Module, meta: dict, out_dir: str | Path, fmt: str = "auto",
                 threshold: float = 0.5) -> dict:
    """Segment one file and write its mask: NIfTI in -> NIfTI out with the source affine (slice by slice along
    the last axis); 2D images -> PNG (0/255) or, with ``fmt='nifti'``, NIfTI with an identity affine."""
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
                if chw.max() > chw.min():
                    mask[..., k] = from_axial(segment_array(chw, model, meta, threshold))
            out = out_dir / f"{stem}_mask.nii.gz"
            _write_nifti(mask, img.affine, out)
            zooms = img.header.get_zooms()[:3]
            return {"file": str(path), "output": str(out), **mask_area(mask), "mm2": None,
                    "ml": float(mask.sum() * np.prod(zooms) / 1000.0)}
    image = read_image_2d(path)
    mask = segment_array(image, model, meta, threshold)
    if fmt == "nifti":
        out = out_dir / f"{stem}_mask.nii.gz"
        _write_nifti(mask[..., None], np.eye(4), out)
    else:
        out = out_dir / f"{stem}_mask.png"
        _write_png(mask, out)
    return {"file": str(path), "output": str(out), **mask_area(mask), "ml": None}


def predict_folder(model_path: str | Path, input_dir: str | Path, out_dir: str | Path, fmt: str = "auto",
                   threshold: float = 0.5) -> tuple[pd.DataFrame, SkippedCases]:
    """Segment every image in a folder; bad files are skipped and listed (``skipped_segment.csv``)."""
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if not input_dir.is_dir():
        raise DataError(input_dir, "input folder not found")
    model, meta = load_segmenter(model_path)
    files = sorted(p for p in input_dir.rglob("*") if p.is_file() and _suffix(p) in IMAGE_SUFFIXES)
    rows, skipped = [], SkippedCases()
    for p in files:
        try:
            rows.append(segment_file(p, model, meta, out_dir, fmt, threshold))
        except (DataError, ValueError) as exc:
            skipped.add(p.name, exc if isinstance(exc, DataError) else DataError(p, str(exc)), "segment")
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=["file", "output", "pixels", "mm2", "ml"])
    table.to_csv(out_dir / "predictions.csv", index=False)
    skipped.save(out_dir / "skipped_segment.csv")
    return table, skipped


# ----------------------------------------------------------------------------- ONNX


def export_onnx(model: nn.Module, meta: dict, path: str | Path, opset: int = 17) -> Path:
    """ONNX graph (TorchScript exporter, ``dynamo=False``) with a dynamic batch axis, plus ``<path>.json`` meta."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = int(meta["preprocessing"]["size"])
    dummy = torch.zeros(1, int(meta["in_chans"]), size, size)
    model = model.cpu().eval()
    torch.onnx.export(model, (dummy,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                      dynamo=False)
    keep = {k: meta[k] for k in ("model_name", "in_chans", "num_classes", "task", "label_names", "preprocessing",
                                 "model_kwargs") if k in meta}
    path.with_suffix(".json").write_text(json.dumps(keep, indent=1, default=str))
    return path


def onnx_parity(model: nn.Module, onnx_path: str | Path, x: Tensor) -> float:
    """Largest absolute difference between torch and ONNX Runtime logits on ``x`` (should be ~1e-5)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model.cpu().eval()(x).numpy()
    out = sess.run(None, {"image": x.numpy().astype(np.float32)})[0]
    return float(np.abs(out - ref).max())


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lib.segment", description="2D segmentation inference and export.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("predict", help="segment every image (PNG/JPG/DICOM/NIfTI) in a folder")
    p.add_argument("--model", required=True, type=Path, help="checkpoint (best.pt)")
    p.add_argument("--input", required=True, type=Path, help="folder of images")
    p.add_argument("--out", required=True, type=Path, help="folder for masks")
    p.add_argument("--format", default="auto", choices=("auto", "png", "nifti"),
                   help="auto: NIfTI for NIfTI inputs, PNG otherwise")
    p.add_argument("--threshold", type=float, default=0.5)
    e = sub.add_parser("export", help="export a checkpoint to ONNX and check parity with torch")
    e.add_argument("--model", required=True, type=Path)
    e.add_argument("--out", required=True, type=Path, help="model.onnx path")
    e.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args(argv)
    if args.cmd == "predict":
        table, skipped = predict_folder(args.model, args.input, args.out, args.format, args.threshold)
        print(f"wrote {len(table)} masks to {args.out}")
        for row in skipped.rows:
            print(f"skipped {row['file']}: {row['reason']}")
        return 0
    model, meta = load_segmenter(args.model)
    path = export_onnx(model, meta, args.out)
    size = int(meta["preprocessing"]["size"])
    diff = onnx_parity(model, path, torch.rand(2, int(meta["in_chans"]), size, size,
                                               generator=torch.Generator().manual_seed(0)))
    print(f"wrote {path}; max |torch - onnxruntime| = {diff:.2e}")
    return 0 if diff <= args.tolerance else 1


if __name__ == "__main__":
    raise SystemExit(main())
