"""Reading volumes and masks safely, and the skipped-cases table every batch job shares.

Why: real folders hold truncated gzip files, masks from another scan and NaN voxels. One bad case
must not kill a batch, and the user must learn which file was bad and why. Readers here never write.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd


def to_jsonable(obj: Any) -> Any:
    """numpy scalars/arrays -> Python, NaN/inf -> None (strict JSON), tuples/sets -> lists, keys and paths -> str."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [to_jsonable(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, set | frozenset):
        return [to_jsonable(v) for v in sorted(obj, key=str)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)  # Path, dtype, Timestamp...: their text


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    """Write ``obj`` as strict JSON (``to_jsonable``) so that a reader never sees a half-written file: a temporary
    file beside it, then ``os.replace``. The one JSON writer of the package."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(obj), indent=indent, ensure_ascii=False, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parsed JSON, or a DataError naming the file and where it breaks."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"unreadable {what} ({type(exc).__name__}: {exc})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(path, f"{what} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc


class DataError(ValueError):
    """A specific input file is unusable; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class DataTooLargeError(DataError):
    """The file declares (or inflates to) more pixels, voxels or bytes than the decoding limits allow.

    Raised from the header, before anything is decoded, so a tiny file declaring a huge image costs nothing.
    """


class UnsupportedFormatError(DataError):
    """The file's content is not a type we read, or is ambiguous (valid as two formats at once)."""


# Decoding limits, checked against what a file DECLARES before decoding or inflating it. The defaults accept
# real CT/MR volumes (512 x 512 x 2000 int16, float32 512 x 512 x 1000) and large 2D radiographs; the HTTP
# service passes tighter ones (``lib.serve.SERVICE_LIMITS``) sized for its memory budget per upload.
MAX_PIXELS = 80_000_000  # one 2D image, frame or slice: width x height (about 8900 x 8900)
MAX_VOXELS = 512 * 512 * 2048  # values in one decoded array: all slices/frames x samples
MAX_DECODED_BYTES = 2 << 30  # bytes a file may inflate to (gzip, deflate) or declare as stored pixel data


@dataclass(frozen=True)
class DecodeLimits:
    """Caps on what one file may declare; every reader checks them before allocating the decoded array."""

    max_pixels: int = MAX_PIXELS
    max_voxels: int = MAX_VOXELS
    max_bytes: int = MAX_DECODED_BYTES

    def check(self, path: str | Path, *, pixels: int | None = None, voxels: int | None = None,
              nbytes: int | None = None, what: str = "image") -> None:
        """Raise ``DataTooLargeError`` naming the declared size and the limit it exceeds."""
        if pixels is not None and pixels > self.max_pixels:
            raise DataTooLargeError(path, f"{what} declares {_count(pixels)} pixels per image, above the limit of "
                                     f"{_count(self.max_pixels)} (refused before decoding)")
        if voxels is not None and voxels > self.max_voxels:
            raise DataTooLargeError(path, f"{what} declares {_count(voxels)} values, above the limit of "
                                     f"{_count(self.max_voxels)} (refused before decoding)")
        if nbytes is not None and nbytes > self.max_bytes:
            raise DataTooLargeError(path, f"{what} declares {_mib(nbytes)} of data, above the limit of "
                                     f"{_mib(self.max_bytes)} (refused before decoding)")


DEFAULT_LIMITS = DecodeLimits()


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1_000_000 else str(n)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@dataclass
class SkippedCases:
    """Collects (case, file, reason) for cases a batch step skipped, so the run can go on."""

    rows: list[dict] = field(default_factory=list)

    def add(self, case: str, error: Exception | str, stage: str = "", path: str | Path = "") -> None:
        reason = error.problem if isinstance(error, DataError) else str(error)
        file = error.path if isinstance(error, DataError) else str(path)
        self.rows.append({"case": case, "stage": stage, "file": file, "reason": reason})

    def extend(self, other: SkippedCases) -> None:
        self.rows.extend(other.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["case", "stage", "file", "reason"])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_frame().to_csv(path, index=False)
        return path


NIFTI_HEADER_BYTES = 540  # enough for a NIfTI-1 (348) or NIfTI-2 (540) header


def read_nifti_header(head: bytes, path: str | Path) -> nib.Nifti1Header:
    """The NIfTI-1/2 header in ``head`` exactly as stored: nibabel's automatic fixes are NOT applied.

    Why: nibabel replaces a zero pixdim by 1 mm while loading; ``check_nifti_header`` must see the stored values.
    """
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        cls: type = nib.Nifti1Header
    elif len(head) >= 540 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
        cls = nib.Nifti2Header
    else:
        raise DataError(path, "not a NIfTI file (no NIfTI-1/2 header)")
    try:
        return cls(head[: cls.template_dtype.itemsize], check=False)
    except Exception as exc:  # nibabel: HeaderDataError / ValueError for impossible sizes or byte orders
        raise DataError(path, f"invalid NIfTI header ({type(exc).__name__})") from exc


def _checked_affine(affine: np.ndarray, path: str | Path, source: str) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise DataError(path, f"{source} holds NaN/inf: voxel positions unknown")
    axes = np.linalg.norm(affine[:3, :3], axis=0)
    if axes.min() <= 1e-6 or abs(np.linalg.det(affine[:3, :3])) <= 1e-12:
        raise DataError(path, f"{source} is singular (a voxel axis of zero length): voxel size unknown")
    return affine


def check_nifti_header(header: nib.Nifti1Header, path: str | Path,
                       limits: DecodeLimits | None = None) -> tuple[tuple[int, ...], np.dtype, np.ndarray]:
    """Validate a stored NIfTI header before any voxel is read; return ``(shape, dtype, affine)``.

    Refuses what would otherwise give wrong numbers or exhaust memory: dims whose product exceeds ``limits``,
    complex data (its imaginary part would be dropped), RGB records, an sform/qform holding NaN/inf or zeros,
    and a file with neither sform nor qform whose pixdim is zero (nibabel would read it as 1 mm voxels).
    """
    limits = limits or DEFAULT_LIMITS
    try:
        shape = tuple(int(d) for d in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
    except Exception as exc:  # unknown datatype code, dim[0] outside 1..7
        raise DataError(path, f"invalid NIfTI header ({type(exc).__name__}: {exc})") from exc
    if not shape or min(shape) < 1:
        raise DataError(path, f"NIfTI header declares an empty or negative size {shape}")
    if dtype.kind == "c":
        raise DataError(path, f"complex-valued NIfTI ({dtype}): reading it as real would drop the imaginary part")
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise DataError(path, f"unsupported NIfTI data type {dtype} (RGB or records): expected one value per voxel")
    voxels = math.prod(shape)
    limits.check(path, pixels=shape[0] * (shape[1] if len(shape) > 1 else 1), voxels=voxels,
                 nbytes=voxels * dtype.itemsize, what="NIfTI header")
    pixdim = np.asarray(header["pixdim"], dtype=np.float64)[1:4]
    zooms_ok = bool(np.isfinite(pixdim).all() and (pixdim > 0).all())
    if int(header["sform_code"]) > 0:
        return shape, dtype, _checked_affine(header.get_sform(), path, "sform")
    if not zooms_ok:
        where = "qform" if int(header["qform_code"]) > 0 else "no sform or qform, and"
        raise DataError(path, f"{where} pixdim[1:4] {pixdim.tolist()} is zero or not finite: voxel size unknown")
    if int(header["qform_code"]) > 0:
        quat = np.asarray([header[k] for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                                               "qoffset_z")], dtype=np.float64)
        if not np.isfinite(quat).all():
            raise DataError(path, "qform holds NaN/inf: voxel positions unknown")
        return shape, dtype, _checked_affine(header.get_qform(), path, "qform")
    return shape, dtype, _checked_affine(header.get_base_affine(), path, "pixdim affine")


def load_nifti(path: str | Path, check_finite: bool = True, limits: DecodeLimits | None = None) -> nib.Nifti1Image:
    """Load a NIfTI with its data read now, so corrupt files fail here with a clear message.

    The stored header is checked first (``check_nifti_header``): a small .nii.gz declaring a huge volume is
    refused before anything is inflated, and nibabel then reads exactly the declared bytes.
    """
    from nibabel.openers import ImageOpener

    path = Path(path)
    limits = limits or DEFAULT_LIMITS
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(path, "empty file")
    try:
        with ImageOpener(str(path)) as fh:
            head = fh.read(NIFTI_HEADER_BYTES)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(path, f"unreadable or truncated NIfTI ({type(exc).__name__}: {exc})") from exc
    if len(head) >= 348 and (head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00")):
        check_nifti_header(read_nifti_header(head, path), path, limits)
    try:
        img = nib.load(str(path))
        shape, dtype = tuple(int(d) for d in img.shape), np.dtype(img.get_data_dtype())
        if dtype.kind == "c":
            raise DataError(path, f"complex-valued image ({dtype}): the imaginary part would be dropped")
        limits.check(path, voxels=math.prod(shape), nbytes=math.prod(shape) * dtype.itemsize, what="image header")
        _checked_affine(img.affine, path, "affine")
        data = np.asanyarray(img.dataobj)
    except DataError:
        raise
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(path, f"unreadable or truncated NIfTI ({type(exc).__name__}: {exc})") from exc
    except MemoryError as exc:
        raise DataTooLargeError(path, "not enough memory to read the volume") from exc
    except Exception as exc:  # nibabel raises several types for bad headers
        raise DataError(path, f"not a readable NIfTI ({type(exc).__name__}: {exc})") from exc
    if data.ndim < 3:
        raise DataError(path, f"expected a 3D volume, got shape {data.shape}")
    if check_finite and np.issubdtype(data.dtype, np.floating) and not all_finite(data):
        n = int((~np.isfinite(data)).sum())
        raise DataError(path, f"{n} NaN/inf voxels")
    return nib.Nifti1Image(data, img.affine, img.header)


def all_finite(arr: np.ndarray, block: int = 1 << 22) -> bool:
    """``np.isfinite(arr).all()`` in blocks: no temporary as large as the array (volumes can be GBs)."""
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.complexfloating):
        return True
    flat = np.ravel(arr, order="K")  # a view for C- or Fortran-ordered arrays
    return all(np.isfinite(flat[i:i + block]).all() for i in range(0, flat.size, block))


def check_same_grid(image: nib.Nifti1Image, mask: nib.Nifti1Image, image_path: str | Path,
                    mask_path: str | Path, atol_mm: float = 1e-3) -> None:
    """A mask must sit on its image's voxel grid: same shape and (nearly) the same affine."""
    if image.shape[:3] != mask.shape[:3]:
        raise DataError(mask_path, f"mask shape {mask.shape[:3]} does not match image {image_path} "
                                   f"shape {image.shape[:3]}")
    if not np.allclose(image.affine, mask.affine, atol=atol_mm):
        raise DataError(mask_path, f"mask affine differs from image {image_path} "
                                   f"(max difference {np.abs(image.affine - mask.affine).max():.4g} mm)")


def load_case(image_path: str | Path, mask_path: str | Path) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Image and mask of one case, checked to share a grid."""
    image = load_nifti(image_path)
    mask = load_nifti(mask_path)
    check_same_grid(image, mask, image_path, mask_path)
    return image, mask


def voxel_volume_ml(img: nib.Nifti1Image) -> float:
    """Volume of one voxel in millilitres, from the affine (not the header pixdim)."""
    return float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0
