"""One reader for 2D/3D medical images (PNG/JPG/TIFF, DICOM, NIfTI) and the one ``preprocess`` every stage uses.

Why: training, cropping and the HTTP service must turn the same file into the same numbers. Files are
decoded by CONTENT (magic bytes), never by name: some ``.jpg`` files in real sets are PNGs, and an upload's
name is whatever the client says. DICOM needs care that plain ``pixel_array`` does not give: rescale
slope/intercept (HU), MONOCHROME1 inversion, multi-frame, VOI windows, compressed transfer syntaxes, series
ordered by position with an LPS->RAS affine. Patient-identifying tags never leave this module: errors carry
our own wording (tag keyword and error class, never an element value), and metadata goes through a whitelist
(``safe_dicom_metadata``).

Hostile files: every decoder checks what the file DECLARES before decoding it, against ``DecodeLimits``
(``lib.io``): pixel count from the PNG/JPEG/TIFF/BMP header, rows x columns x frames x samples x bytes from the
DICOM header (and the size each compressed frame declares), dims x item size from the NIfTI header, and
inflated bytes for gzip and deflated DICOM (inflated with a cap, never by an unbounded library call). Refusals
are ``DataTooLargeError``; unknown or ambiguous content (a DICOM whose preamble is a PNG) is
``UnsupportedFormatError``; both are ``DataError``s naming the file and the problem.

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
import math
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from lib.io import (
    DEFAULT_LIMITS,
    MAX_DECODED_BYTES,
    NIFTI_HEADER_BYTES,
    DataError,
    DataTooLargeError,
    DecodeLimits,
    SkippedCases,
    UnsupportedFormatError,
    all_finite,
    check_nifti_header,
    read_nifti_header,
)

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

MAX_DECOMPRESSED_BYTES = MAX_DECODED_BYTES  # a gzip/deflate stream may not expand beyond this (zip-bomb guard)
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
    out = np.asarray(values, dtype=np.float32) - np.float32(lo)
    out /= np.float32(width)  # in place: one array the size of the image, not three
    return np.clip(out, 0.0, 1.0, out=out)


# ----------------------------------------------------------------------------- limits


_LIMITS: ContextVar[DecodeLimits] = ContextVar("mednb_decode_limits", default=DEFAULT_LIMITS)


def current_limits() -> DecodeLimits:
    """The decoding limits in force here: ``use_limits``'s, else the module defaults (``lib.io``)."""
    return _LIMITS.get()


@contextmanager
def use_limits(limits: DecodeLimits) -> Iterator[DecodeLimits]:
    """Decode with ``limits`` inside this block (this thread / task only), including calls made by other modules.

    Why: the HTTP service decodes through ``lib.segmentation`` too; a context keeps its tighter limits on every path
    without threading a parameter through code it does not own.
    """
    token = _LIMITS.set(limits)
    try:
        yield limits
    finally:
        _LIMITS.reset(token)


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


def _sniff_other(data: bytes) -> str | None:
    """Every type except DICOM-with-preamble, from the leading bytes."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:2] == b"BM" and len(data) >= 18 and int.from_bytes(data[14:18], "little") in (12, 40, 52, 56, 108, 124):
        return "bmp"
    if _is_nifti_header(data):
        return "nifti"
    if data[:2] == b"\x1f\x8b" and _is_nifti_header(_gunzip_head(data)):
        return "nifti"
    return None


def detect_type(data: bytes, name: str = "<upload>") -> str:
    """File type by content: ``png|jpeg|tiff|bmp|dicom|nifti``; ``UnsupportedFormatError`` when unknown or ambiguous.

    ``DICM`` at offset 128 is checked first, so a DICOM is never read as whatever its preamble holds. A preamble
    that is itself a PNG, JPEG, BMP or NIfTI makes the file a polyglot (an image viewer and a DICOM reader would
    show different pictures): refused. A TIFF header there is the standard DICOM/TIFF dual format and allowed.
    """
    head = bytes(data[:4096])
    if not head:
        raise DataError(name, "empty file")
    if len(head) >= 132 and head[128:132] == b"DICM":
        other = _sniff_other(head)
        if other not in (None, "tiff"):
            raise UnsupportedFormatError(name, f"ambiguous file: a DICOM whose preamble is also a {other.upper()} "
                                               "image (polyglot); refused")
        return "dicom"
    kind = _sniff_other(head) or ("dicom" if _looks_like_raw_dicom(head) else None)
    if kind is None:
        raise UnsupportedFormatError(name, "unknown or unsupported file type (expected PNG, JPEG, TIFF, BMP, "
                                           "DICOM or NIfTI)")
    return kind


def sniff_type(data: bytes) -> str | None:
    """File type from the first bytes: ``png|jpeg|tiff|bmp|dicom|nifti`` or None when unknown or ambiguous."""
    try:
        return detect_type(data)
    except DataError:
        return None


# ----------------------------------------------------------------------------- reading


def _load_bytes(src: _SOURCE, name: str | None, limits: DecodeLimits) -> tuple[bytes, str]:
    """Bytes and a display name. Paths come from our own code (never from an HTTP client)."""
    if isinstance(src, bytes | bytearray | memoryview):
        return bytes(src), name or "<upload>"
    path = Path(src)
    if not path.is_file():
        raise DataError(path, "file not found" if not path.exists() else "not a regular file")
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise DataTooLargeError(path, f"file of {size / (1 << 20):.1f} MiB is above the limit of "
                                          f"{limits.max_bytes / (1 << 20):.1f} MiB")
        return path.read_bytes(), name or str(path)
    except OSError as exc:
        raise DataError(path, f"cannot read file ({type(exc).__name__})") from exc


def read_image(src: _SOURCE, *, frame: int | None = None, window: str | Sequence[float] | dict | None = None,
               name: str | None = None, limits: DecodeLimits | None = None) -> np.ndarray:
    """Decode an image file or its bytes by content into float32 (see module doc for shapes).

    ``window``: None keeps physical values (HU for CT, display values for photos); a preset name or
    ``(level, width)`` maps to [0, 1] with ``apply_window``; ``"voi"`` uses the DICOM file's own VOI LUT or
    WindowCenter/Width. ``frame`` picks one frame of a multi-frame DICOM, one page of a multi-page TIFF, one
    volume of a 4D NIfTI. ``limits`` (default: ``current_limits()``) caps what the file may declare.
    """
    return read_image_with_meta(src, frame=frame, window=window, name=name, limits=limits)[0]


def read_image_with_meta(src: _SOURCE, *, frame: int | None = None,
                         window: str | Sequence[float] | dict | None = None,
                         name: str | None = None, limits: DecodeLimits | None = None) -> tuple[np.ndarray, dict]:
    """``read_image`` plus safe metadata (type, shape, whitelisted DICOM technical tags; nothing identifying)."""
    limits = limits or current_limits()
    data, label = _load_bytes(src, name, limits)
    kind = detect_type(data, label)
    try:
        if kind == "dicom":
            arr, meta = _read_dicom(data, label, frame, window, limits)
        elif kind == "nifti":
            arr, meta = _read_nifti(data, label, frame, limits)
        else:
            arr, meta = _read_pil(data, label, kind, frame, limits)
    except DataError:
        raise
    except MemoryError as exc:  # a limit set above what this machine holds
        raise DataTooLargeError(label, "not enough memory to decode the image") from exc
    except Exception as exc:  # a decoder failing in a way not foreseen is still this file's problem
        cause = None if kind == "dicom" else exc  # pydicom messages can quote element values
        raise DataError(label, f"{kind} could not be decoded ({type(exc).__name__})") from cause
    if window is not None and not (kind == "dicom" and isinstance(window, str) and window.lower() == "voi"):
        if isinstance(window, str) and window.lower() == "voi":
            raise DataError(label, "window='voi' needs a DICOM file (VOI LUT / WindowCenter)")
        arr = apply_window(arr, *resolve_window(window))
    if not all_finite(arr):
        raise DataError(label, f"{int((~np.isfinite(arr)).sum())} NaN/inf pixels")
    return arr, {"type": kind, "shape": list(arr.shape), **meta}


def _short(exc: BaseException, n: int = 160) -> str:
    """An exception message cut to one short line (library messages can be long or quote file bytes)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= n else text[: n - 3] + "..."


_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "bmp": "BMP"}
_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def check_image_size(im: Any, label: str | Path) -> None:
    """The declared-size check of ``read_image`` for an image another reader opened with PIL (before ``load()``)."""
    _check_pil_size(im, str(label), (im.format or "image").lower(), current_limits())


def _check_pil_size(im: Any, label: str, kind: str, limits: DecodeLimits) -> None:
    w, h = im.size
    values = w * h * (1 if im.mode in _GREY_MODES else 3)
    limits.check(label, pixels=w * h, voxels=values, what=f"{kind.upper()} header ({w}x{h})")
    if min(w, h) < MIN_SIDE:
        raise DataError(label, f"image too small ({w}x{h} px)")


MAX_TIFF_PAGES = 4096
MAX_TIFF_VALUES = 1 << 17  # numeric values in one TIFF tag (e.g. strip/tile offsets): PIL makes each an object
_TIFF_CHEAP_TYPES = (1, 2, 6, 7)  # BYTE, ASCII, SBYTE, UNDEFINED: kept as bytes, not one object per value


def _check_tiff_structure(data: bytes, label: str) -> None:
    """Walk the TIFF's page directories before PIL does: PIL turns every tag value into a Python object when
    it opens the file, so a 16 MB TIFF with 4 million one-row strips costs it over 1 GB before any size check."""
    endian = "<" if data[:2] == b"II" else ">"
    offset, seen = struct.unpack(endian + "I", data[4:8])[0], set()
    while offset and offset not in seen and offset + 2 <= len(data):  # a loop or bad offset: PIL reports it
        seen.add(offset)
        if len(seen) > MAX_TIFF_PAGES:
            raise DataTooLargeError(label, f"TIFF with more than {MAX_TIFF_PAGES} pages (refused before decoding)")
        n = struct.unpack(endian + "H", data[offset:offset + 2])[0]
        end = offset + 2 + 12 * n
        if end + 4 > len(data):
            return
        for pos in range(offset + 2, end, 12):
            tag, kind, count = struct.unpack(endian + "HHI", data[pos:pos + 8])
            if kind not in _TIFF_CHEAP_TYPES and count > MAX_TIFF_VALUES:
                raise DataTooLargeError(label, f"TIFF page {len(seen) - 1} tag {tag} declares {count} values "
                                               f"(e.g. strips or tiles), above the limit of {MAX_TIFF_VALUES}")
        offset = struct.unpack(endian + "I", data[end:end + 4])[0]


def _read_pil(data: bytes, label: str, kind: str, frame: int | None,
              limits: DecodeLimits) -> tuple[np.ndarray, dict]:
    """PNG/JPEG/TIFF/BMP through PIL, opened as the type the content says; size checked before ``load()``."""
    from PIL import Image, ImageOps

    meta: dict = {}
    if kind == "tiff":
        _check_tiff_structure(data, label)
    try:
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[kind]]) as im:
            _check_pil_size(im, label, kind, limits)
            n = int(getattr(im, "n_frames", 1) or 1)
            if n > 1:
                if frame is None:
                    raise DataError(label, f"{kind.upper()} with {n} pages/frames: only single images are read "
                                           "(pass frame= to choose a page)")
                if not 0 <= frame < n:
                    raise DataError(label, f"page {frame} out of range (the file has {n} pages)")
                im.seek(frame)
                _check_pil_size(im, label, kind, limits)
                meta = {"pages": n, "page": frame}
            im.load()
            arr = _pil_to_array(ImageOps.exif_transpose(im))
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataTooLargeError(label, f"image declares more pixels than the decoder allows ({_short(exc)})") from exc
    except MemoryError as exc:
        raise DataTooLargeError(label, "not enough memory to decode the image") from exc
    except Exception as exc:  # PIL raises OSError/SyntaxError/ValueError for truncated or odd files
        raise DataError(label, f"truncated or corrupt image ({type(exc).__name__}: {_short(exc)})") from exc
    if min(arr.shape[:2]) < MIN_SIDE:
        raise DataError(label, f"image too small ({arr.shape[1]}x{arr.shape[0]} px)")
    return arr, meta


def _pil_to_array(im: Any) -> np.ndarray:
    """Grey stays ``(H, W)`` at full depth (16-bit kept), colour becomes ``(H, W, 3)``; alpha dropped."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return np.asarray(im, dtype=np.float32) if mode != "I;16B" else np.asarray(im).astype(np.float32)
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(im if mode == "L" else im.convert("L"), dtype=np.float32)
    if mode == "P":
        im = im.convert("RGBA")
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.float32)


# ----------------------------------------------------------------------------- DICOM

_DEFLATED_TS = "1.2.840.10008.1.2.1.99"
_LONG_VRS = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
_CS = re.compile(r"^[A-Z0-9 _]{0,16}$")  # DICOM Code String: what a Modality may hold
MAX_J2K_TILES = 16384  # JPEG 2000 frames: decoders allocate per tile, so 1x1 tiles are a memory bomb


class _RedactPydicomLog(logging.Filter):
    """pydicom's log lines quote invalid element values (a name in a numeric tag): keep only the text before."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cut = min((i for i in (message.find("'"), message.find('"')) if i >= 0), default=-1)
        if cut >= 0:
            record.msg, record.args = message[:cut].rstrip(" :") + ": <value withheld>", ()
        return True


if not any(isinstance(f, _RedactPydicomLog) for f in logging.getLogger("pydicom").filters):
    logging.getLogger("pydicom").addFilter(_RedactPydicomLog())


def _meta_end(data: bytes) -> int:
    """Offset just after the File Meta group (0002,eeee), which is always explicit VR little endian."""
    pos = 132 if data[128:132] == b"DICM" else 0
    while pos + 8 <= len(data) and data[pos:pos + 2] == b"\x02\x00":
        if data[pos + 4:pos + 6] in _LONG_VRS:
            pos += 12 + int.from_bytes(data[pos + 8:pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(data[pos + 6:pos + 8], "little")
    return min(pos, len(data))


def _inflate(data: bytes | memoryview, label: str, limit: int, wbits: int, what: str) -> bytes:
    """Inflate a whole deflate/gzip stream, refusing it as soon as it passes ``limit`` bytes (zip-bomb guard)."""
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as exc:
        raise DataError(label, f"corrupt {what} stream ({exc})") from exc
    if len(out) > limit:
        raise DataTooLargeError(label, f"{what} data expands beyond {limit / (1 << 20):.0f} MiB (refused)")
    if not d.eof:
        raise DataError(label, f"truncated {what} stream")
    return out


def _dcmread(data: bytes, label: str, stop_before_pixels: bool = False, limits: DecodeLimits | None = None) -> Any:
    """Parse a DICOM from its bytes; a deflated dataset is inflated here under ``limits.max_bytes``.

    pydicom inflates Deflated Explicit VR Little Endian files without any bound, so those are inflated first
    and the dataset parsed from the capped result. Errors keep only the exception type: pydicom messages can
    quote element values.
    """
    import pydicom
    from pydicom.dataset import FileDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    limits = limits or current_limits()
    try:
        end = _meta_end(data)
        if _DEFLATED_TS.encode() not in data[:end]:
            return pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels)
        head = pydicom.dcmread(io.BytesIO(data[:end]), force=True)
        if str(head.file_meta.get("TransferSyntaxUID", "")) != _DEFLATED_TS:
            return pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels)
        inflated = _inflate_dataset(memoryview(data)[end:], label, limits)
        body = read_dataset(DicomBytesIO(inflated), is_implicit_VR=False, is_little_endian=True,
                            stop_when=(lambda tag, vr, length: tag == 0x7FE00010) if stop_before_pixels else None)
        ds = FileDataset(label, body, preamble=data[:128] if data[128:132] == b"DICM" else None,
                         file_meta=head.file_meta, is_implicit_VR=False, is_little_endian=True)
        ds.set_original_encoding(False, True, body._character_set)
        return ds
    except DataError:
        raise
    except MemoryError as exc:
        raise DataTooLargeError(label, "not enough memory to parse the DICOM") from exc
    except Exception as exc:  # InvalidDicomError, EOF, struct errors, RecursionError on nested sequences...
        raise DataError(label, f"truncated or corrupt DICOM ({type(exc).__name__})") from None


_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")  # (7FE0,0010/0008/0009)


def _inflate_dataset(body: memoryview, label: str, limits: DecodeLimits) -> bytes:
    """The inflated dataset of a Deflated Explicit VR Little Endian file, never more than its header declares.

    The first MiB is inflated and parsed up to the pixel data: the declared rows x columns x frames x samples
    x bytes is checked against ``limits`` there, and the rest of the stream may then hold only that many pixel
    bytes (plus 1 MiB for trailing elements). Without a readable header the cap is ``limits.max_bytes``.
    """
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    out, pending, cap, checked = bytearray(), body, limits.max_bytes, False
    try:
        while not d.eof:
            chunk = d.decompress(pending, min(cap + 1 - len(out), 16 << 20))
            pending = d.unconsumed_tail
            if not chunk and not pending:
                raise DataError(label, "truncated deflated DICOM stream")
            out += chunk
            if not checked and (len(out) >= 1 << 20 or d.eof):
                checked = True
                cap = min(cap, _declared_dataset_size(bytes(out[: 1 << 20]), label, limits) or cap)
            if len(out) > cap:
                raise DataTooLargeError(label, f"deflated DICOM data expands beyond {cap / (1 << 20):.0f} MiB, more "
                                               "than its header declares or the limit allows (refused)")
    except zlib.error as exc:
        raise DataError(label, f"corrupt deflated DICOM stream ({exc})") from exc
    return bytes(out)


def _declared_dataset_size(head: bytes, label: str, limits: DecodeLimits) -> int | None:
    """Bytes a dataset may take, from its elements before the pixel data; None when they are not all in ``head``."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    try:
        fp = DicomBytesIO(head)
        ds = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                          stop_when=lambda tag, vr, length: tag in (0x7FE00010, 0x7FE00008, 0x7FE00009))
        pos = fp.tell()
    except Exception:
        return None
    if head[pos:pos + 4] not in _PIXEL_TAGS or "Rows" not in ds:
        return None
    return pos + 12 + _declared_pixel_bytes(ds, label, _n_frames(ds, label), limits)[3] + (1 << 20)


def _value(ds: Any, keyword: str, label: str) -> Any:
    """An element's value, or None when absent/empty; a value pydicom cannot convert is named, never quoted."""
    if keyword not in ds:
        return None
    try:
        value = ds[keyword].value
    except Exception as exc:
        raise DataError(label, f"unreadable {keyword} ({type(exc).__name__})") from None
    return None if value is None or (isinstance(value, str | bytes) and not value.strip()) else value


def _number(ds: Any, keyword: str, label: str, default: float | None = None) -> float:
    """A finite single number from a DS/IS/FD element; anything else is a ``DataError`` naming the keyword."""
    value = _value(ds, keyword, label)
    if value is None:
        if default is None:
            raise DataError(label, f"DICOM has no {keyword}")
        return default
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(label, f"invalid {keyword} ({type(exc).__name__}: not a single number)") from None
    if not math.isfinite(out):
        raise DataError(label, f"invalid {keyword} (not finite)")
    return out


def _integer(ds: Any, keyword: str, label: str, default: int | None = None) -> int:
    out = _number(ds, keyword, label, None if default is None else float(default))
    if out != int(out):
        raise DataError(label, f"invalid {keyword} (not an integer)")
    return int(out)


def _numbers(ds: Any, keyword: str, label: str, n: int | None = None) -> list[float]:
    """A multi-valued numeric element (e.g. ImageOrientationPatient) as finite floats, ``n`` values if given."""
    value = _value(ds, keyword, label)
    if value is None:
        raise DataError(label, f"DICOM has no {keyword}")
    try:
        out = [float(v) for v in (value if isinstance(value, Sequence) and not isinstance(value, str) else [value])]
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(label, f"invalid {keyword} ({type(exc).__name__}: not numbers)") from None
    if (n is not None and len(out) != n) or not all(math.isfinite(v) for v in out):
        raise DataError(label, f"invalid {keyword} (expected {n or 'finite'} numbers)")
    return out


def _transfer_syntax(ds: Any, label: str) -> Any:
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID", None) if meta is not None else None
    uid = UID(str(value).strip("\x00 ")) if value is not None else UID("1.2.840.10008.1.2")
    try:
        known = uid.is_transfer_syntax
    except Exception:
        known = False
    if not known:  # the UID's text is not repeated: it is whatever the file holds
        raise DataError(label, "unknown transfer syntax UID (not a DICOM transfer syntax)")
    return uid


def _check_decodable(ds: Any, label: str) -> Any:
    from pydicom.pixels import get_decoder

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        modality = _safe_modality(ds)
        raise DataError(label, f"DICOM has no pixel data (modality {modality}: e.g. a structure set or report)")
    uid = _transfer_syntax(ds, label)
    if not uid.is_compressed:
        return uid
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        raise DataError(label, f"unsupported transfer syntax {uid.name} ({uid}): no decoder exists") from exc
    if not decoder.is_available:
        raise DataError(label, f"unsupported transfer syntax {uid.name} ({uid}): no decoder plugin installed "
                               "(e.g. pylibjpeg-libjpeg or python-gdcm)")
    return uid


def _check_dicom_size(ds: Any, label: str, n_frames: int, uid: Any, limits: DecodeLimits) -> None:
    """Rows x Columns x frames x samples x bytes from the header, against ``limits``, before any decoding."""
    rows, cols, samples, _ = _declared_pixel_bytes(ds, label, n_frames, limits)
    if uid.is_encapsulated:
        _check_frames(ds, label, uid, n_frames, rows, cols, samples)


def _declared_pixel_bytes(ds: Any, label: str, n_frames: int, limits: DecodeLimits) -> tuple[int, int, int, int]:
    """(rows, columns, samples, pixel bytes) the header declares, checked against ``limits``."""
    rows, cols = _integer(ds, "Rows", label), _integer(ds, "Columns", label)
    samples = _integer(ds, "SamplesPerPixel", label, 1)
    bits = _integer(ds, "BitsAllocated", label, 32 if "FloatPixelData" in ds else 64 if "DoubleFloatPixelData"
                    in ds else None)
    if rows < 1 or cols < 1:
        raise DataError(label, f"invalid image size {rows}x{cols} in the DICOM header")
    if samples not in (1, 3, 4):
        raise DataError(label, f"unsupported SamplesPerPixel {samples}")
    if bits not in (1, 8, 16, 32, 64):
        raise DataError(label, f"unsupported BitsAllocated {bits}")
    values = rows * cols * n_frames * samples
    nbytes = values * max(bits // 8, 1)
    limits.check(label, pixels=rows * cols, voxels=values, nbytes=nbytes,
                 what=f"DICOM header ({cols}x{rows}, {n_frames} frame(s))")
    return rows, cols, samples, nbytes


def _check_frames(ds: Any, label: str, uid: Any, n_frames: int, rows: int, cols: int, samples: int) -> None:
    """Compressed frames declare their own size; decoders allocate by THAT size, so it must match the header."""
    from pydicom.encaps import generate_frames
    from pydicom.uid import RLELossless

    try:
        frames = generate_frames(ds.PixelData, number_of_frames=n_frames)
        for index, frame in enumerate(frames):
            if index >= n_frames:
                break
            if uid == RLELossless:
                _check_rle(bytes(frame), rows * cols, label, index)
                continue
            size = _codestream_size(bytes(frame))
            if size is None:
                continue
            width, height, components, tiles = size
            if (width, height) != (cols, rows) or components > max(samples, 1) or tiles > MAX_J2K_TILES:
                raise DataTooLargeError(label, f"compressed frame {index} declares {width}x{height} pixels, "
                                               f"{components} component(s), {tiles} tile(s); the header says "
                                               f"{cols}x{rows} with {samples} sample(s) (refused before decoding)")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(label, f"corrupt encapsulated pixel data ({type(exc).__name__})") from None


_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}  # JPEG and JPEG-LS start-of-frame markers


def _codestream_size(frame: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, components, tiles) from a JPEG, JPEG-LS or JPEG 2000 frame header; None if not found."""
    j2k = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC + SIZ (raw codestream, or inside a JP2 box)
    if j2k >= 0 and len(frame) >= j2k + 42:
        x, y, xo, yo, xt, yt, xto, yto = struct.unpack(">8I", frame[j2k + 8:j2k + 40])
        comps = int.from_bytes(frame[j2k + 40:j2k + 42], "big")
        if xt == 0 or yt == 0 or x <= xo or y <= yo:
            return 0, 0, comps, 0
        return x - xo, y - yo, comps, -(-(x - xto) // xt) * -(-(y - yto) // yt)
    if frame[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(frame) and frame[pos] == 0xFF:
        marker = frame[pos + 1]
        if marker == 0xFF:
            pos += 1
        elif marker in _SOF and pos + 10 <= len(frame):
            height, width = struct.unpack(">HH", frame[pos + 5:pos + 9])
            return width, height, frame[pos + 9], 1
        elif marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 2
        else:
            pos += 2 + int.from_bytes(frame[pos + 2:pos + 4], "big")
    return None


def _check_rle(frame: bytes, expected: int, label: str, index: int) -> None:
    """Each RLE segment must decode to exactly Rows x Columns bytes: counted without decoding (early stop)."""
    if len(frame) < 64:
        raise DataError(label, f"RLE frame {index} is shorter than its 64-byte header")
    n_seg = int.from_bytes(frame[:4], "little")
    if not 1 <= n_seg <= 15:
        raise DataError(label, f"RLE frame {index} declares {n_seg} segments (1 to 15 allowed)")
    offsets = [int.from_bytes(frame[4 + 4 * i:8 + 4 * i], "little") for i in range(n_seg)] + [len(frame)]
    limit = expected + expected // 2 + 1024  # decoders accept some row padding beyond Rows x Columns
    for k in range(n_seg):
        start, end = offsets[k], offsets[k + 1]
        if not 64 <= start <= end <= len(frame):
            raise DataError(label, f"RLE frame {index} has invalid segment offsets")
        seg, pos, total = frame[start:end], 0, 0
        while pos < len(seg) and total <= limit:
            header = seg[pos]
            if header > 128:  # replicate the next byte 257 - header times
                total += (257 - header) if pos + 1 < len(seg) else 0
                pos += 2
            elif header < 128:  # copy the next header + 1 bytes (fewer when the segment ends)
                total += min(header + 1, len(seg) - pos - 1)
                pos += header + 2
            else:
                pos += 1
        if total > limit:
            raise DataTooLargeError(label, f"RLE frame {index} segment {k} inflates far beyond the {expected} bytes "
                                           "the header declares (refused before decoding)")


def _pixels(ds: Any, label: str, index: int | None = None) -> np.ndarray:
    try:
        arr = ds.pixel_array if index is None else _frame_pixels(ds, index)
    except DataError:
        raise
    except MemoryError as exc:
        raise DataTooLargeError(label, "not enough memory to decode the pixel data") from exc
    except Exception as exc:  # decoders raise ValueError/RuntimeError/EOF on truncated data
        raise DataError(label, f"truncated or corrupt DICOM pixel data ({type(exc).__name__})") from None
    return arr


def _frame_pixels(ds: Any, index: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    return pixel_array(ds, index=index)


def _n_frames(ds: Any, label: str = "DICOM") -> int:
    n = _integer(ds, "NumberOfFrames", label, 1)
    if n < 1:
        raise DataError(label, f"invalid NumberOfFrames {n}")
    return n


def _is_hounsfield(ds: Any) -> bool:
    return str(ds.get("Modality", "")).upper() == "CT" or str(ds.get("RescaleType", "")).upper() == "HU"


def modality_values(arr: np.ndarray, ds: Any, label: str = "DICOM") -> np.ndarray:
    """Stored values -> physical values: RescaleSlope/Intercept (or Modality LUT), RT dose grid scaling.

    An absent or empty slope means 1; a slope of 0 (every pixel the same value), a non-number or a
    multi-valued slope/intercept are refused (``DataError`` naming the tag, never its value).
    """
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        try:
            out = apply_modality_lut(arr, ds).astype(np.float32)
        except Exception as exc:
            raise DataError(label, f"invalid Modality LUT ({type(exc).__name__})") from None
    else:
        slope = _number(ds, "RescaleSlope", label, 1.0)
        intercept = _number(ds, "RescaleIntercept", label, 0.0)
        if slope == 0:
            raise DataError(label, "RescaleSlope is 0: every pixel would map to the intercept")
        out = arr.astype(np.float32)
        if slope != 1:
            out *= np.float32(slope)
        if intercept != 0:
            out += np.float32(intercept)
    if str(ds.get("Modality", "")).upper() == "RTDOSE" and "DoseGridScaling" in ds:
        out *= np.float32(_number(ds, "DoseGridScaling", label))
    return out


def _stored_range(ds: Any, label: str = "DICOM") -> tuple[float, float]:
    bits = _integer(ds, "BitsStored", label, _integer(ds, "BitsAllocated", label, 16))
    if not 1 <= bits <= 64:
        raise DataError(label, f"invalid BitsStored {bits}")
    if _integer(ds, "PixelRepresentation", label, 0):
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _invert_monochrome1(values: np.ndarray, ds: Any, label: str = "DICOM") -> np.ndarray:
    """MONOCHROME1 (low = white) -> MONOCHROME2 convention, mirrored within the rescaled stored range.

    HU are physical (air is -1000 whatever the display convention), so CT values are not mirrored.
    """
    if str(ds.get("PhotometricInterpretation", "")).upper() != "MONOCHROME1" or _is_hounsfield(ds):
        return values
    lo, hi = _stored_range(ds, label)
    ends = modality_values(np.array([lo, hi]), ds, label)
    return np.subtract(ends.min() + ends.max(), values, out=values)


def _voi(values: np.ndarray, stored: np.ndarray, ds: Any, label: str, index: int) -> np.ndarray:
    """The file's own display window: VOI LUT sequence, else WindowCenter/Width, scaled to [0, 1]."""
    from pydicom.pixels import apply_voi_lut

    if "VOILUTSequence" in ds:
        try:
            item = ds.VOILUTSequence[0]
            bits = int(item.LUTDescriptor[2])
            out = apply_voi_lut(modality_values(stored, ds, label) if "ModalityLUTSequence" not in ds else stored,
                                ds, index=index, prefer_lut=True)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(label, f"invalid VOI LUT ({type(exc).__name__})") from None
        return np.clip(out.astype(np.float32) / np.float32(2**bits - 1), 0, 1)
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        raise DataError(label, "window='voi' but the DICOM has no VOI LUT or WindowCenter/WindowWidth")
    centres, widths = _numbers(ds, "WindowCenter", label), _numbers(ds, "WindowWidth", label)
    width = widths[index] if index < len(widths) else widths[0]
    if width <= 0:
        raise DataError(label, "invalid WindowWidth (must be > 0)")
    return apply_window(values, centres[index] if index < len(centres) else centres[0], width)


def _read_dicom(data: bytes, label: str, frame: int | None, window: str | Sequence[float] | dict | None,
                limits: DecodeLimits) -> tuple[np.ndarray, dict]:
    ds = _dcmread(data, label, limits=limits)
    uid = _check_decodable(ds, label)
    n = _n_frames(ds, label)
    if frame is not None and not 0 <= frame < n:
        raise DataError(label, f"frame {frame} out of range (the file has {n} frame(s))")
    _check_dicom_size(ds, label, n, uid, limits)
    stored = _pixels(ds, label, frame if n > 1 else None)
    values = modality_values(stored, ds, label)
    if isinstance(window, str) and window.lower() == "voi":
        values = _voi(values, stored, ds, label, frame or 0)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            values = 1.0 - values
    else:
        values = _invert_monochrome1(values, ds, label)
    del stored
    return values.astype(np.float32, copy=False), {"dicom": safe_dicom_metadata(ds), "frames": n}


def _safe_modality(ds: Any) -> str:
    try:
        value = str(ds.get("Modality", "") or "")
    except Exception:
        return "?"
    return value if value and _CS.match(value) else "?"


def safe_dicom_metadata(ds: Any) -> dict:
    """Whitelisted technical tags as plain JSON values; never a patient-identifying tag.

    Code-string tags (Modality, PhotometricInterpretation...) are kept only when they look like code strings and
    numeric tags only when they are numbers, so a name written into a technical tag is not passed on.
    """
    out: dict[str, Any] = {}
    for key in SAFE_TAGS:
        try:
            if key not in ds:
                continue
            elem = ds[key]
            value = elem.value
            if value is None or value == "":
                continue
            plain = _plain(value)
            if elem.VR == "CS" and not all(_CS.match(v) for v in (plain if isinstance(plain, list) else [plain])
                                           if isinstance(v, str)):
                continue
            if elem.VR in ("DS", "IS", "US", "SS", "UL", "SL", "FL", "FD") and not _is_numeric(plain):
                continue
            out[key] = plain
        except Exception:  # an unreadable technical tag is left out, never quoted
            continue
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        uid = meta.TransferSyntaxUID
        if getattr(uid, "is_transfer_syntax", False):
            out["TransferSyntaxUID"] = str(uid)
            out["TransferSyntax"] = uid.name
    return out


def _is_numeric(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


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
    """A whole gzip stream, refused as soon as it expands beyond ``limit`` bytes."""
    return _inflate(data, label, limit, 16 + zlib.MAX_WBITS, "gzip")


def _gunzip_prefix(data: bytes, label: str, n: int) -> bytes:
    """The first ``n`` inflated bytes of a (possibly multi-member) gzip file; never more than ``n`` in memory."""
    parts: list[bytes] = []
    have, rest = 0, memoryview(data)
    while have < n and len(rest):
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            chunk = d.decompress(rest, n - have)
            parts.append(chunk)
            have += len(chunk)
            if not d.eof and have >= n:  # usually only the trailer is left: read it so the CRC is checked
                d.decompress(d.unconsumed_tail, 1 << 20)
        except zlib.error as exc:
            raise DataError(label, f"corrupt gzip stream ({exc})") from exc
        if not d.eof:
            break
        rest = memoryview(d.unused_data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_nifti(data: bytes, label: str, frame: int | None, limits: DecodeLimits) -> tuple[np.ndarray, dict]:
    """NIfTI-1/2 (plain or gzip) from the header out: validated, then exactly the declared bytes inflated."""
    gz = data[:2] == b"\x1f\x8b"
    head = _gunzip_head(data, NIFTI_HEADER_BYTES) if gz else data[:NIFTI_HEADER_BYTES]
    header = read_nifti_header(head, label)
    shape, dtype, affine = check_nifti_header(header, label, limits)
    nifti2 = isinstance(header, nib.Nifti2Header)
    if (head[4:8] if nifti2 else head[344:348]) in (b"ni1\x00", b"ni2\x00"):
        raise DataError(label, "header-only NIfTI (.hdr/.img pair): the voxels are in a separate file")
    if len(shape) > 4:
        raise DataError(label, f"unsupported NIfTI shape {shape}")
    if len(shape) == 4 and frame is None and shape[3] > 1:
        raise DataError(label, f"4D NIfTI with {shape[3]} volumes: pass frame=")
    if len(shape) == 4 and not 0 <= (frame or 0) < shape[3]:
        raise DataError(label, f"frame {frame} out of range (the file has {shape[3]} volumes)")
    if len(shape) < 2:
        raise DataError(label, f"unsupported NIfTI shape {shape}")
    offset = float(header["vox_offset"])
    if not math.isfinite(offset) or offset < 0:
        raise DataError(label, "invalid vox_offset in the NIfTI header")
    offset = max(int(offset), 544 if nifti2 else 352)  # 0 or too low: data follows the header (as nibabel reads)
    voxels = math.prod(shape)
    needed = offset + voxels * dtype.itemsize
    limits.check(label, nbytes=needed, what="NIfTI header")
    raw = _gunzip_prefix(data, label, needed) if gz else data
    if len(raw) < needed:
        raise DataError(label, f"truncated NIfTI: {len(raw)} bytes of data, the header declares {needed}")
    try:
        slope, inter = header.get_slope_inter()
    except Exception as exc:
        raise DataError(label, f"invalid scl_slope/scl_inter ({type(exc).__name__})") from None
    if slope is not None and not (math.isfinite(slope) and math.isfinite(inter or 0.0)):
        raise DataError(label, "invalid scl_slope/scl_inter (not finite)")
    arr = np.frombuffer(raw, dtype=dtype, count=voxels, offset=offset).reshape(shape, order="F")
    if arr.ndim == 4:
        arr = arr[..., frame or 0]
    if arr.ndim == 2:
        arr = arr[..., None]
    out = nifti_to_slices(arr, affine)
    del arr, raw
    if slope is not None and (slope != 1 or (inter or 0) != 0):
        for k in range(len(out)):  # in float64 like nibabel, one slice at a time
            out[k] = out[k].astype(np.float64) * slope + (inter or 0.0)
    zooms = [float(z) for z in header.get_zooms()[:3]]
    return (out[0] if len(out) == 1 else out), {"spacing": zooms, "axcodes": "".join(nib.aff2axcodes(affine))}


def nifti_to_slices(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel array ``(X, Y, Z)`` + affine -> ``(S, H, W)`` axial slices in DICOM display orientation (LPS)."""
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("LPS"))
    lps = nib.orientations.apply_orientation(arr, ornt)
    return np.ascontiguousarray(lps.transpose(2, 1, 0), dtype=np.float32)


# ----------------------------------------------------------------------------- DICOM series


def _series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _file_bytes(path: Path, limits: DecodeLimits) -> bytes:
    return _load_bytes(path, None, limits)[0]


def _dcmread_header(path: Path, head: bytes, limits: DecodeLimits) -> Any:
    """The header of a DICOM file on disk, pixel data not read; a deflated file is inflated (capped) whole."""
    import pydicom

    if _DEFLATED_TS.encode() in head[:_meta_end(head)]:
        return _dcmread(_file_bytes(path, limits), str(path), stop_before_pixels=True, limits=limits)
    try:
        return pydicom.dcmread(str(path), force=True, stop_before_pixels=True)
    except Exception as exc:  # pydicom messages can quote element values: keep only the type
        raise DataError(path, f"truncated or corrupt DICOM ({type(exc).__name__})") from None


def read_dicom_series(folder: str | Path, series_uid: str | None = None,
                      skipped: SkippedCases | None = None, limits: DecodeLimits | None = None) -> nib.Nifti1Image:
    """A folder of DICOM slices -> NIfTI (RAS affine), slices ordered by position along the slice normal.

    Slope/intercept are applied per slice. Files at the same position (e.g. fMRI volumes) become a 4th axis
    ordered by TemporalPositionIdentifier / AcquisitionNumber / InstanceNumber. Several series in one folder
    need ``series_uid``; non-DICOM files are listed in ``skipped``. The volume's declared size (slices x rows x
    columns) is checked against ``limits`` before it is allocated.
    """
    limits = limits or current_limits()
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "DICOM series folder not found")
    headers = []
    for path in _series_files(folder):
        with open(path, "rb") as fh:
            head = fh.read(4096)
        try:
            if detect_type(head, str(path)) != "dicom":
                raise DataError(path, "not a DICOM file")
        except DataError as exc:
            if skipped is not None:
                skipped.add(folder.name, exc.problem if exc.problem.startswith("ambiguous") else "not a DICOM file",
                            stage="dicom_series", path=path)
            continue
        ds = _dcmread_header(path, head, limits)
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
    return _assemble(folder, chosen, limits)


def _assemble(folder: Path, items: list, limits: DecodeLimits) -> nib.Nifti1Image:
    ds0, label0 = items[0][1], str(items[0][0])
    iop = np.array(_numbers(ds0, "ImageOrientationPatient", label0, 6))
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    shape0 = (_integer(ds0, "Rows", label0), _integer(ds0, "Columns", label0))
    positions_mm = []
    for path, ds in items:
        if not np.allclose(_numbers(ds, "ImageOrientationPatient", str(path), 6), iop, atol=1e-4):
            raise DataError(path, "slice orientation differs from the rest of the series")
        if (_integer(ds, "Rows", str(path)), _integer(ds, "Columns", str(path))) != shape0:
            raise DataError(path, f"slice size {(ds.Rows, ds.Columns)} differs from {shape0}")
        positions_mm.append(_numbers(ds, "ImagePositionPatient", str(path), 3))
    limits.check(folder, pixels=shape0[0] * shape0[1], voxels=shape0[0] * shape0[1] * len(items),
                 what=f"DICOM series ({len(items)} slices of {shape0[1]}x{shape0[0]})")
    dist = np.array([float(np.dot(normal, p)) for p in positions_mm])
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
        ds, label = item[1], str(item[0])
        return tuple(_integer(ds, k, label, 0) for k in ("TemporalPositionIdentifier", "AcquisitionNumber",
                                                         "InstanceNumber"))

    groups = [sorted(g, key=time_key) for g in groups]
    n_t = len(groups[0])
    vol = np.zeros((shape0[1], shape0[0], len(groups), n_t), dtype=np.float32)
    for k, group in enumerate(groups):
        for t, (path, _) in enumerate(group):
            label = str(path)
            ds = _dcmread(_file_bytes(path, limits), label, limits=limits)
            uid = _check_decodable(ds, label)
            _check_dicom_size(ds, label, _n_frames(ds, label), uid, limits)
            vol[:, :, k, t] = modality_values(_pixels(ds, label), ds, label).T
    first = np.array(_numbers(groups[0][0][1], "ImagePositionPatient", label0, 3))
    if len(groups) > 1:
        last = np.array(_numbers(groups[-1][0][1], "ImagePositionPatient", label0, 3))
        slice_vec = (last - first) / (len(groups) - 1)
    else:
        slice_vec = normal * _number(ds0, "SliceThickness", label0, 1.0)
    dr, dc = _numbers(ds0, "PixelSpacing", label0, 2)
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
    out = arr.astype(np.float32) - np.float32(lo)
    out /= np.float32(max(hi - lo, 1e-6))  # in place: large stacks get one copy, not three
    return np.clip(out, 0, 1, out=out)


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
    if not all_finite(image):
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
    # Slices are resized before they are repeated (a 2D image fed to a 3-channel or 3D model): the same numbers,
    # without full-resolution copies of one slice.
    if kind == "3d":
        depth = int(spec.get("n_slices", len(stack)))
        index = np.linspace(0, len(stack) - 1, depth).round().astype(int)
        unique, inverse = np.unique(index, return_inverse=True)
        out = _resize2d(stack[unique], hw)[inverse][None]
    else:
        if len(stack) != channels and len(stack) != 1:
            raise DataError(name, f"image gives {len(stack)} channels, the model expects {channels}")
        out = _resize2d(stack, hw)
        if len(out) == 1 and channels > 1:
            out = np.repeat(out, channels, 0)
    if "mean" in spec and "std" in spec:
        mean = np.asarray(spec["mean"], np.float32).reshape(-1, *([1] * (out.ndim - 1)))
        std = np.asarray(spec["std"], np.float32).reshape(-1, *([1] * (out.ndim - 1)))
        out = (out - mean) / std
    return np.ascontiguousarray(out, dtype=np.float32)


def load_input(src: _SOURCE, spec: dict, name: str | None = None,
               limits: DecodeLimits | None = None) -> np.ndarray:
    """File/bytes -> network input: ``preprocess(read_image(src), spec)`` (what training and serving both call)."""
    frame = spec.get("frame")
    image = read_image(src, frame=frame, name=name, limits=limits)
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


__all__ = ["WINDOWS", "IDENTIFYING_TAGS", "SAFE_TAGS", "DecodeLimits", "DataTooLargeError", "UnsupportedFormatError",
           "current_limits", "use_limits", "resolve_window", "apply_window", "detect_type", "sniff_type",
           "read_image", "read_image_with_meta", "modality_values", "safe_dicom_metadata", "read_dicom_series",
           "dicom_series_to_nifti", "nifti_to_slices", "preprocess", "load_input", "read_many"]
