"""Reading volumes and masks safely, and the skipped-cases table every batch job shares.

Why: real folders hold truncated gzip files, masks from another scan and NaN voxels. One bad case
must not kill a batch, and the user must learn which file was bad and why. Readers here never write.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd


class DataError(ValueError):
    """A specific input file is unusable; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


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


def load_nifti(path: str | Path, check_finite: bool = True) -> nib.Nifti1Image:
    """Load a NIfTI with its data read now, so corrupt files fail here with a clear message."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(path, f"unreadable or truncated NIfTI ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # nibabel raises several types for bad headers
        raise DataError(path, f"not a readable NIfTI ({type(exc).__name__}: {exc})") from exc
    if data.ndim < 3:
        raise DataError(path, f"expected a 3D volume, got shape {data.shape}")
    if check_finite and np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n = int((~np.isfinite(data)).sum())
        raise DataError(path, f"{n} NaN/inf voxels")
    return nib.Nifti1Image(data, img.affine, img.header)


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
