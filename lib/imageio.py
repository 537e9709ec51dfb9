"""One reader for 2D/3D medical images (PNG/JPG/TIFF, DICOM, NIfTI) and the one ``preprocess`` every stage uses.

Why: training, cropping and the HTTP service must turn the same file into the same numbers. Files are
decoded by CONTENT (magic bytes), never by name: some ``.jpg`` files in real sets are PNGs, and an upload's
name is whatever the client says. DICOM needs care that plain ``pixel_array`` does not give: rescale
slope/intercept (HU), MONOCHROME1 inversion, multi-frame, VOI windows, compressed transfer syntaxes, series
ordered by position with an LPS->RAS affine. Patient-identifying tags never leave this module: errors carry
our own wording, and metadata goes through a whitelist (``safe_dicom_metadata``).

Array conventions returned by ``read_image`` (float32):
- 2D grey ``(H, W)``; colour ``(H, W, 3)``;
- stacks ``(S, H, W)`` for multi-frame DICOM and NIfTI volumes. NIfTI volumes are reoriented so that
  ``arr[k]`` is an axial slice shown like a DICOM slice (row 0 anterior, column 0 patient right, k from
  inferior to superior), so a series read from DICOM and the same series written as NIfTI give the same slices.

This module must not import torch: the ONNX service imports it.
"""

from __future__ import annotations

import io
import logging
import warnings
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from lib.io import DataError, SkippedCases

log = logging.getLogger(__name__)

# Window presets (level, width) in HU; common radiology values (Radiopaedia "windowing (CT)").
WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "liver": (30.0, 150.0),
    "bone": (400.0, 1800.0),
    "lung": (-600.0, 1500.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}

# Tags that identify a patient (DICOM PS3.15 basic profile, the ones seen in practice). Never logged/returned.
IDENTIFYING_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge",
    "OtherPatientIDs", "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
    "IssuerOfPatientID", "AccessionNumber", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "InstitutionName", "InstitutionAddress", "StudyDate", "SeriesDate", "AcquisitionDate",
    "ContentDate", "StudyTime", "StudyID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "FrameOfReferenceUID", "DeviceSerialNumber", "StationName", "RequestingPhysician", "EthnicGroup",
)

# Technical tags that are safe to show: they describe the pixels, not the person.
SAFE_TAGS = (
    "Modality", "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "PhotometricInterpretation",
    "BitsAllocated", "BitsStored", "PixelRepresentation", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "ImageOrientationPatient", "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth",
    "Manufacturer", "BodyPartExamined", "KVP", "MagneticFieldStrength", "ConvolutionKernel", "ImageType",
)

MAX_DECOMPRESSED_BYTES = 1 << 30  # a gzip upload may not expand beyond 1 GiB (zip-bomb guard)
MIN_SIDE = 8

_SOURCE = str | Path | bytes | bytearray | memoryview


# ----------------------------------------------------------------------------- windows


def resolve_window(window: str | Sequence[float] | dict | None) -> tuple[float, float] | None:
    """A preset name, ``(level, width)`` or ``{"level", "width"}`` -> ``(level, width)`` (None stays None)."""
    if window is None or isinstance(window, str) and window.lower() in ("", "none"):
        return None
    if isinstance(window, str):
        key = window.lower()
        if key not in WINDOWS:
            raise ValueError(f"unknown window preset {window!r}; choose one of {sorted(WINDOWS)} or (level, width)")
        return WINDOWS[key]
    if isinstance(window, dict):
        level, width = window["level"], window["width"]
    else:
        level, width = window
    if float(width) <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    return float(level), float(width)


def apply_window(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """Physical values (HU) -> [0, 1] float32: ``level - width/2`` maps to 0, ``level + width/2`` to 1."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    lo = level - width / 2.0
    out = (np.asarray(values, dtype=np.float32) - np.float32(lo)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


# ----------------------------------------------------------------------------- sniffing


def _gunzip_head(data: bytes, n: int = 600) -> bytes:
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[:4096], n)
    except zlib.error:
        return b""


def _is_nifti_header(head: bytes) -> bool:
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return int.from_bytes(head[:4], "little") == 348 or int.from_bytes(head[:4], "big") == 348
    if len(head) >= 12 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return int.from_bytes(head[:4], "little") == 540 or int.from_bytes(head[:4], "big") == 540
    return False


def _looks_like_raw_dicom(data: bytes) -> bool:
    """DICOM without the 128-byte preamble (older files): starts with a group 0002/0008 element."""
    if len(data) < 8:
        return False
    group, elem = int.from_bytes(data[:2], "little"), int.from_bytes(data[2:4], "little")
    if group not in (0x0002, 0x0008) or elem > 0x0200:
        return False
    vr = data[4:6]
    explicit = vr.isalpha() and vr.isupper()
    implicit_len = int.from_bytes(data[4:8], "little")
    return explicit or 0 < implicit_len < 1024


def sniff_type(data: bytes) -> str | None:
    """File type from the first bytes: ``png|jpeg|tiff|bmp|dicom|nifti`` or None when unknown."""
    data = bytes(data[:4096])
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":  # before TIFF: a DICOM preamble may be a TIFF header
        return "dicom"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:2] == b"BM" and len(data) >= 18 and int.from_bytes(data[14:18], "little") in (12, 40, 52, 56, 108, 124):
        return "bmp"
    if _is_nifti_header(data):
        return "nifti"
    if data[:2] == b"\x1f\x8b" and _is_nifti_header(_gunzip_head(data)):
        return "nifti"
    if _looks_like_raw_dicom(data):
        return "dicom"
    return None


# ----------------------------------------------------------------------------- reading


def _load_bytes(src: _SOURCE, name: str | None) -> tuple[bytes, str]:
    """Bytes and a display name. Paths come from our own code (never from an HTTP client)."""
    if isinstance(src, bytes | bytearray | memoryview):
        return bytes(src), name or "<upload>"
    path = Path(src)
    if not path.is_file():
        raise DataError(path, "file not found" if not path.exists() else "not a regular file")
    try:
        return path.read_bytes(), name or str(path)
    except OSError as exc:
        raise DataError(path, f"cannot read file ({type(exc).__name__})") from exc


def read_image(src: _SOURCE, *, frame: int | None = None, window: str | Sequence[float] | dict | None = None,
               name: str | None = None) -> np.ndarray:
    """Decode an image file or its bytes by content into float32 (see module doc for shapes).

    ``window``: None keeps physical values (HU for CT, display values for photos); a preset name or
    ``(level, width)`` maps to [0, 1] with ``apply_window``; ``"voi"`` uses the DICOM file's own VOI LUT or
    WindowCenter/Width. ``frame`` picks one frame of a multi-frame DICOM / one volume of a 4D NIfTI.
    """
    return read_image_with_meta(src, frame=frame, window=window, name=name)[0]


def read_image_with_meta(src: _SOURCE, *, frame: int | None = None,
                         window: str | Sequence[float] | dict | None = None,
                         name: str | None = None) -> tuple[np.ndarray, dict]:
    """``read_image`` plus safe metadata (type, shape, whitelisted DICOM technical tags; nothing identifying)."""
    data, label = _load_bytes(src, name)
    if not data:
        raise DataError(label, "empty file")
    kind = sniff_type(data)
    if kind is None:
        raise DataError(label, "unknown or unsupported file type (expected PNG, JPEG, TIFF, BMP, DICOM or NIfTI)")
    if kind == "dicom":
        arr, meta = _read_dicom(data, label, frame, window)
    elif kind == "nifti":
        arr, meta = _read_nifti(data, label, frame)
    else:
        arr, meta = _read_pil(data, label), {}
    if window is not None and not (kind == "dicom" and isinstance(window, str) and window.lower() == "voi"):
        if isinstance(window, str) and window.lower() == "voi":
            raise DataError(label, "window='voi' needs a DICOM file (VOI LUT / WindowCenter)")
        arr = apply_window(arr, *resolve_window(window))
    if not np.isfinite(arr).all():
        raise DataError(label, f"{int((~np.isfinite(arr)).sum())} NaN/inf pixels")
    return arr, {"type": kind, "shape": list(arr.shape), **meta}


def _read_pil(data: bytes, label: str) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
                arr = _pil_to_array(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(label, "image has too many pixels (decompression-bomb guard)") from exc
    except Exception as exc:  # PIL raises OSError/SyntaxError/ValueError for truncated or odd files
        raise DataError(label, f"truncated or corrupt image ({type(exc).__name__}: {exc})") from exc
    if min(arr.shape[:2]) < MIN_SIDE:
        raise DataError(label, f"image too small ({arr.shape[1]}x{arr.shape[0]} px)")
    return arr


def _pil_to_array(im: Any) -> np.ndarray:
    """Grey stays ``(H, W)`` at full depth (16-bit kept), colour becomes ``(H, W, 3)``; alpha dropped."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return np.asarray(im, dtype=np.float32) if mode != "I;16B" else np.asarray(im).astype(np.float32)
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(im.convert("L"), dtype=np.float32)
    if mode == "P":
        im = im.convert("RGBA")
    arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return arr


# ----------------------------------------------------------------------------- DICOM


def _dcmread(data: bytes | str | Path, label: str, stop_before_pixels: bool = False) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    src = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    try:
        return pydicom.dcmread(src, force=True, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        # pydicom messages can quote element values: keep only the exception type.
        raise DataError(label, f"truncated or corrupt DICOM ({type(exc).__name__})") from exc


def _check_decodable(ds: Any, label: str) -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        modality = ds.get("Modality", "?")
        raise DataError(label, f"DICOM has no pixel data (modality {modality}: e.g. a structure set or report)")
    meta = getattr(ds, "file_meta", None)
    uid = UID(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")) if meta is not None else UID("1.2.840.10008.1.2")
    if not uid.is_compressed:
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        raise DataError(label, f"unsupported transfer syntax {uid.name} ({uid}): no decoder exists") from exc
    if not decoder.is_available:
        raise DataError(label, f"unsupported transfer syntax {uid.name} ({uid}): no decoder plugin installed "
                               "(e.g. pylibjpeg-libjpeg or python-gdcm)")


def _pixels(ds: Any, label: str, index: int | None = None) -> np.ndarray:
    _check_decodable(ds, label)
    try:
        arr = ds.pixel_array if index is None else _frame_pixels(ds, index)
    except DataError:
        raise
    except Exception as exc:  # decoders raise ValueError/RuntimeError/EOF on truncated data
        raise DataError(label, f"truncated or corrupt DICOM pixel data ({type(exc).__name__})") from exc
    return arr


def _frame_pixels(ds: Any, index: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    return pixel_array(ds, index=index)


def _n_frames(ds: Any) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def _is_hounsfield(ds: Any) -> bool:
    return str(ds.get("Modality", "")).upper() == "CT" or str(ds.get("RescaleType", "")).upper() == "HU"


def modality_values(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Stored values -> physical values: RescaleSlope/Intercept (or Modality LUT), RT dose grid scaling."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        out = apply_modality_lut(arr, ds).astype(np.float32)
    else:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        out = arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if str(ds.get("Modality", "")).upper() == "RTDOSE" and "DoseGridScaling" in ds:
        out *= np.float32(float(ds.DoseGridScaling))
    return out


def _stored_range(ds: Any) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0):
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _invert_monochrome1(values: np.ndarray, ds: Any) -> np.ndarray:
    """MONOCHROME1 (low = white) -> MONOCHROME2 convention, mirrored within the rescaled stored range.

    HU are physical (air is -1000 whatever the display convention), so CT values are not mirrored.
    """
    if str(ds.get("PhotometricInterpretation", "")).upper() != "MONOCHROME1" or _is_hounsfield(ds):
        return values
    lo, hi = _stored_range(ds)
    ends = modality_values(np.array([lo, hi]), ds)
    return (ends.min() + ends.max()) - values


def _voi(values: np.ndarray, stored: np.ndarray, ds: Any, label: str, index: int) -> np.ndarray:
    """The file's own display window: VOI LUT sequence, else WindowCenter/Width, scaled to [0, 1]."""
    from pydicom.pixels import apply_voi_lut

    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        out = apply_voi_lut(modality_values(stored, ds) if "ModalityLUTSequence" not in ds else stored, ds,
                            index=index, prefer_lut=True)
        return np.clip(out.astype(np.float32) / np.float32(2**bits - 1), 0, 1)
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        raise DataError(label, "window='voi' but the DICOM has no VOI LUT or WindowCenter/WindowWidth")

    def first(v: Any) -> float:
        return float(v[index] if index < len(v) else v[0]) if isinstance(v, Sequence | np.ndarray) and not \
            isinstance(v, str) else float(v)

    return apply_window(values, first(ds.WindowCenter), first(ds.WindowWidth))


def _read_dicom(data: bytes, label: str, frame: int | None,
                window: str | Sequence[float] | dict | None) -> tuple[np.ndarray, dict]:
    ds = _dcmread(data, label)
    n = _n_frames(ds)
    if frame is not None and not 0 <= frame < n:
        raise DataError(label, f"frame {frame} out of range (the file has {n} frame(s))")
    stored = _pixels(ds, label, frame if n > 1 else None)
    values = modality_values(stored, ds)
    if isinstance(window, str) and window.lower() == "voi":
        values = _voi(values, stored, ds, label, frame or 0)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            values = 1.0 - values
    else:
        values = _invert_monochrome1(values, ds)
    return values.astype(np.float32, copy=False), {"dicom": safe_dicom_metadata(ds), "frames": n}


def safe_dicom_metadata(ds: Any) -> dict:
    """Whitelisted technical tags as plain JSON values; never a patient-identifying tag."""
    out: dict[str, Any] = {}
    for key in SAFE_TAGS:
        if key in ds:
            value = ds.get(key)
            if value is None or value == "":
                continue
            out[key] = _plain(value)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        out["TransferSyntaxUID"] = str(meta.TransferSyntaxUID)
        out["TransferSyntax"] = meta.TransferSyntaxUID.name
    return out


def _plain(value: Any) -> Any:
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue | list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, int | float | str):
        return value if not hasattr(value, "original_string") else (
            float(value) if isinstance(value, float) else int(value) if isinstance(value, int) else str(value))
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


# ----------------------------------------------------------------------------- NIfTI


def _gunzip(data: bytes, label: str, limit: int = MAX_DECOMPRESSED_BYTES) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as exc:
        raise DataError(label, f"corrupt gzip stream ({exc})") from exc
    if len(out) > limit:
        raise DataError(label, f"gzip expands beyond {limit >> 20} MiB (refused)")
    if not d.eof:
        raise DataError(label, "truncated gzip stream")
    return out


def _read_nifti(data: bytes, label: str, frame: int | None) -> tuple[np.ndarray, dict]:
    raw = _gunzip(data, label) if data[:2] == b"\x1f\x8b" else data
    try:
        cls = nib.Nifti2Image if raw[4:8] in (b"n+2\x00", b"ni2\x00") else nib.Nifti1Image
        img = cls.from_bytes(raw)
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel: HeaderDataError, ValueError, EOF for truncated payloads
        raise DataError(label, f"truncated or corrupt NIfTI ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 4:
        if frame is None and arr.shape[3] > 1:
            raise DataError(label, f"4D NIfTI with {arr.shape[3]} volumes: pass frame=")
        frame = frame or 0
        if not 0 <= frame < arr.shape[3]:
            raise DataError(label, f"frame {frame} out of range (the file has {arr.shape[3]} volumes)")
        arr = arr[..., frame]
    elif arr.ndim > 4 or arr.ndim < 2:
        raise DataError(label, f"unsupported NIfTI shape {arr.shape}")
    if arr.ndim == 2:
        arr = arr[..., None]
    lps = nifti_to_slices(arr, img.affine)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    return (lps[0] if len(lps) == 1 else lps), {"spacing": zooms, "axcodes": "".join(nib.aff2axcodes(img.affine))}


def nifti_to_slices(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel array ``(X, Y, Z)`` + affine -> ``(S, H, W)`` axial slices in DICOM display orientation (LPS)."""
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("LPS"))
    lps = nib.orientations.apply_orientation(arr, ornt)
    return np.ascontiguousarray(lps.transpose(2, 1, 0), dtype=np.float32)


# ----------------------------------------------------------------------------- DICOM series


def _series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def read_dicom_series(folder: str | Path, series_uid: str | None = None,
                      skipped: SkippedCases | None = None) -> nib.Nifti1Image:
    """A folder of DICOM slices -> NIfTI (RAS affine), slices ordered by position along the slice normal.

    Slope/intercept are applied per slice. Files at the same position (e.g. fMRI volumes) become a 4th axis
    ordered by TemporalPositionIdentifier / AcquisitionNumber / InstanceNumber. Several series in one folder
    need ``series_uid``; non-DICOM files are listed in ``skipped``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "DICOM series folder not found")
    headers = []
    for path in _series_files(folder):
        with open(path, "rb") as fh:
            head = fh.read(4096)
        if sniff_type(head) != "dicom":
            if skipped is not None:
                skipped.add(folder.name, "not a DICOM file", stage="dicom_series", path=path)
            continue
        ds = _dcmread(path, str(path), stop_before_pixels=True)
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            headers.append((path, ds))
    if not headers:
        raise DataError(folder, "no DICOM image slices with position/orientation found")
    by_series: dict[str, list] = {}
    for path, ds in headers:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if series_uid is None and len(by_series) > 1:
        sizes = sorted(len(v) for v in by_series.values())
        raise DataError(folder, f"{len(by_series)} series in one folder (sizes {sizes}): pass series_uid")
    chosen = by_series[series_uid] if series_uid is not None else next(iter(by_series.values()))
    return _assemble(folder, chosen)


def _assemble(folder: Path, items: list) -> nib.Nifti1Image:
    ds0 = items[0][1]
    iop = np.array([float(v) for v in ds0.ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    shape0 = (int(ds0.Rows), int(ds0.Columns))
    for path, ds in items:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], iop, atol=1e-4):
            raise DataError(path, "slice orientation differs from the rest of the series")
        if (int(ds.Rows), int(ds.Columns)) != shape0:
            raise DataError(path, f"slice size {(ds.Rows, ds.Columns)} differs from {shape0}")
    dist = np.array([float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for _, ds in items])
    positions = np.unique(np.round(dist, 3))
    groups = [[it for it, d in zip(items, dist, strict=True) if abs(round(d, 3) - p) < 1e-6] for p in positions]
    counts = {len(g) for g in groups}
    if len(counts) != 1:
        raise DataError(folder, f"uneven number of files per slice position {sorted(counts)} (missing files?)")
    if len(positions) > 2:
        steps = np.diff(positions)
        if np.abs(steps - np.median(steps)).max() > 0.01 * abs(np.median(steps)) + 1e-3:
            raise DataError(folder, f"non-uniform slice spacing {steps.min():.3f}-{steps.max():.3f} mm "
                                    "(missing slices?)")

    def time_key(item: tuple) -> tuple:
        ds = item[1]
        return tuple(int(ds.get(k, 0) or 0) for k in ("TemporalPositionIdentifier", "AcquisitionNumber",
                                                      "InstanceNumber"))

    groups = [sorted(g, key=time_key) for g in groups]
    n_t = len(groups[0])
    vol = np.zeros((shape0[1], shape0[0], len(groups), n_t), dtype=np.float32)
    for k, group in enumerate(groups):
        for t, (path, _) in enumerate(group):
            ds = _dcmread(path, str(path))
            vol[:, :, k, t] = modality_values(_pixels(ds, str(path)), ds).T
    first = np.array([float(v) for v in groups[0][0][1].ImagePositionPatient])
    if len(groups) > 1:
        last = np.array([float(v) for v in groups[-1][0][1].ImagePositionPatient])
        slice_vec = (last - first) / (len(groups) - 1)
    else:
        slice_vec = normal * float(ds0.get("SliceThickness", 1) or 1)
    dr, dc = (float(v) for v in ds0.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * dc, col_dir * dr, slice_vec, first
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    data = vol[..., 0] if n_t == 1 else vol
    if np.all(np.mod(data, 1) == 0) and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def dicom_series_to_nifti(folder: str | Path, out_path: str | Path, series_uid: str | None = None) -> Path:
    """Write a DICOM series folder as a NIfTI volume (the source folder is only read)."""
    out_path = Path(out_path)
    if out_path.resolve().is_relative_to(Path(folder).resolve()):
        raise ValueError(f"refusing to write inside the raw DICOM folder: {out_path}")
    img = read_dicom_series(folder, series_uid)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(out_path))
    return out_path


# ----------------------------------------------------------------------------- preprocessing (train == serve)


def _resize2d(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of ``(C, H, W)`` float32 with PIL (no torch at serve time)."""
    from PIL import Image

    h, w = size
    if arr.shape[1:] == (h, w):
        return arr.astype(np.float32, copy=False)
    return np.stack([np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
                     for c in arr]).astype(np.float32)


def _normalise(arr: np.ndarray, spec: dict) -> np.ndarray:
    window = resolve_window(spec.get("window"))
    if window is not None:
        return apply_window(arr, *window)
    how = spec.get("normalise", "percentile")
    if how == "none":
        return arr.astype(np.float32, copy=False)
    if how == "percentile":
        lo, hi = np.percentile(arr, spec.get("percentiles", (0.5, 99.5)))
    elif how == "minmax":
        lo, hi = float(arr.min()), float(arr.max())
    else:
        raise ValueError(f"normalise must be percentile|minmax|none, got {how!r}")
    return np.clip((arr.astype(np.float32) - np.float32(lo)) / np.float32(max(hi - lo, 1e-6)), 0, 1)


def _is_colour(image: np.ndarray) -> bool:
    return image.ndim == 3 and image.shape[-1] in (3, 4) and image.shape[0] > 4


def _select_slices(stack: np.ndarray, kind: str, n: int) -> np.ndarray:
    s = len(stack)
    if kind == "slab":
        return stack[np.linspace(0, s - 1, n).round().astype(int)]
    mid = s // 2
    if kind == "25d":
        return stack[np.clip(np.arange(mid - n // 2, mid - n // 2 + n), 0, s - 1)]
    return stack[mid:mid + 1]


def preprocess(image: np.ndarray, spec: dict, name: str = "image") -> np.ndarray:
    """``read_image`` output -> network input ``(C, H, W)`` float32, the SAME code for training and serving.

    ``spec`` (stored in checkpoints and ``metadata.json``): ``size`` (int or [H, W]), ``channels`` (1 grey,
    3 RGB, or slices for stacks), ``kind`` (``2d`` middle slice of a stack | ``25d`` | ``slab`` | ``3d``),
    ``n_slices``, ``window`` (preset / [level, width]) or ``normalise`` (``percentile`` default, ``minmax``,
    ``none``), optional ``mean``/``std``. ``3d`` returns ``(1, D, H, W)`` with ``D = n_slices``.
    """
    image = np.asarray(image, dtype=np.float32)
    if not np.isfinite(image).all():
        raise DataError(name, "image has NaN/inf values")
    size = spec.get("size", 128)
    hw = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    channels = int(spec.get("channels", spec.get("in_chans", 1)))
    kind = spec.get("kind", "2d")
    if image.ndim == 2:
        stack = image[None]
    elif _is_colour(image):
        rgb = image[..., :3].transpose(2, 0, 1)
        stack = rgb.mean(0, keepdims=True) if channels == 1 else rgb
    elif image.ndim == 3:
        n = int(spec.get("n_slices", channels))
        stack = image if kind == "3d" else _select_slices(image, kind, n if kind in ("slab", "25d") else 1)
    else:
        raise DataError(name, f"cannot preprocess an array of shape {image.shape}")
    if min(stack.shape[-2:]) < MIN_SIDE:
        raise DataError(name, f"image too small ({stack.shape[-1]}x{stack.shape[-2]} px)")
    stack = _normalise(stack, spec)
    if kind == "3d":
        depth = int(spec.get("n_slices", len(stack)))
        stack = _select_slices(stack, "slab", depth)
        out = _resize2d(stack, hw)[None]
    else:
        if len(stack) == 1 and channels > 1:
            stack = np.repeat(stack, channels, 0)
        if len(stack) != channels:
            raise DataError(name, f"image gives {len(stack)} channels, the model expects {channels}")
        out = _resize2d(stack, hw)
    if "mean" in spec and "std" in spec:
        mean = np.asarray(spec["mean"], np.float32).reshape(-1, *([1] * (out.ndim - 1)))
        std = np.asarray(spec["std"], np.float32).reshape(-1, *([1] * (out.ndim - 1)))
        out = (out - mean) / std
    return np.ascontiguousarray(out, dtype=np.float32)


def load_input(src: _SOURCE, spec: dict, name: str | None = None) -> np.ndarray:
    """File/bytes -> network input: ``preprocess(read_image(src), spec)`` (what training and serving both call)."""
    frame = spec.get("frame")
    image = read_image(src, frame=frame, name=name)
    return preprocess(image, spec, name=name or (str(src) if isinstance(src, str | Path) else "<upload>"))


def read_many(paths: Iterable[str | Path], spec: dict, skipped: SkippedCases | None = None) -> tuple[np.ndarray, list]:
    """Batch of network inputs; unreadable files are recorded in ``skipped`` and left out (returns kept paths)."""
    xs, kept = [], []
    for p in paths:
        try:
            xs.append(load_input(p, spec))
            kept.append(p)
        except DataError as exc:
            if skipped is None:
                raise
            skipped.add(Path(p).name, exc, stage="imageio")
    if not xs:
        return np.zeros((0,), np.float32), kept
    return np.stack(xs), kept


__all__ = ["WINDOWS", "IDENTIFYING_TAGS", "SAFE_TAGS", "resolve_window", "apply_window", "sniff_type",
           "read_image", "read_image_with_meta", "modality_values", "safe_dicom_metadata", "read_dicom_series",
           "dicom_series_to_nifti", "nifti_to_slices", "preprocess", "load_input", "read_many"]
