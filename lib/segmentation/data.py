"""Segmentation data: image/mask readers, axial slices by the affine, and the data set loaders (no torch).

A loader returns a ``RawSet``: images as read (``(C, H, W)`` float32, sizes may differ), binary masks
``(H, W)`` uint8 and one table row per image with ``case_id`` and ``group`` (the patient). Keeping the raw set
lets the notebook prepare it again (another denoising filter) without reading files again.

Volumes are cut into axial slices by ``lib.imageio.nifti_to_slices``: reoriented by the affine to the DICOM
display orientation (LPS: anterior up, patient's right on the image's left), whatever the voxel order on disk;
``slices_to_volume`` is its inverse, so a mask predicted on the slices lands on the source's own voxel grid.

Mask files must hold 0/1 (or 0/255, the usual 8-bit encoding of a binary mask); anything else, such as a
multi-label map, is refused with a message naming the file, unless ``label=`` picks one structure.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lib import config
from lib.io import DataError, SkippedCases

INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz")
MS_MODALITIES = ("FLAIR", "T1", "T2")
MS_ROOT = ("ms-lesion-mri", "cross_sectional", "MNI")


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


# ----------------------------------------------------------------------------- reading and checks


def file_suffix(path: Path) -> str:
    """Lower-case suffix, ``.nii.gz`` as one."""
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


def volume_slices(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel array ``(X, Y, Z)`` -> axial slices ``(S, H, W)`` reoriented by the affine (``nifti_to_slices``)."""
    from lib.imageio import nifti_to_slices

    return nifti_to_slices(np.asarray(volume), affine)


def slices_to_volume(slices: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of ``volume_slices``: axial slices ``(S, H, W)`` back in the voxel order of the file ``affine``
    belongs to (dtype kept)."""
    import nibabel as nib

    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("LPS"), nib.io_orientation(affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(np.asarray(slices).transpose(2, 1, 0), ornt))


def read_chw(path: str | Path) -> np.ndarray:
    """One 2D image ``(C, H, W)`` from any input file, including a one-slice NIfTI with channels on the 4th axis
    (the layout ``write_demo_inputs`` and the folder CLI use for multi-channel MRI)."""
    path = Path(path)
    if file_suffix(path) not in (".nii", ".nii.gz"):
        return read_image_2d(path)
    from lib.io import load_nifti

    img = load_nifti(path)
    vol = np.asarray(img.dataobj, dtype=np.float32)
    vol = np.moveaxis(vol, 3, 0) if vol.ndim == 4 else vol[None]
    slices = np.stack([volume_slices(c, img.affine) for c in vol])  # (C, S, H, W)
    if slices.shape[1] != 1:
        raise DataError(path, f"a volume of {slices.shape[1]} slices: segment it with segment_file / the folder CLI")
    return slices[:, 0]


def read_mask_2d(path: str | Path, label: int | None = None) -> np.ndarray:
    """A 2D mask file (PNG/TIFF/NIfTI) -> uint8 0/1 ``(H, W)``, refusing non-binary content clearly."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "mask not found")
    try:
        if file_suffix(path) in (".nii", ".nii.gz"):
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


def _evenly(ks: np.ndarray, n: int | None) -> np.ndarray:
    """At most ``n`` evenly spaced entries of ``ks`` (all when ``n`` is falsy)."""
    return ks[np.linspace(0, len(ks) - 1, n).round().astype(int)] if n and len(ks) > n else ks


def _raw_set(images: list, masks: list, rows: list, channels: list[str], skipped: SkippedCases, where: Path,
            what: str, window: tuple[float, float] | None = None) -> RawSet:
    if not images:
        raise DataError(where, f"no usable {what} ({len(skipped)} skipped)")
    table = pd.DataFrame(rows)
    table["has_lesion"] = (table.lesion_area_px > 0).astype(int)
    return RawSet(images, masks, table, channels, window=window, skipped=skipped)


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
    channels = ["gray"] if images[0].shape[0] == 1 else [f"c{k}" for k in range(images[0].shape[0])]
    return RawSet(images, masks, out, channels, skipped=skipped)


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
                vols.append(volume_slices(np.asarray(img.dataobj, dtype=np.float32), img.affine))
            mask = volume_slices(binarise_mask(np.asarray(mask_img.dataobj), mpath), mask_img.affine).astype(np.uint8)
        except DataError as exc:
            skipped.add(d.name, exc, "segment")
            continue
        brain = (vols[0] > 0).reshape(len(vols[0]), -1).mean(1)
        for k in _evenly(np.flatnonzero(brain >= min_brain_fraction)[::slice_step], max_slices_per_patient):
            images.append(np.stack([v[k] for v in vols]))
            masks.append(mask[k])
            rows.append({"case_id": f"{d.name}_z{int(k):03d}", "group": d.name, "patient_id": d.name,
                         "slice": int(k), "lesion_area_px": int(masks[-1].sum()), "spacing_mm": 1.0})
    return _raw_set(images, masks, rows, list(modalities), skipped, root, "MS-lesion patients")


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
        hu = volume_slices(np.asarray(ct.dataobj, dtype=np.float32), ct.affine)
        organ = volume_slices((np.asarray(seg.dataobj) == class_map[structure]).astype(np.uint8), seg.affine)
        organ = organ.astype(np.uint8)
        body = (hu > -500).reshape(len(hu), -1).mean(1)
        spacing = float(ct.header.get_zooms()[0])
        for k in _evenly(np.flatnonzero(body >= min_body_fraction), max_slices_per_study):
            images.append(hu[k][None])
            masks.append(organ[k])
            rows.append({"case_id": f"{st.study_id}_z{int(k):03d}", "group": st.patient_id,
                         "patient_id": st.patient_id, "study_id": st.study_id, "slice": int(k),
                         "lesion_area_px": int(masks[-1].sum()), "spacing_mm": spacing})
    return _raw_set(images, masks, rows, ["ct"], skipped, cohort, "CT studies", window=tuple(window))


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
        spacing = float(str(r.spacing).split("x")[-1])
        for k in _evenly(np.arange(len(img)), max_slices_per_study):
            images.append(img[k][None])
            masks.append(m[k])
            rows.append({"case_id": f"{r.case_id}_{structure}_s{int(k):02d}", "group": str(r.patient_id),
                         "patient_id": str(r.patient_id), "study_id": str(r.case_id), "slice": int(k),
                         "lesion_area_px": int(m[k].sum()), "spacing_mm": spacing})
    return _raw_set(images, masks, rows, ["ct"], skipped, crops_dir, "crops")


def load_dataset(name: str = "trus", profile: str = "smoke", seed: int = config.DEFAULT_SEED,
                 run_dir: str | Path | None = None, **kw: Any) -> RawSet:
    """A segmentation set by its ``lib.datasets`` name or alias (stage ``06_segment``; an unknown name is that
    registry's error with the closest names); synthetic sets are generated (cached) for ``profile`` and ``seed``.

    ``ct-organs`` reads notebook 02's crops in ``run_dir/crops`` (made by ``lib.crop.ensure_crops`` when
    missing); ``source='cohort'`` takes whole axial slices from the cohort NIfTIs instead. Extra keywords go
    to the loader (``max_slices_per_patient``/``patients`` for ``ms-lesion``, ``structure``/``target`` for
    ``ct-organs``, ``target`` for ``trus``).
    """
    from lib import datasets

    info = datasets.get(name, "06_segment")
    if info.name == "trus":
        return load_trus(info.locate(profile, seed), **kw)
    if info.name == "ms-lesion":
        return load_ms_lesion(kw.pop("root", None) or info.locate(profile, seed), **kw)
    if info.name == "ct-organs":
        if kw.pop("source", "crops") == "cohort":
            return load_ct_organs(info.locate(profile, seed), **kw)
        run = config.resolve_run_dir(run_dir, profile)
        if not (run / "crops" / "index.csv").exists():
            from lib.crop import ensure_crops

            ensure_crops(run, profile, seed)
        return load_ct_crops(run / "crops", **kw)
    raise ValueError(f"data set {info.name!r} is registered for 06_segment but has no loader in "
                     "lib.segmentation.data")


def write_demo_inputs(raw: RawSet, folder: str | Path, n: int = 3, corrupt: bool = True) -> list[Path]:
    """A small inference folder from a raw set: 1-channel images as 8-bit PNG, multi-channel as a one-slice NIfTI
    (channels on the 4th axis, identity affine), plus a corrupt file that batch inference must skip and list."""
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
            vol = np.stack([slices_to_volume(c[None], np.eye(4)) for c in img], -1)  # (X, Y, 1, C)
            paths.append(folder / f"{case}.nii.gz")
            nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), str(paths[-1]))
    if corrupt:
        paths.append(folder / "corrupt.png")
        paths[-1].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    return paths
