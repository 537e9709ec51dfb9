"""Organ crops from CT + segmentation masks (notebook 02): small, correct, cached training samples.

Why: whole CTs (512×512×300) are too big to train on, and a model should look at one organ at a time.
Each case × structure becomes a crop around the organ's mask, with a margin in millimetres, in one of
three modes (as in the original research code):

* ``bbox``: bounding box of the mask plus margin;
* ``seg``:  the same box with voxels outside the (dilated) mask set to a background value;
* ``25d``:  for each selected axial slice, a stack of ``k`` neighbouring slices as channels
  (neighbours are clamped at the volume edges, i.e. the edge slice is repeated).

Geometry follows TotalSegmentator's ``cropping.py``: small functions on voxel boxes, and every crop
carries the affine that maps *its* voxel indices to the same world (mm) coordinates as the source, so
a crop written as NIfTI overlays the original in a viewer. Everything is expressed as an output
*grid* (origin + step in source voxels): plain cropping, resampling to a target spacing and the fixed
training size are the same operation, so the affine is exact by construction.

Outputs (``docs/ARCHITECTURE.md``, "Crop index"), under ``<run_dir>/crops/``:

* training samples ``<name>/<structure>/<case_id>.npz``: ``image`` float32 (S, H, W) in [0, 1]
  (HU window applied), ``mask`` uint8, ``lesion`` uint8 (when lesion masks exist), ``spacing`` (3,)
  in the order (S, H, W), ``affine`` (4, 4), and in ``25d`` mode ``stack`` float32 (S, k, H, W) (the k
  neighbouring source slices of each slice; ``image`` is its centre channel).
  Array axes: ``image[s, h, w]`` is the voxel ``(i, j, k) = (w, h, s)`` of an LPS-oriented volume
  (columns run to the patient's left, rows to posterior, slices upwards), so ``imshow(image[s])``
  shows the usual radiological view, and ``affine @ [w, h, s, 1]`` is its world position (RAS mm).
* 3D crops ``<name>/<structure>/<case_id>.nii.gz`` (+ ``_mask``, ``_lesion``), HU kept, LPS order.
* ``index.csv``: ``case_id, patient_id, structure, organ, mode, path, shape, spacing, voxels, bbox,
  lesion_voxels`` (``path`` relative to ``crops/``; ``bbox`` in the source file's voxel indices,
  half-open, margin included; ``voxels``/``lesion_voxels`` counted in the source).

Inputs come from :func:`discover_cases`, which turns the usual folder layouts into one case table, so
the crop core never knows where a mask came from.
"""

from __future__ import annotations

import difflib
import gzip
import itertools
import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from lib import cluster, config
from lib.cache import fingerprint
from lib.imageio import WINDOWS, apply_window, resolve_window  # one windowing for crops, training, serving
from lib.io import DataError, SkippedCases, check_same_grid, load_nifti, read_json, write_json

if TYPE_CHECKING:
    import matplotlib.pyplot as plt

MODES = ("bbox", "seg", "25d")
FORMATS = ("npz", "nifti")
INDEX_COLUMNS = ["case_id", "patient_id", "structure", "organ", "mode", "path", "shape", "spacing",
                 "voxels", "bbox", "lesion_voxels"]
CASE_COLUMNS = ["case_id", "patient_id", "image", "mask", "mask_kind", "class_map", "lesion"]
DEFAULT_STRUCTURES = ["liver", "spleen", "pancreas", "kidney_left", "kidney_right", "gallbladder"]
#: Modules whose source is part of every crop's cache key: editing them recomputes the crops.
CROP_CODE = ("lib.crop", "lib.imageio", "lib.io")
AIR_HU = -1024.0
LPS = ("L", "P", "S")


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class CropParams:
    """How to crop. Defaults make the training samples (fixed 16×64×64, abdomen window)."""

    mode: str = "bbox"  # bbox | seg | 25d
    margin_mm: float | tuple[float, float, float] = 10.0  # added on every side of the mask's box
    size: tuple[int, int, int] | None = (16, 64, 64)  # (S, H, W); None keeps the native grid
    fit: str = "resize"  # resize: scale the box (square in-plane) into size; pad: native spacing, centred
    spacing: tuple[float, float, float] | None = None  # target spacing (x, y, z) mm, for size=None or fit=pad
    window: str | tuple[float, float] = "abdomen"  # preset name or (level, width)
    fmt: str = "npz"  # npz training samples | nifti 3D crops (HU)
    k: int = 3  # 25d: slices per stack (odd)
    background_hu: float = -1000.0  # seg: value outside the dilated mask
    dilate_mm: float = 5.0  # seg: mask dilation before blanking
    lesion_in_organ: bool = True  # keep only lesion voxels inside this organ's mask

    def validate(self) -> CropParams:
        if self.mode not in MODES:
            raise ValueError(f"unknown crop mode {self.mode!r}; choose from {MODES}")
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown output format {self.fmt!r}; choose from {FORMATS}")
        if self.fit not in ("resize", "pad"):
            raise ValueError(f"fit must be 'resize' or 'pad', got {self.fit!r}")
        if self.mode == "25d" and (self.k < 1 or self.k % 2 == 0):
            raise ValueError(f"25d needs an odd k >= 1, got {self.k}")
        if self.mode == "25d" and self.fmt != "npz":
            raise ValueError("25d stacks are training samples: use fmt='npz'")
        window_of(self.window)
        return self

    def as_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def window_of(window: str | Sequence[float]) -> tuple[float, float]:
    """(level, width) of a preset name (``lib.imageio.WINDOWS``) or an explicit pair; samples need one."""
    lw = resolve_window(window)
    if lw is None:
        raise ValueError(f"crops need a HU window to scale to [0, 1]; presets: {sorted(WINDOWS)} or (level, width)")
    return float(lw[0]), float(lw[1])


# ----------------------------------------------------------------------------- geometry (pure)


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths in mm from the affine's columns (not the header pixdim)."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def bbox_of(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Half-open voxel box (lo, hi) of the non-zero voxels, or None for an empty mask."""
    sl = ndimage.find_objects(np.asarray(mask, bool).astype(np.uint8))
    if not sl or sl[0] is None:
        return None
    return np.array([s.start for s in sl[0]]), np.array([s.stop for s in sl[0]])


def label_bboxes(labels: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Boxes of every label of a multilabel mask in one pass (find_objects), keyed by label value."""
    lab = np.asarray(labels)
    if not np.issubdtype(lab.dtype, np.integer):
        lab = np.rint(lab).astype(np.int32)
    if lab.min() < 0:
        lab = np.where(lab < 0, 0, lab)
    boxes = {}
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is not None:
            boxes[i] = (np.array([s.start for s in sl]), np.array([s.stop for s in sl]))
    return boxes


def margin_voxels(margin_mm: float | Sequence[float], spacing: Sequence[float]) -> np.ndarray:
    """Margin per axis in voxels, rounded up so the margin is at least ``margin_mm``."""
    m = np.broadcast_to(np.asarray(margin_mm, float), (3,))
    return np.ceil(m / np.asarray(spacing, float) - 1e-6).astype(int)


def add_margin(lo: np.ndarray, hi: np.ndarray, margin_vox: np.ndarray, shape: Sequence[int]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Grow a box by a margin, clipped to the volume."""
    return np.maximum(lo - margin_vox, 0), np.minimum(hi + margin_vox, np.asarray(shape[:3]))


def crop_affine(affine: np.ndarray, lo: Sequence[float], step: Sequence[float] = (1, 1, 1)) -> np.ndarray:
    """Affine of a grid whose voxel u sits at source voxel ``lo + step * u`` (same world positions)."""
    m = np.eye(4)
    m[:3, :3] = np.diag(np.asarray(step, float))
    m[:3, 3] = np.asarray(lo, float)
    return np.asarray(affine, float) @ m


def lps_ornt(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform from the image's voxel order to LPS."""
    return nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt(LPS))


def lps_affine(affine: np.ndarray, ornt: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Affine of the array after ``apply_orientation(arr, ornt)``: same world, LPS voxel order."""
    return np.asarray(affine, float) @ nib.orientations.inv_ornt_aff(ornt, shape[:3])


def box_to_lps(lo: np.ndarray, hi: np.ndarray, ornt: np.ndarray, shape: Sequence[int]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Carry a half-open box from the source voxel order to the reoriented one."""
    new_lo, new_hi = np.zeros(3, int), np.zeros(3, int)
    for ax, (dest, flip) in enumerate(ornt.astype(int)):
        a, b = int(lo[ax]), int(hi[ax])
        if flip < 0:
            a, b = shape[ax] - b, shape[ax] - a
        new_lo[dest], new_hi[dest] = a, b
    return new_lo, new_hi


@dataclass(frozen=True)
class Grid:
    """Output voxels u = 0..shape-1 sit at source voxel coordinates ``origin + step * u``."""

    origin: np.ndarray
    step: np.ndarray
    shape: tuple[int, int, int]

    def is_plain_crop(self, src_shape: Sequence[int]) -> bool:
        """True when the grid is a sub-block of the source (slice it, no interpolation)."""
        o = np.asarray(self.origin, float)
        return bool((np.abs(np.asarray(self.step) - 1) < 1e-9).all() and (np.abs(o - np.round(o)) < 1e-6).all()
                    and (o > -1e-6).all() and (o + np.asarray(self.shape) <= np.asarray(src_shape[:3]) + 1e-6).all())

    def coords(self) -> list[np.ndarray]:
        return [self.origin[a] + self.step[a] * np.arange(self.shape[a]) for a in range(3)]


def grid_for_box(lo: np.ndarray, hi: np.ndarray, spacing: Sequence[float], size: Sequence[int] | None,
                 fit: str = "resize", target: Sequence[float] | None = None) -> Grid:
    """The output grid for a voxel box ``[lo, hi)`` (axes in x, y, z order).

    ``size=None``: the box itself, resampled to ``target`` spacing if given. ``fit='resize'``: S slices
    evenly covering the box in z and a square in-plane field of view (the longer side, in mm) scaled
    to H×W, so organs keep their aspect ratio. ``fit='pad'``: native (or target) spacing, centred on
    the box, cut or padded to the size.
    """
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    sp = np.asarray(spacing, float)
    n = hi - lo
    centre = (lo + hi - 1) / 2.0
    if size is None:
        step = np.ones(3) if target is None else np.asarray(target, float) / sp
        shape = np.maximum(np.round(n / step), 1).astype(int)
        origin = centre - step * (shape - 1) / 2.0 if target is not None else lo
        return Grid(origin, step, tuple(int(v) for v in shape))
    S, H, W = (int(v) for v in size)
    shape = np.array([W, H, S])
    if fit == "resize":
        side_mm = max(n[0] * sp[0], n[1] * sp[1])
        step = np.array([side_mm / W / sp[0], side_mm / H / sp[1], n[2] / S])
    else:
        step = np.ones(3) if target is None else np.asarray(target, float) / sp
    origin = centre - step * (shape - 1) / 2.0
    on_grid = np.isclose(step, 1.0)  # native spacing: stay on source voxels (no half-voxel shift)
    origin[on_grid] = np.floor(origin[on_grid] + 0.5)
    return Grid(origin, step, (W, H, S))


def _interp_axis(arr: np.ndarray, axis: int, coords: np.ndarray, order: int) -> np.ndarray:
    """Values of ``arr`` at (clamped) positions ``coords`` along one axis: nearest or linear."""
    n = arr.shape[axis]
    c = np.clip(coords, 0, n - 1)
    if order == 0 or n == 1:
        return np.take(arr, np.floor(c + 0.5).astype(int), axis=axis)
    i0 = np.minimum(np.floor(c).astype(int), n - 2)
    f = (c - i0).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(arr.ndim)])
    a0 = np.take(arr, i0, axis=axis)
    a1 = np.take(arr, i0 + 1, axis=axis)
    a1 -= a0
    a1 *= f
    a1 += a0
    return a1


def sample(volume: np.ndarray, grid: Grid, order: int, cval: float, clamp_z: bool = False,
           z_offset: float = 0.0, dtype: type = np.float32) -> np.ndarray:
    """Values of ``volume`` on ``grid`` (linear for images, nearest for labels); outside = ``cval``.

    The grid is axis-aligned in source voxels, so trilinear interpolation is three 1-D passes, and only
    the source block the grid touches is read: a 64×64×16 sample of a 512×512×300 CT costs milliseconds.
    A voxel covers ±0.5 around its centre; positions beyond the volume's outer faces get ``cval``, except
    along z with ``clamp_z``, where the edge slice is repeated (2.5D neighbours at the first/last slice).
    """
    if z_offset == 0 and grid.is_plain_crop(volume.shape):
        o = np.round(grid.origin).astype(int)
        block = volume[o[0]:o[0] + grid.shape[0], o[1]:o[1] + grid.shape[1], o[2]:o[2] + grid.shape[2]]
        return np.asarray(block, dtype=dtype)
    n = volume.shape[:3]
    axes = grid.coords()
    axes[2] = axes[2] + z_offset
    inside = [(c >= -0.5) & (c <= n[a] - 0.5) for a, c in enumerate(axes)]
    if clamp_z:
        axes[2] = np.clip(axes[2], 0, n[2] - 1)
        inside[2][:] = True
    if not all(m.any() for m in inside):  # grid entirely outside the volume
        return np.full(grid.shape, cval, dtype=dtype)
    lo = [int(np.clip(np.floor(c.min()), 0, n[a] - 1)) for a, c in enumerate(axes)]
    hi = [int(np.clip(np.floor(c.max()) + 2, lo[a] + 1, n[a])) for a, c in enumerate(axes)]
    out = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    if order > 0:
        out = np.asarray(out, dtype=np.float32)
    for a in np.argsort([len(c) / max(hi[a] - lo[a], 1) for a, c in enumerate(axes)]):  # shrink most first
        out = _interp_axis(out, int(a), axes[a] - lo[a], order)
    if not all(m.all() for m in inside):  # blank what lies beyond the volume (dtype kept: no float64 detour)
        keep = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
        out = np.where(keep, out, np.asarray(cval, dtype=out.dtype))
    return np.asarray(np.rint(out) if np.issubdtype(dtype, np.integer) and out.dtype.kind == "f" else out, dtype=dtype)


def sample_stack(volume: np.ndarray, grid: Grid, offsets: Sequence[float], cval: float) -> np.ndarray:
    """2.5D stacks ``(x, y, z, k)``: ``sample(..., clamp_z=True, z_offset=o)`` for every offset, in one go.

    Why: the in-plane passes dominate and are the same for every offset, so they run once on the slab of
    source slices all offsets touch; only the cheap z pass is repeated. Edge slices repeat (clamped z).
    """
    n = volume.shape[2]
    zc = grid.coords()[2]
    offs = np.asarray(offsets, float)
    lo = int(np.clip(np.floor(zc.min() + offs.min()), 0, n - 1))
    hi = int(np.clip(np.floor(zc.max() + offs.max()) + 2, lo + 1, n))
    plane = Grid(np.array([grid.origin[0], grid.origin[1], lo], float), np.array([grid.step[0], grid.step[1], 1.0]),
                 (grid.shape[0], grid.shape[1], hi - lo))
    slab = sample(volume, plane, 1, cval)  # (W, H, hi - lo), outside in-plane = cval
    zyx = np.ascontiguousarray(slab.transpose(2, 1, 0))  # z first: the z pass copies whole planes
    skhw = np.stack([_interp_axis(zyx, 0, np.clip(zc + o, 0, n - 1) - lo, 1) for o in offs], axis=1)
    return skhw.transpose(3, 2, 0, 1)  # (x, y, z, k) view of the (S, k, H, W) sample layout: no copy later


def stack_offsets(k: int, step: float = 1.0) -> np.ndarray:
    """Slice offsets (source voxels) of a k-slice 2.5D stack centred on the selected slice."""
    return (np.arange(k) - k // 2) * float(step)


def ball_mm(spacing: Sequence[float], mm: float) -> np.ndarray:
    """Voxel offsets within ``mm`` millimetres of the centre (an ellipsoid in voxels for anisotropic spacing)."""
    sp = np.asarray(spacing, float)
    r = np.floor(mm / sp + 1e-9).astype(int)
    grid = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((g * s) ** 2 for g, s in zip(grid, sp, strict=True)) <= mm * mm + 1e-9


def dilate_mm(mask: np.ndarray, spacing: Sequence[float], mm: float) -> np.ndarray:
    """Mask grown by ``mm`` millimetres (Euclidean, anisotropic spacing respected).

    Same voxels as ``distance_transform_edt(~mask, sampling=spacing) <= mm`` (tested), 10-20× faster: the
    ball of radius ``mm`` is convex and symmetric, so for each (dy, dz) its x-offsets are one run [-a, a]; the
    mask is dilated along x once per distinct run length and OR-ed in shifted by every (dy, dz) of the ball.
    """
    m = np.asarray(mask, bool)
    if mm <= 0 or not m.any():
        return m.copy()
    ball = ball_mm(spacing, mm)
    r = (np.asarray(ball.shape) - 1) // 2
    runs: dict[int, np.ndarray] = {}
    out = np.zeros_like(m)
    for dy, dz in zip(*np.nonzero(ball.any(axis=0)), strict=True):
        a = int(ball[:, dy, dz].sum()) // 2
        if a not in runs:
            line = m.copy()
            for d in range(1, a + 1):
                line[d:] |= m[:-d]
                line[:-d] |= m[d:]
            runs[a] = line
        oy, oz = int(dy - r[1]), int(dz - r[2])
        out[:, max(oy, 0):m.shape[1] + min(oy, 0), max(oz, 0):m.shape[2] + min(oz, 0)] |= \
            runs[a][:, max(-oy, 0):m.shape[1] - max(oy, 0), max(-oz, 0):m.shape[2] - max(oz, 0)]
    return out


def world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """World (mm) coordinates of voxel indices (N, 3)."""
    return nib.affines.apply_affine(affine, np.asarray(ijk, float))


# ----------------------------------------------------------------------------- class maps and case tables


def parse_class_map(raw: dict, task: str = "total") -> dict[int, str]:
    """{label: name} from {"1": "spleen"}, TotalSegmentator's {"total": {...}}, or an nnU-Net/MSD
    dataset.json ("labels": {"liver": 1} in v2 or {"1": "liver"} in v1).

    A ValueError names what cannot be read (not a mapping, entries that are neither label -> name nor
    name -> label, a label or name used twice, or nothing found for ``task``): a silently wrong map
    would crop the wrong organ.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object mapping labels to names, got {type(raw).__name__}")
    top = raw
    if "labels" in raw and isinstance(raw["labels"], dict):
        raw = raw["labels"]
    elif task in raw and isinstance(raw[task], dict):
        raw = raw[task]
    elif raw and all(isinstance(v, dict) for v in raw.values()):
        raise ValueError(f"no labels for task {task!r} (tasks: {', '.join(sorted(map(str, raw)))})")
    out: dict[int, str] = {}
    bad: list[str] = []

    def put(label: int, name: str) -> None:
        if label in out and out[label] != name:
            bad.append(f"label {label} named both {out[label]!r} and {name!r}")
        out[label] = name

    for k, v in raw.items():
        if str(k).lstrip("-").isdigit():
            if isinstance(v, str) and v.strip():
                put(int(k), v)
            else:
                bad.append(f"{k!r}: {v!r} (a label name must be a non-empty string)")
        elif isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            bad.append(f"{k!r}: {v!r} (a label must be an integer)")
        elif isinstance(v, int | float) or (isinstance(v, str) and v.isdigit()):
            put(int(v), str(k))
        elif isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            put(int(v[0]), str(k))  # nnU-Net v2 region labels: take the first value
        else:
            bad.append(f"{k!r}: {str(v)[:60]!r}")
    out.pop(0, None)
    names: dict[str, int] = {}
    for label, name in sorted(out.items()):
        if name in names:
            bad.append(f"name {name!r} used for labels {names[name]} and {label}")
        names[name] = label
    if bad:
        raise ValueError("unreadable class map entries: " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
    if not out and raw:
        raise ValueError(f"no label names found (top-level keys: {sorted(map(str, top))[:10]})")
    return out


def _class_map(path: Path, raw: object, task: str) -> dict[int, str]:
    try:
        return parse_class_map(raw, task)  # type: ignore[arg-type]
    except ValueError as exc:
        raise DataError(path, str(exc)) from exc


_read_json = read_json  # the reader of class-map files used by the layouts below (one JSON reader: lib.io)


def load_class_map(path: str | Path, task: str = "total") -> dict[int, str]:
    """A class-map JSON file as {label: name}: TotalSegmentator's class map, an nnU-Net v1 or v2 / MSD
    ``dataset.json``, or a plain {label: name}; the one class-map reader of EDA, cropping and segmentation.
    Any problem is a DataError naming the file."""
    path = Path(path)
    return _class_map(path, read_json(path, "class map"), task)


def _nii_files(folder: Path, pattern: str = "*.nii*") -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.name.endswith((".nii", ".nii.gz")))


def _stem(p: Path) -> str:
    return p.name.removesuffix(".gz").removesuffix(".nii")


def case_row(case_id: str, image: Path | str, mask: Path | str = "", mask_kind: str = "multilabel",
              class_map: dict | None = None, lesion: Path | str = "", patient_id: str | None = None) -> dict:
    """One case-table row (for users building their own table; ``mask_kind`` multilabel | folder)."""
    return {"case_id": case_id, "patient_id": patient_id or case_id, "image": str(image),
            "mask": str(mask) if mask else "", "mask_kind": mask_kind,
            "class_map": json.dumps({str(k): v for k, v in (class_map or {}).items()}),
            "lesion": str(lesion) if lesion else ""}


def discover_cases(root: str | Path, layout: str = "auto", image_glob: str = "*.nii*",
                   task: str = "total", skipped: SkippedCases | None = None) -> pd.DataFrame:
    """One case table for the usual layouts (columns ``CASE_COLUMNS``).

    Layouts: ``synthetic`` (``studies.csv`` + ``class_map.json``, as ``lib.synth`` writes),
    ``nnunet`` (``imagesTr/CASE_0000.nii.gz`` or MSD ``imagesTr/CASE.nii.gz`` + ``labelsTr/CASE.nii.gz``
    + ``dataset.json``), ``totalseg-dataset`` (``<case>/ct.nii.gz`` + ``<case>/segmentations/<structure>.nii.gz``,
    TotalSegmentator's default one-file-per-structure output) and ``pairs`` (a folder of CTs and
    multilabel masks, matched by voxel grid, with a class-map JSON, e.g. ``TotalSegmentator --ml``).
    A case whose mask is missing stays in the table so the crop step reports it.

    Broken files (empty, not NIfTI, unreadable header) and cases whose mask cannot be told apart
    (two masks with the image's grid, or a "mask" holding image values) are left out and recorded
    (stage "discover") in ``skipped`` when given and in ``result.attrs["skipped"]`` (plain records,
    which :func:`crop_cohort` adds to its skip table), so one bad file never loses the whole table.
    A class map that cannot be read is a DataError naming the file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "not a folder")
    if layout == "auto":
        layout = ("synthetic" if (root / "studies.csv").exists() else
                  "nnunet" if (root / "imagesTr").is_dir() else
                  "totalseg-dataset" if any((d / "segmentations").is_dir() for d in root.iterdir() if d.is_dir())
                  else "pairs")
    finder = {"synthetic": _discover_synthetic, "nnunet": _discover_nnunet,
              "totalseg-dataset": _discover_totalseg_dataset, "pairs": _discover_pairs}
    if layout not in finder:
        raise ValueError(f"unknown layout {layout!r}; choose from {sorted(finder)} or 'auto'")
    found = SkippedCases()
    rows = finder[layout](root, image_glob=image_glob, task=task, skipped=found)
    if skipped is not None:
        skipped.extend(found)
    cases = pd.DataFrame(rows, columns=CASE_COLUMNS)
    cases.attrs["skipped"] = list(found.rows)  # plain data: pandas compares attrs on concat/merge
    return cases


def discover_dirs(imagedir: str | Path, maskdir: str | Path, image_glob: str = "*.nii*", task: str = "total",
                  skipped: SkippedCases | None = None) -> pd.DataFrame:
    """Case table for images in one folder and their masks in another, matched by name.

    ``maskdir/<case>.nii.gz`` is a multilabel map (label names from a class-map JSON in ``maskdir``, e.g.
    ``TotalSegmentator --ml`` output) and ``maskdir/<case>/`` a folder of per-structure masks (TotalSegmentator's
    default output); ``<case>_0000`` images (nnU-Net channel suffix) match ``<case>`` masks. An image may also be
    a DICOM series folder ``imagedir/<case>/``. A case without a mask stays in the table so the crop step reports
    it; empty image files are recorded in ``skipped``.
    """
    imagedir, maskdir = Path(imagedir), Path(maskdir)
    for folder in (imagedir, maskdir):
        if not folder.is_dir():
            raise DataError(folder, "not a folder")
    maps = sorted(maskdir.glob("*.json"))
    cmap = _class_map(maps[0], _read_json(maps[0]), task) if maps else {}
    found = SkippedCases()
    rows = []
    series = sorted(p for p in imagedir.iterdir() if p.is_dir())
    for img in sorted([*_nii_files(imagedir, image_glob), *series], key=lambda p: p.name):
        stem = _stem(img)
        if img.is_file() and (err := _empty_file(img)) is not None:
            found.add(stem, err, stage="discover")
            continue
        names = [stem, stem[:-5]] if stem.endswith("_0000") else [stem]
        case = names[-1]
        folder = next((maskdir / n for n in names if (maskdir / n).is_dir()), None)
        files = [m for n in names for m in _nii_files(maskdir, f"{n}.nii*")]
        if folder is not None:
            rows.append(case_row(case, img, folder, "folder"))
        else:
            rows.append(case_row(case, img, files[0] if files else "", "multilabel", cmap))
    if skipped is not None:
        skipped.extend(found)
    cases = pd.DataFrame(rows, columns=CASE_COLUMNS)
    cases.attrs["skipped"] = list(found.rows)
    return cases


def _empty_file(path: Path) -> DataError | None:
    """A DataError for a 0-byte file (cheap: a stat, no read), else None."""
    try:
        return DataError(path, "empty file (0 bytes)") if path.stat().st_size == 0 else None
    except OSError as exc:
        return DataError(path, f"unreadable ({exc})")


def _discover_synthetic(root: Path, **_: object) -> list[dict]:
    path = root / "studies.csv"
    try:
        st = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not a readable CSV ({exc})") from exc
    missing = {"study_id", "patient_id", "ct_path", "seg_path"} - set(st.columns)
    if missing:
        raise DataError(path, f"missing column(s) {sorted(missing)}")
    cmap = load_class_map(root / "class_map.json")
    has_lesion = "lesion_path" in st
    return [case_row(r.study_id, root / r.ct_path, root / r.seg_path, "multilabel", cmap,
                      root / r.lesion_path if has_lesion and isinstance(r.lesion_path, str) else "",
                      patient_id=r.patient_id) for r in st.itertuples()]


def _discover_nnunet(root: Path, image_glob: str = "*.nii*", skipped: SkippedCases | None = None,
                     **_: object) -> list[dict]:
    meta = root / "dataset.json"
    if not meta.exists():
        raise DataError(meta, "nnU-Net/MSD layout without dataset.json (needed for label names)")
    cmap = load_class_map(meta)
    rows = []
    for img in _nii_files(root / "imagesTr", image_glob):
        stem = _stem(img)
        if img.name.startswith("._"):  # macOS resource forks shipped in MSD tarballs
            continue
        msd = _nii_files(root / "labelsTr", f"{stem}.nii*")  # MSD names the label like the image
        case = stem[:-5] if not msd and stem[-5:-4] == "_" and stem[-4:].isdigit() else stem
        if case != stem and not stem.endswith("_0000"):
            continue  # other modalities of a multi-channel case
        if (err := _empty_file(img)) is not None:
            if skipped is not None:
                skipped.add(case, err, stage="discover")
            continue
        label = msd[0] if msd else root / "labelsTr" / f"{case}.nii.gz"
        rows.append(case_row(case, img, label, "multilabel", cmap))
    return rows


def _discover_totalseg_dataset(root: Path, skipped: SkippedCases | None = None, **_: object) -> list[dict]:
    """``<case>/ct.nii.gz`` or ``<case>/ct/`` (a DICOM series folder) + ``<case>/segmentations/``."""
    rows = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if (d / "ct").is_dir() and (d / "segmentations").is_dir():
            rows.append(case_row(d.name, d / "ct", d / "segmentations", "folder"))
            continue
        cts = _nii_files(d, "ct.nii*")
        if cts:
            if (err := _empty_file(cts[0])) is not None:
                if skipped is not None:
                    skipped.add(d.name, err, stage="discover")
                continue
            rows.append(case_row(d.name, cts[0], d / "segmentations", "folder"))
    return rows


def _header(path: Path) -> nib.Nifti1Image:
    """A NIfTI with only its header read, or a DataError (empty, not NIfTI, not gzip, bad header)."""
    if (err := _empty_file(path)) is not None:
        raise err
    try:
        img = nib.load(str(path))
        img.shape  # noqa: B018  (a header without a shape is unusable)
    except Exception as exc:  # nibabel raises many types for non-NIfTI bytes
        raise DataError(path, f"not a readable NIfTI header ({type(exc).__name__}: {exc})") from exc
    return img


def _not_a_label_map(path: Path, img: nib.Nifti1Image) -> str | None:
    """Why a grid-matched mask candidate is not an integer label map, or None when it is one.

    Unsigned integer volumes without scaling are accepted from the header alone (TotalSegmentator and
    nnU-Net write uint8); signed, float or scaled ones are read: negative (HU-like) or non-integer
    values mean an image, e.g. a copy of the CT, and an unreadable one is reported as such.
    """
    dtype = img.get_data_dtype()
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    scaled = not (slope in (None, 1.0) or np.isnan(slope)) or not (inter in (None, 0.0) or np.isnan(inter))
    if dtype.kind == "u" and not scaled:
        return None
    data = np.asanyarray(load_nifti(path).dataobj)
    if not np.issubdtype(data.dtype, np.integer) and not np.array_equal(data, np.round(data)):
        return f"holds non-integer values ({data.dtype}): an image, not an integer label map"
    if data.size and data.min() < 0:
        return f"holds negative values (min {data.min():g}), like a CT in HU: an image, not an integer label map"
    return None


def _discover_pairs(root: Path, image_glob: str = "*.nii*", task: str = "total",
                    skipped: SkippedCases | None = None) -> list[dict]:
    """CTs and multilabel masks in one folder, paired by shape and affine (names are not reliable)."""
    skipped = SkippedCases() if skipped is None else skipped
    maps = sorted(root.glob("*.json"))
    raw = read_json(maps[0], "class map") if maps else {}
    if maps:
        _class_map(maps[0], raw, task)  # a broken map fails here, naming the file, not at crop time
    is_mask = lambda p: any(t in _stem(p).lower() for t in ("seg", "label", "mask"))  # noqa: E731
    headers: dict[Path, nib.Nifti1Image] = {}
    for p in (p for p in _nii_files(root) if is_mask(p)):
        try:
            headers[p] = _header(p)
        except DataError as exc:
            skipped.add(_stem(p), exc, stage="discover")
    verdicts: dict[Path, str | None] = {}
    rows = []
    for img in (p for p in _nii_files(root, image_glob) if not is_mask(p)):
        case = _stem(img)
        try:
            im = _header(img)
            match = [m for m, h in headers.items()
                     if h.shape[:3] == im.shape[:3] and np.allclose(h.affine, im.affine, atol=1e-3)]
            if len(match) > 1:
                raise DataError(img, f"ambiguous mask: {', '.join(m.name for m in match)} all have this image's "
                                     "voxel grid (keep one, or pass a case table with case_row)")
            if match:
                if match[0] not in verdicts:
                    verdicts[match[0]] = _not_a_label_map(match[0], headers[match[0]])
                if verdicts[match[0]]:
                    raise DataError(img, f"ambiguous mask: {match[0].name} has this image's voxel grid but "
                                         f"{verdicts[match[0]]}")
        except DataError as exc:
            skipped.add(case, exc, stage="discover")
            continue
        mask = match[0] if match else ""  # no mask: reported by the crop step as "no mask found"
        t = "total_mr" if match and _stem(match[0]).endswith("_mr") and "total_mr" in raw else task
        rows.append(case_row(case, img, mask, "multilabel", _class_map(maps[0], raw, t) if maps else {}))
    return rows


def is_volume_cohort(path: str | Path) -> bool:
    """True for a folder of CT volumes with organ masks in one of :func:`discover_cases`' layouts (what notebook
    02 crops), as opposed to a class-per-folder tree of 2D images."""
    root = Path(path)
    if not root.is_dir():
        return False
    if (root / "studies.csv").exists() or (root / "imagesTr").is_dir() or _nii_files(root):
        return True
    return any((d / "segmentations").is_dir() for d in root.iterdir() if d.is_dir())


def open_cases(dataset: str | Path = "synthetic-ct", profile: str = "smoke", seed: int = config.DEFAULT_SEED,
               image_glob: str = "*.nii*", layout: str = "auto", stage: str = "02_crop_organs"
               ) -> tuple[pd.DataFrame, Path]:
    """The case table a notebook's ``dataset`` parameter names, and the folder it came from.

    A registered name (``lib.datasets.lookup``): ``synthetic-ct`` is the generated cohort (cached),
    ``ct-totalseg`` the real TotalSegmentator example CTs in ``../shared/data`` (``example_ct*.nii.gz`` paired
    with ``example_seg.nii.gz`` by voxel grid). Anything else is a folder in one of :func:`discover_cases`'
    layouts (a relative path may be given from the repository: papermill runs notebooks inside ``notebooks/``).
    """
    from lib import datasets

    found = datasets.lookup(dataset, stage)
    if isinstance(found, Path):
        return discover_cases(found, layout, image_glob=image_glob), found
    root = found.locate(profile, seed)
    return discover_cases(root, found.layout, image_glob=found.image_glob or image_glob), root


def organ_of(structure: str) -> str:
    """Organ name used by the label columns (kidney_left/right -> kidney)."""
    from lib.synth import ORGAN_STRUCTURES

    for organ, structs in ORGAN_STRUCTURES.items():
        if structure in structs:
            return organ
    return structure


# ----------------------------------------------------------------------------- crop one volume


@dataclass
class Crop:
    """One crop in memory: arrays in LPS voxel order (x, y, z) plus the affine that places them."""

    image: np.ndarray  # HU (x, y, z) float32, or (x, y, z, k) for 25d stacks
    mask: np.ndarray  # uint8 (x, y, z)
    lesion: np.ndarray | None
    affine: np.ndarray
    spacing: np.ndarray  # (x, y, z) mm
    meta: dict = field(default_factory=dict)


@dataclass
class Prepared:
    """A case's image (and lesion mask) in LPS voxel order, as views: reoriented once, cropped many times."""

    hu: np.ndarray
    affine: np.ndarray  # LPS affine
    ornt: np.ndarray  # source voxel order -> LPS
    shape: tuple[int, ...]  # source shape
    lesion: np.ndarray | None = None

    def reorient(self, arr: np.ndarray) -> np.ndarray:
        return nib.orientations.apply_orientation(np.asanyarray(arr), self.ornt)


def prepare(image: nib.Nifti1Image, lesion: np.ndarray | None = None) -> Prepared:
    ornt = lps_ornt(image.affine)
    p = Prepared(np.empty(0), lps_affine(image.affine, ornt, image.shape), ornt, tuple(image.shape[:3]))
    p.hu = p.reorient(image.dataobj)
    p.lesion = p.reorient(lesion) if lesion is not None else None
    return p


def crop_structure(src: Prepared, mask_lps: np.ndarray, box: tuple[np.ndarray, np.ndarray], params: CropParams,
                   label: int | None = None) -> Crop:
    """Crop one structure: ``mask_lps`` is a binary mask, or a label map when ``label`` is given.

    ``box`` is the structure's voxel box in the SOURCE voxel order (what the index reports).
    """
    src_sp = voxel_sizes(src.affine)[src.ornt[:, 0].astype(int)]  # spacing in source axis order
    lo, hi = add_margin(*box, margin_voxels(params.margin_mm, src_sp), src.shape)
    bbox = ",".join(f"{a}:{b}" for a, b in zip(lo, hi, strict=True))
    lo, hi = box_to_lps(lo, hi, src.ornt, src.shape)
    sp = voxel_sizes(src.affine)
    grid = grid_for_box(lo, hi, sp, params.size if params.fmt == "npz" else None, params.fit, params.spacing)
    out_sp = grid.step * sp
    m = sample(mask_lps, grid, 0, 0, dtype=mask_lps.dtype if mask_lps.dtype != bool else np.uint8)
    m = (m == label) if label is not None else (m > 0)
    out_l = sample(src.lesion, grid, 0, 0, dtype=np.uint8) if src.lesion is not None else None
    if out_l is not None and params.lesion_in_organ:
        out_l = np.where(m, out_l, 0).astype(np.uint8)
    if params.mode == "25d":
        offs = stack_offsets(params.k, 1.0 if params.spacing is None else params.spacing[2] / sp[2])
        img = sample_stack(src.hu, grid, offs, AIR_HU)
    else:
        img = sample(src.hu, grid, 1, AIR_HU)
    if params.mode == "seg":
        img = np.where(dilate_mm(m, out_sp, params.dilate_mm), img, np.float32(params.background_hu))
    return Crop(np.asarray(img, dtype=np.float32), m.astype(np.uint8), out_l,
                crop_affine(src.affine, grid.origin, grid.step), out_sp, {"bbox": bbox})


def crop_volume(image: nib.Nifti1Image, mask: np.ndarray, params: CropParams,
                lesion: np.ndarray | None = None) -> Crop:
    """Crop one structure (``mask`` non-zero on the image grid) out of ``image`` (HU); ValueError if empty."""
    box = bbox_of(mask)
    if box is None:
        raise ValueError("empty mask")
    src = prepare(image, lesion)
    return crop_structure(src, src.reorient(np.asanyarray(mask) > 0), box, params)


def to_sample(crop: Crop, window: str | Sequence[float]) -> dict[str, np.ndarray]:
    """Training-sample arrays (S, H, W) from a crop: axial slices first, windowed to [0, 1]."""
    level, width = window_of(window)
    to_shw = lambda a: np.ascontiguousarray(np.transpose(a, (2, 1, 0)))  # noqa: E731  (x, y, z) -> (z, y, x)
    out: dict[str, np.ndarray] = {}
    if crop.image.ndim == 4:  # 25d: (x, y, z, k) -> stack (S, k, H, W); image = centre slice
        stack = apply_window(np.transpose(crop.image, (2, 3, 1, 0)), level, width)
        out["stack"] = np.ascontiguousarray(stack, dtype=np.float32)
        out["image"] = np.ascontiguousarray(stack[:, crop.image.shape[3] // 2])
    else:
        out["image"] = to_shw(apply_window(crop.image, level, width)).astype(np.float32)
    out["mask"] = to_shw(crop.mask).astype(np.uint8)
    if crop.lesion is not None:
        out["lesion"] = to_shw(crop.lesion).astype(np.uint8)
    out["spacing"] = crop.spacing[::-1].astype(np.float32)  # (S, H, W) order
    out["affine"] = crop.affine.astype(np.float64)  # maps (w, h, s) -> world mm
    return out


# ----------------------------------------------------------------------------- writing


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_npz(path: Path, arrays: dict[str, np.ndarray], level: int = 1) -> None:
    """``np.load``-compatible .npz: masks deflated (they shrink ~20×), float images stored as is.

    Why: noisy float32 CT hardly compresses (zlib saves ~10 % at ~40 ms per sample), and writing is
    most of the crop's cost.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh_zip, zipfile.ZipFile(fh_zip, "w") as zf:  # straight to disk: no in-memory copy
        for name, arr in arrays.items():
            packed = np.issubdtype(np.asarray(arr).dtype, np.integer)
            with zf.open(zipfile.ZipInfo(f"{name}.npy") if not packed else _deflated(f"{name}.npy", level),
                         "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(arr), allow_pickle=False)
    os.replace(tmp, path)


def _deflated(name: str, level: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    info._compresslevel = level  # zipfile has no public per-member level
    return info


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, level: int = 1) -> None:
    """NIfTI with sform/qform set from the affine, gzip level 1 (writing dominates otherwise)."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    _atomic_write(path, gzip.compress(img.to_bytes(), compresslevel=level, mtime=0))


def write_crop(crop: Crop, params: CropParams, out_dir: Path, rel: str) -> tuple[str, tuple[int, ...]]:
    """Write one crop; returns (path relative to the crops folder, stored array shape)."""
    if params.fmt == "npz":
        arrays = to_sample(crop, params.window)
        save_npz(out_dir / f"{rel}.npz", arrays)
        return f"{rel}.npz", arrays["image"].shape
    data = np.clip(np.rint(crop.image), -32768, 32767).astype(np.int16)
    save_nifti(out_dir / f"{rel}.nii.gz", data, crop.affine)
    save_nifti(out_dir / f"{rel}_mask.nii.gz", crop.mask, crop.affine)
    if crop.lesion is not None:
        save_nifti(out_dir / f"{rel}_lesion.nii.gz", crop.lesion, crop.affine)
    return f"{rel}.nii.gz", data.shape


# ----------------------------------------------------------------------------- one case


def load_3d(path: str | Path) -> nib.Nifti1Image:
    """``lib.io.load_nifti`` for one volume, or a DICOM series folder (``lib.imageio.read_dicom_series``: RAS
    affine, slope/intercept applied): trailing singleton axes (x, y, z, 1) dropped, real 4D refused."""
    if Path(path).is_dir():
        from lib.imageio import read_dicom_series

        img = read_dicom_series(path)
    else:
        img = load_nifti(path)
    if img.ndim == 3:
        return img
    if any(n != 1 for n in img.shape[3:]):
        raise DataError(path, f"expected one 3D volume, got shape {img.shape} (pick a volume of the series first)")
    return nib.Nifti1Image(np.asanyarray(img.dataobj).reshape(img.shape[:3]), img.affine, img.header)


def _structure_masks(case: dict, image: nib.Nifti1Image, structures: Sequence[str], skipped: SkippedCases
                     ) -> tuple[dict[str, tuple[np.ndarray, int | None]], np.ndarray | None]:
    """Per requested structure: (mask, label) where mask is a label map (multilabel) or a binary mask;
    unknown structure names are recorded. Also the shared label map (None for per-structure files)."""
    out: dict[str, tuple[np.ndarray, int | None]] = {}
    if case["mask_kind"] == "folder":
        folder = Path(case["mask"])
        if not folder.is_dir():
            raise DataError(folder, "mask folder not found")
        valid = sorted(_stem(p) for p in _nii_files(folder))
        for s in structures:
            path = folder / f"{s}.nii.gz"
            if not path.exists():
                skipped.add(case["case_id"], DataError(folder, _unknown(s, valid)), stage="crop")
                continue
            m = load_3d(path)
            check_same_grid(image, m, case["image"], path)
            out[s] = (np.asanyarray(m.dataobj), None)
        return out, None
    cmap = {int(k): v for k, v in json.loads(case["class_map"] or "{}").items()}
    seg = load_3d(case["mask"])
    check_same_grid(image, seg, case["image"], case["mask"])
    labels = np.asanyarray(seg.dataobj)
    if not np.issubdtype(labels.dtype, np.integer):
        labels = np.rint(labels).astype(np.int32)
    index = {v: k for k, v in cmap.items()}
    for s in structures:
        if s not in index:
            skipped.add(case["case_id"], DataError(case["mask"], _unknown(s, sorted(index))), stage="crop")
            continue
        out[s] = (labels, index[s])
    return out, labels


def _unknown(structure: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(structure, valid, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown structure {structure!r}{hint}; valid: {', '.join(valid)}"


def crop_case(case: dict, structures: Sequence[str], out_dir: str | Path,
              passes: Sequence[tuple[CropParams, str]]) -> list[tuple[list[dict], SkippedCases]]:
    """Crop every requested structure of one case for each ``(params, sub-folder)`` pass: the CT and its masks are
    read and reoriented once for all passes. Bad input becomes skip records (in every pass), not exceptions."""
    out_dir = Path(out_dir)
    skipped = SkippedCases()
    cid = case["case_id"]
    try:
        if not case.get("mask"):
            raise DataError(case["image"], "no mask found for this image (none given, or no mask file in the "
                                           "folder has its voxel grid)")
        image = load_3d(case["image"])
        masks, labels = _structure_masks(case, image, structures, skipped)
        lesion = None
        if case.get("lesion"):
            les_img = load_3d(case["lesion"])
            check_same_grid(image, les_img, case["image"], case["lesion"])
            lesion = np.asanyarray(les_img.dataobj)
    except DataError as exc:
        skipped.add(cid, exc, stage="crop")
        return [([], SkippedCases(list(skipped.rows))) for _ in passes]
    src = prepare(image, lesion)
    boxes = label_bboxes(labels) if labels is not None else {}
    lps_labels = src.reorient(labels) if labels is not None else None
    results = [([], SkippedCases(list(skipped.rows))) for _ in passes]
    for s, (m, label) in masks.items():
        box = boxes.get(label) if label is not None else bbox_of(m)
        if box is None:
            where = Path(case["mask"]) / f"{s}.nii.gz" if case["mask_kind"] == "folder" else case["mask"]
            for _, skips in results:
                skips.add(cid, DataError(where, f"structure {s!r} is empty (organ absent or resected)"), stage="crop")
            continue
        mask_lps = lps_labels if label is not None else src.reorient(m)
        sl = tuple(slice(a, b) for a, b in zip(*box, strict=True))  # counts need only the organ's box
        organ = m[sl] == label if label is not None else m[sl] > 0
        voxels = int(np.count_nonzero(organ))
        les_vox = {keep: 0 if lesion is None else int(np.count_nonzero(lesion[sl][organ]) if keep
                                                      else np.count_nonzero(lesion[sl]))
                   for keep in {p.lesion_in_organ for p, _ in passes}}  # only the counts the passes ask for
        for (params, name), (rows, _) in zip(passes, results, strict=True):
            crop = crop_structure(src, mask_lps, box, params, label)
            rel, shape = write_crop(crop, params, out_dir, f"{name}/{s}/{cid}")
            rows.append({"case_id": cid, "patient_id": case["patient_id"], "structure": s, "organ": organ_of(s),
                         "mode": params.mode, "path": rel, "shape": "x".join(map(str, shape)),
                         "spacing": "x".join(f"{v:.3f}" for v in (crop.spacing[::-1] if params.fmt == "npz"
                                                                   else crop.spacing)),
                         "voxels": voxels, "bbox": crop.meta["bbox"],
                         "lesion_voxels": les_vox[params.lesion_in_organ]})
    return results


# ----------------------------------------------------------------------------- cache + batch


def case_hash(case: dict, structures: Sequence[str], params: CropParams) -> str:
    """Hash of the inputs' paths, sizes and mtimes, every parameter and the cropping code: equal hash = same output."""
    key = {"params": params.as_json(), "structures": list(structures),
           "case": {k: case.get(k, "") for k in CASE_COLUMNS}}
    return fingerprint(key, CROP_CODE, stamps=[case[k] for k in ("image", "mask", "lesion") if case.get(k)])


def _manifest_path(out_dir: Path, name: str, case_id: str) -> Path:
    return out_dir / name / "manifest" / f"{case_id}.json"


def _cached(out_dir: Path, name: str, case: dict, digest: str) -> dict | None:
    path = _manifest_path(out_dir, name, case["case_id"])
    try:
        entry = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if entry.get("hash") != digest:
        return None
    if not all((out_dir / r["path"]).exists() for r in entry.get("rows", [])):
        return None
    return entry


def run_case(case: dict, structures: Sequence[str], out_dir: str, passes: Sequence[tuple[CropParams, str]],
             force: bool = False) -> list[tuple[list[dict], list[dict], bool]]:
    """Worker entry point: per pass, the cached result when inputs and parameters are unchanged; the other passes
    are cropped together (one read of the case) and recorded. Returns (rows, skip rows, computed) per pass."""
    out = Path(out_dir)
    results: list[tuple[list[dict], list[dict], bool] | None] = [None] * len(passes)
    todo: list[tuple[int, str]] = []
    for i, (params, name) in enumerate(passes):
        digest = case_hash(case, structures, params)
        if not force and (entry := _cached(out, name, case, digest)) is not None:
            results[i] = (entry["rows"], entry["skipped"], False)
        else:
            todo.append((i, digest))
    if todo:
        try:
            cropped = crop_case(case, structures, out, [passes[i] for i, _ in todo])
        except Exception as exc:  # a bug or odd file must not kill the batch; it is reported per case
            skipped = SkippedCases()
            skipped.add(case["case_id"], f"{type(exc).__name__}: {exc}", stage="crop", path=case.get("image", ""))
            for i, _ in todo:  # not cached: unexpected errors are retried next run
                results[i] = ([], skipped.rows, True)
            return results  # type: ignore[return-value]
        for (i, digest), (rows, skipped) in zip(todo, cropped, strict=True):
            write_json(_manifest_path(out, passes[i][1], case["case_id"]),
                       {"hash": digest, "rows": rows, "skipped": skipped.rows})
            results[i] = (rows, skipped.rows, True)
    return results  # type: ignore[return-value]


def pass_name(params: CropParams) -> str:
    """Default sub-folder of a pass: the mode for npz samples, ``<mode>3d`` for NIfTI crops."""
    return params.mode if params.fmt == "npz" else f"{params.mode}3d"


def crop_passes(cases: pd.DataFrame, structures: Sequence[str], out_dir: str | Path,
                passes: Sequence[dict | CropParams], *, names: Sequence[str | None] | None = None,
                workers: int | None = None, force: bool = False, progress: bool = True,
                scheduler: str | None = None) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """:func:`crop_cohort` for several passes (modes, formats) in one sweep over the cases: each case's CT and
    masks are read once for all passes, which is most of the cost of a pass. ``passes`` are :class:`CropParams`
    (or their fields as dicts); ``names`` their sub-folders (default :func:`pass_name`). Returns one (index,
    skipped) per pass, as :func:`crop_cohort` does, and updates ``out_dir/index.csv`` for all of them."""
    ps = [(p if isinstance(p, CropParams) else CropParams(**p)).validate() for p in passes]  # type: ignore[arg-type]
    named = [(p, n or pass_name(p)) for p, n in zip(ps, names or [None] * len(ps), strict=True)]
    if len({n for _, n in named}) < len(named):
        raise ValueError(f"two crop passes write to the same sub-folder: {[n for _, n in named]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = cases.fillna("").to_dict("records")
    rows: list[list[dict]] = [[] for _ in named]
    skips: list[list[dict]] = [[dict(r) for r in cases.attrs.get("skipped", [])] for _ in named]
    computed = [0] * len(named)
    jobs = [(rec, list(structures), str(out), named, force) for rec in records]
    desc = f"crop {'+'.join(n for _, n in named)}"
    for _, per_pass in cluster.imap(run_case, jobs, scheduler=scheduler, workers=workers, desc=desc,
                                    progress=progress, preload=("lib.crop",)):
        for i, (r, s, c) in enumerate(per_pass):
            rows[i] += r
            skips[i] += s
            computed[i] += c
    results = []
    for (_, name), r, s, c in zip(named, rows, skips, computed, strict=True):
        index = pd.DataFrame(r, columns=INDEX_COLUMNS).sort_values(["structure", "case_id"], ignore_index=True)
        skipped = pd.DataFrame(s, columns=["case", "stage", "file", "reason"]).sort_values(
            ["case", "reason"], ignore_index=True)
        index.attrs["computed"] = c
        (out / name).mkdir(parents=True, exist_ok=True)
        skipped.to_csv(out / name / "skipped.csv", index=False)
        results.append((index, skipped))
    _merge_index(out / "index.csv", {name: index for (_, name), (index, _) in zip(named, results, strict=True)})
    return results


def crop_cohort(cases: pd.DataFrame, structures: Sequence[str], out_dir: str | Path, mode: str = "bbox", *,
                name: str | None = None, workers: int | None = None, force: bool = False, progress: bool = True,
                scheduler: str | None = None, **params: object) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Crop ``structures`` of every case into ``out_dir/<name>/`` and update ``out_dir/index.csv``.

    ``params`` are :class:`CropParams` fields (margin_mm, size, fit, spacing, window, fmt, k, ...).
    ``name`` (sub-folder) defaults to the mode for npz samples and ``<mode>3d`` for NIfTI crops.
    Cases whose inputs and parameters did not change are read from the manifest, not recomputed.
    Runs in-process for ``workers=1`` and in a process pool otherwise (default: one worker per core granted,
    ``lib.resources.workers``), or on a Dask cluster with ``scheduler`` (``lib.cluster``). Returns (index,
    skipped); the index has one row per written crop (this call's rows), and ``out_dir/index.csv`` keeps other
    sub-folders' rows. ``skipped`` starts with what :func:`discover_cases` left out of ``cases``
    (``cases.attrs["skipped"]``), so a notebook shows every unusable file in one table. Several modes at once:
    :func:`crop_passes`.
    """
    return crop_passes(cases, structures, out_dir, [CropParams(mode=mode, **params)], names=[name],  # type: ignore[arg-type]
                       workers=workers, force=force, progress=progress, scheduler=scheduler)[0]


def _merge_index(path: Path, indexes: dict[str, pd.DataFrame]) -> None:
    """Replace these sub-folders' rows in index.csv (one table per sub-folder name), keep the others (several
    modes share one index); one read and one write however many sub-folders."""
    index = pd.concat([i.astype(str) for i in indexes.values()], ignore_index=True)
    if path.exists():
        old = pd.read_csv(path, dtype=str)
        old = old[~old.path.str.startswith(tuple(f"{name}/" for name in indexes))]
        index = pd.concat([old, index], ignore_index=True)
    _atomic_write(path, index.to_csv(index=False).encode())


def read_index(crops_dir: str | Path) -> pd.DataFrame:
    """``crops/index.csv`` with numeric columns typed."""
    df = pd.read_csv(Path(crops_dir) / "index.csv")
    return df.astype({"voxels": int, "lesion_voxels": int})


def ensure_crops(run_dir: str | Path | None = None, profile: str = "smoke", seed: int = config.DEFAULT_SEED,
                 structures: Sequence[str] = DEFAULT_STRUCTURES, mode: str = "bbox", workers: int = 1,
                 progress: bool = False, **params: object) -> pd.DataFrame:
    """Crops of the synthetic cohort for ``profile`` in ``run_dir/crops`` (cached); returns the index.

    What the training notebook calls when ``crops/index.csv`` is missing. Writes ``skipped_crop.csv``.
    """
    from lib import synth

    run = config.resolve_run_dir(run_dir, profile)
    cases = discover_cases(synth.ensure_cohort(profile, seed))
    index, skipped = crop_cohort(cases, structures, run / "crops", mode=mode, workers=workers,
                                 progress=progress, **params)
    SkippedCases(skipped.to_dict("records")).save(run / "skipped_crop.csv")
    return index


# ----------------------------------------------------------------------------- checks and figures


def load_crop(crops_dir: str | Path, rel: str) -> dict[str, np.ndarray]:
    """A written crop as arrays: npz keys, or for NIfTI ``image``/``mask``/``lesion`` (x, y, z) + ``affine``."""
    path = Path(crops_dir) / rel
    if rel.endswith(".npz"):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    img = nib.load(str(path))
    out = {"image": np.asanyarray(img.dataobj), "affine": img.affine}
    for part in ("mask", "lesion"):
        p = path.with_name(path.name.replace(".nii.gz", f"_{part}.nii.gz"))
        if p.exists():
            out[part] = np.asanyarray(nib.load(str(p)).dataobj)
    return out


def overlay_check(crop: dict[str, np.ndarray], source_mask: np.ndarray, source_affine: np.ndarray) -> float:
    """Fraction of crop voxels whose mask value equals the source mask at the same world position.

    Why: the strongest test that a crop overlays its source (1.0 = perfect) regardless of mode,
    orientation or resampling. Crop voxels mapping outside the source must be background.
    """
    m = crop["mask"]
    if crop["image"].ndim == 3 and m.shape == crop["image"].shape and "spacing" in crop:  # npz (S, H, W)
        s, h, w = np.indices(m.shape).reshape(3, -1)
        ijk = np.stack([w, h, s], 1)
    else:  # NIfTI (x, y, z)
        ijk = np.indices(m.shape).reshape(3, -1).T
    to_src = np.linalg.inv(source_affine) @ np.asarray(crop["affine"], float)  # crop voxel -> source voxel
    src = (ijk[:, :, None] * to_src[:3, :3].T[None]).sum(1) + to_src[:3, 3]  # elementwise: no BLAS threads
    shape = np.asarray(source_mask.shape[:3])
    mine = m.reshape(-1) > 0

    def agrees(idx: np.ndarray, want: np.ndarray) -> np.ndarray:
        inside = ((idx >= 0) & (idx < shape)).all(1)
        ref = np.zeros(len(idx), bool)
        ref[inside] = source_mask[tuple(idx[inside].T)] > 0
        return want == ref

    agree = agrees(np.floor(src + 0.5).astype(int), mine)
    # nearest-neighbour at an exact .5 tie may round either way: accept either neighbour there
    retry = np.flatnonzero(~agree & (np.abs(src - np.floor(src) - 0.5) < 1e-4).any(1))
    if len(retry):
        s = src[retry]
        tie = np.abs(s - np.floor(s) - 0.5) < 1e-4
        for down in itertools.product((False, True), repeat=3):
            idx = np.where(tie, np.floor(s) + ~np.array(down), np.floor(s + 0.5)).astype(int)
            agree[retry] |= agrees(idx, mine[retry])
    return float(agree.mean())


def gallery(index: pd.DataFrame, crops_dir: str | Path, n_cases: int = 3, modes: Sequence[str] | None = None
            ) -> plt.Figure:
    """Middle slice of each crop with organ (yellow) and lesion (red) contours: structure × (mode, case)."""
    import matplotlib.pyplot as plt  # lazy: pool workers need not import matplotlib
    crops_dir = Path(crops_dir)
    npz = index[index.path.str.endswith(".npz")]
    modes = list(modes or sorted(npz["mode"].unique()))
    structs = list(dict.fromkeys(npz.structure))
    cases = list(dict.fromkeys(npz.sort_values("lesion_voxels", ascending=False).case_id))[:n_cases]
    cols = [(m, c) for m in modes for c in cases]
    fig, axes = plt.subplots(len(structs), len(cols), figsize=(1.6 * len(cols), 1.7 * len(structs)), squeeze=False)
    for i, s in enumerate(structs):
        for j, (m, c) in enumerate(cols):
            ax = axes[i, j]
            ax.set_axis_off()
            hit = npz[(npz.structure == s) & (npz["mode"] == m) & (npz.case_id == c)]
            if hit.empty:
                continue
            a = load_crop(crops_dir, hit.path.iloc[0])
            z = int(np.argmax(a["mask"].reshape(len(a["mask"]), -1).sum(1)))
            ax.imshow(a["image"][z], cmap="gray", vmin=0, vmax=1)
            if a["mask"][z].any():
                ax.contour(a["mask"][z], levels=[0.5], colors="yellow", linewidths=0.8)
            if "lesion" in a and a["lesion"][z].any():
                ax.contour(a["lesion"][z] > 0, levels=[0.5], colors="red", linewidths=0.8)
            if i == 0:
                ax.set_title(f"{m}\n{c}", fontsize=7)
            if j == 0:
                ax.text(-4, a["image"].shape[1] / 2, s, rotation=90, va="center", ha="right", fontsize=8)
    fig.tight_layout()
    return fig


def crop_sizes(index: pd.DataFrame) -> pd.DataFrame:
    """Field of view of each crop in mm along x, y, z (stored shape × output spacing), for size plots.

    NIfTI crops are stored (x, y, z) and npz samples (S, H, W) = (z, y, x); both shape and spacing in the
    index follow the stored order, so the product is the physical extent. For native-grid NIfTI crops this
    is the organ's box plus margin; fixed-size samples cover a square in-plane field of view.
    """
    out = index.copy()
    sp = out.spacing.str.split("x", expand=True).astype(float).to_numpy()
    sh = out["shape"].str.split("x", expand=True).astype(float).to_numpy()[:, :3]
    ext = sh * sp
    npz = out.path.str.endswith(".npz").to_numpy()
    ext[npz] = ext[npz][:, ::-1]  # (z, y, x) -> (x, y, z)
    for a, ax in enumerate("xyz"):
        out[f"{ax}_mm"] = ext[:, a]
    out["kind"] = np.where(npz, "npz sample", "nifti 3D")
    return out


def source_mask(case: dict, structure: str, labels: nib.Nifti1Image | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Binary mask of one structure on the source grid and the source affine (for checks and figures).

    ``labels``: the case's multilabel mask when already loaded (several structures, one read).
    """
    if case["mask_kind"] == "folder":
        img = load_3d(Path(case["mask"]) / f"{structure}.nii.gz")
        return np.asanyarray(img.dataobj) > 0, img.affine
    index = {v: int(k) for k, v in json.loads(case["class_map"] or "{}").items()}
    if structure not in index:
        raise DataError(case["mask"], _unknown(structure, sorted(index)))
    img = labels if labels is not None else load_3d(case["mask"])
    return np.asanyarray(img.dataobj) == index[structure], img.affine


def overlay_case(case: dict, rows: list[tuple[int, str, str]], crops_dir: str) -> list[tuple[int, float]]:
    """:func:`overlay_check` of one case's crops, given as ``(row, structure, path)``: the source masks are read
    once per case (a worker's job for :func:`verify_overlay`)."""
    labels = load_3d(case["mask"]) if case["mask_kind"] != "folder" else None
    out: list[tuple[int, float]] = []
    for structure in dict.fromkeys(s for _, s, _ in rows):
        mask, affine = source_mask(case, structure, labels)
        out += [(i, overlay_check(load_crop(crops_dir, rel), mask, affine)) for i, s, rel in rows if s == structure]
    return out


def verify_overlay(index: pd.DataFrame, cases: pd.DataFrame, crops_dir: str | Path, workers: int | None = None,
                   scheduler: str | None = None) -> pd.DataFrame:
    """World-coordinate check of every crop in ``index``: :func:`overlay_check` against its source mask.

    Returns ``index`` with an ``overlay`` column (1.0 = each crop voxel's mask equals the source mask at the
    same world position, whatever the mode, orientation, resampling or output size). Cases are checked side by
    side as :func:`crop_cohort` crops them (``workers``, ``scheduler``).
    """
    by_case = cases.fillna("").set_index("case_id")
    out = index.copy()
    out["overlay"] = np.nan
    jobs = [(by_case.loc[cid].to_dict(), list(zip(rows.index, rows.structure, rows.path, strict=True)), str(crops_dir))
            for cid, rows in out.groupby("case_id")]
    for _, checks in cluster.imap(overlay_case, jobs, scheduler=scheduler, workers=workers, desc="overlay check",
                                  progress=False, preload=("lib.crop",)):
        for i, value in checks:
            out.loc[i, "overlay"] = value
    return out


if __name__ == "__main__":  # python -m lib.crop: the same command as ``mednb crop``
    import sys

    from lib.cli import main

    raise SystemExit(main(["crop", *sys.argv[1:]]))
