"""Hostile inputs: every decoder refuses what it cannot read safely with a clear ``DataError`` (the message names
the file and the problem), and the HTTP service answers every bad upload with a 4xx at a bounded memory cost.

Files are crafted in ``tmp_path``: bombs declare their size in the header only, so they stay tiny. Memory is
measured in a child process under ``RLIMIT_AS`` so a regression fails instead of exhausting the machine.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import uid as uids

from lib import imageio, serve
from lib.io import DataError, DataTooLargeError, DecodeLimits, SkippedCases, UnsupportedFormatError, load_nifti
from tests.conftest import secondary_capture, shared

ROOT = Path(__file__).resolve().parents[1]
SECRET = "SMITH^JOHN"  # a patient name written into technical tags: must never reach a response or a log
SMALL = DecodeLimits(max_pixels=1_000_000, max_voxels=40_000_000, max_bytes=64 << 20)


# ----------------------------------------------------------------------------- crafting files


def _png(arr: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_bomb(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring ``width x height`` RGB, with an empty image stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b""))
            + _png_chunk(b"IEND", b""))


def _pil_bytes(fmt: str, size: int = 16, mode: str = "L", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), 90).save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg_header_bomb(width: int, height: int) -> bytes:
    data = bytearray(_pil_bytes("JPEG", 64))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tiff_header_bomb(width: int, height: int) -> bytes:
    data = bytearray(_pil_bytes("TIFF", 16))
    ifd = int.from_bytes(data[4:8], "little")
    for i in range(int.from_bytes(data[ifd:ifd + 2], "little")):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack("<HH", data[entry:entry + 4])
        if tag in (256, 257):
            value = width if tag == 256 else height
            data[entry + 8:entry + 12] = struct.pack("<H", value) + b"\0\0" if kind == 3 else struct.pack("<I", value)
    return bytes(data)


def bmp_header_bomb(width: int, height: int) -> bytes:
    data = bytearray(_pil_bytes("BMP", 16, "RGB"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def tiff_many(strips: int = 0, pages: int = 1, tag: int = 273) -> bytes:
    """A little-endian TIFF of 1 x ``strips`` pixels with one-row strips (offsets in ``tag``), or a chain of
    ``pages`` empty page directories: cheap to write, costly for a reader that makes an object per value."""
    if pages > 1:
        ifds = b"".join(struct.pack("<H", 0) + struct.pack("<I", 8 + 6 * (i + 1) if i + 1 < pages else 0)
                        for i in range(pages))
        return b"II*\x00" + struct.pack("<I", 8) + ifds
    head = 8 + 2 + 12 * 8 + 4
    entries = [(256, 4, 1, 1), (257, 4, 1, strips), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (tag, 3, strips, head), (278, 4, 1, 1), (279, 3, strips, head + 2 * strips)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + bytes(4)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(2 * strips) + struct.pack("<H", 1) * strips


def multipage_tiff(pages: int = 3) -> bytes:
    buf = io.BytesIO()
    ims = [Image.fromarray(np.full((16, 16), 10 * (i + 1), np.uint8)) for i in range(pages)]
    ims[0].save(buf, format="TIFF", save_all=True, append_images=ims[1:])
    return buf.getvalue()


def animated_png() -> bytes:
    buf = io.BytesIO()
    ims = [Image.fromarray(np.full((16, 16), 10 * (i + 1), np.uint8)) for i in range(3)]
    ims[0].save(buf, format="PNG", save_all=True, append_images=ims[1:])
    return buf.getvalue()


def _dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def sc_dataset(rows: int = 64, cols: int = 64, **tags: object) -> pydicom.Dataset:
    """A small valid 16-bit secondary capture (gradient) with extra ``tags``."""
    ds = secondary_capture("CT")
    ds.PatientName = SECRET
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(rows * cols, dtype=np.uint16) % 4096).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def dicom_patched(old: bytes, new: bytes, **tags: object) -> bytes:
    """A valid DICOM whose first ``old`` bytes are replaced by ``new`` (same length): values pydicom would
    refuse to write, as a hostile file can hold them."""
    assert len(old) == len(new)
    data = _dicom_bytes(sc_dataset(**tags))
    assert old in data, old
    return data.replace(old, new, 1)


def dicom_encapsulated(ts: str, frames: list[bytes], **tags: object) -> bytes:
    ds = sc_dataset(**tags)
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = pydicom.encaps.encapsulate(frames)
    ds["PixelData"].VR = "OB"
    return _dicom_bytes(ds)


def j2k_codestream(width: int, height: int, tile: int | None = None, comps: int = 1) -> bytes:
    """A JPEG 2000 main header (SOC + SIZ) declaring ``width x height``; the rest is junk."""
    tile = tile or max(width, height)
    siz = struct.pack(">HHIIIIIIIIH", 38 + 3 * comps, 0, width, height, 0, 0, tile, tile, 0, 0, comps)
    return b"\xff\x4f\xff\x51" + siz + b"\x07\x01\x01" * comps + bytes(64)


def rle_bomb(runs: int = 200_000) -> bytes:
    """One RLE segment of 'repeat the next byte 128 times' runs: 2 bytes in, 128 out."""
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    return header + b"\x81\x00" * runs


def deflate_zeros(prefix: bytes, zeros: int, gzip_wrap: bool) -> bytes:
    """``prefix`` + ``zeros`` zero bytes, compressed about 1000:1 with O(1 MB) of work: one full-flushed block
    (independent of what precedes it) is repeated, and the gzip trailer is recomputed for the whole content."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS if gzip_wrap else -zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    count, rest = divmod(zeros, len(chunk))
    if not count:
        return comp.compress(prefix + bytes(rest)) + comp.flush()
    head = comp.compress(prefix) + comp.flush(zlib.Z_FULL_FLUSH)
    block = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    data = head + block * count + comp.compress(bytes(rest)) + comp.flush()
    if not gzip_wrap:
        return data
    crc = zlib.crc32(prefix)
    for _ in range(count):
        crc = zlib.crc32(chunk, crc)
    crc = zlib.crc32(bytes(rest), crc)
    return data[:-8] + struct.pack("<II", crc, (len(prefix) + zeros) & 0xFFFFFFFF)


def deflated_dicom(pixel_bytes: int, rows: int = 64, cols: int = 64, frames: int = 1) -> bytes:
    """Deflated Explicit VR Little Endian DICOM whose PixelData holds ``pixel_bytes`` zeros (streamed, never
    held in memory here); with ``pixel_bytes`` far above rows x cols x frames it is a deflate bomb."""
    ds = sc_dataset(rows, cols)
    ds.NumberOfFrames = frames
    ds.PixelData = b"\0\0"
    plain = _dicom_bytes(ds)
    ds.file_meta.TransferSyntaxUID = uids.DeflatedExplicitVRLittleEndian
    meta = _dicom_bytes(ds)[:imageio._meta_end(_dicom_bytes(ds))]
    body = plain[imageio._meta_end(plain):]
    body = body[:body.rfind(b"\xe0\x7f\x10\x00OB")] if b"\xe0\x7f\x10\x00OB" in body else \
        body[:body.rfind(b"\xe0\x7f\x10\x00OW")]
    return meta + deflate_zeros(body + b"\xe0\x7f\x10\x00OW\0\0" + struct.pack("<I", pixel_bytes), pixel_bytes,
                                gzip_wrap=False)


def dicom_with_png_preamble() -> bytes:
    """A valid DICOM whose 128-byte preamble is a complete 8x8 PNG (a polyglot: viewers show the PNG)."""
    png = _png(np.full((8, 8), 255, np.uint8))
    assert len(png) <= 128, len(png)
    data = bytearray(_dicom_bytes(sc_dataset()))
    data[:128] = png.ljust(128, b"\0")
    return bytes(data)


def deep_sequence_dicom(depth: int = 3000) -> bytes:
    """Sequences nested ``depth`` deep (undefined lengths): a recursion bomb for a naive parser."""
    data = _dicom_bytes(sc_dataset())
    end = imageio._meta_end(data)
    item = b"\x08\x00\x15\x11SQ\0\0\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    return data[:end] + item * depth


def nifti_bytes(data: np.ndarray, affine: np.ndarray | None = None, gz: bool = True,
                edit: Callable[[nib.Nifti1Header], None] | None = None) -> bytes:
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine)
    img.header.set_sform(img.affine, code=1)
    img.header.set_qform(img.affine, code=1)
    if edit is not None:
        edit(img.header)
    raw = img.header.binaryblock + b"\0" * 4 + np.asarray(data).tobytes(order="F")
    return gzip.compress(raw, 1) if gz else raw


def nifti_header_bomb(shape: tuple[int, ...], dtype: type = np.uint8, payload: int = 0) -> bytes:
    """A .nii.gz whose header declares ``shape``; ``payload`` zero bytes of data follow (streamed)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_sform(np.eye(4), code=1)
    hdr["vox_offset"] = 352
    return deflate_zeros(hdr.binaryblock + b"\0" * 4, payload, gzip_wrap=True)


def _set(**fields: object) -> Callable[[nib.Nifti1Header], None]:
    def edit(hdr: nib.Nifti1Header) -> None:
        for key, value in fields.items():
            hdr[key] = value
    return edit


def _nan_sform(hdr: nib.Nifti1Header) -> None:
    hdr["srow_x"] = [np.nan, 0, 0, 0]


def _zero_sform(hdr: nib.Nifti1Header) -> None:
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]


VOL = np.arange(16 * 12 * 4, dtype=np.int16).reshape(16, 12, 4)


# ----------------------------------------------------------------------------- the table


@dataclass
class Case:
    """One hostile file: what the decoder must raise (class + problem) and what the service must answer."""

    name: str
    build: Callable[[], bytes]
    error: type[DataError]
    problem: str  # regex the problem text must match
    status: int | None  # HTTP status from the service (None: not an upload case)
    suffix: str = ".bin"
    read: dict = field(default_factory=dict)  # extra read_image arguments


CASES = [
    # 2D raster: declared pixel count checked before load()
    Case("png_9400x9400_header", lambda: png_header_bomb(9400, 9400), DataTooLargeError,
         r"PNG header \(9400x9400\) declares 88\.4 M pixels", 413, ".png"),
    Case("png_beyond_pil_guard", lambda: png_header_bomb(100_000, 100_000), DataTooLargeError,
         r"more pixels than the decoder allows", 413, ".png"),
    Case("jpeg_sof_60000", lambda: jpeg_header_bomb(60_000, 60_000), DataTooLargeError, r"more pixels|declares", 413,
         ".jpg"),
    Case("jpeg_sof_over_service_limit", lambda: jpeg_header_bomb(6000, 6000), DataTooLargeError,
         r"JPEG header \(6000x6000\) declares 36\.0 M pixels", 413, ".jpg", {"limits": SMALL}),
    Case("tiff_50000", lambda: tiff_header_bomb(50_000, 50_000), DataTooLargeError, r"more pixels|declares", 413,
         ".tif"),
    Case("bmp_30000", lambda: bmp_header_bomb(30_000, 30_000), DataTooLargeError, r"more pixels|declares", 413,
         ".bmp"),
    Case("tiff_300k_strips", lambda: tiff_many(300_000), DataTooLargeError,
         r"TIFF page 0 tag 273 declares 300000 values", 413, ".tif"),
    Case("tiff_5000_pages", lambda: tiff_many(pages=5000), DataTooLargeError, r"TIFF with more than 4096 pages",
         413, ".tif"),
    Case("tiff_multipage", multipage_tiff, DataError, r"TIFF with 3 pages/frames.*pass frame=", 400, ".tif"),
    Case("tiff_page_out_of_range", multipage_tiff, DataError, r"page 5 out of range \(the file has 3 pages\)", None,
         ".tif", {"frame": 5}),
    Case("png_animated", animated_png, DataError, r"PNG with 3 pages/frames", 400, ".png"),
    Case("png_truncated", lambda: _png(np.zeros((64, 64), np.uint8))[:60], DataError, r"truncated or corrupt image",
         400, ".png"),
    Case("png_tiny", lambda: _png(np.zeros((3, 3), np.uint8)), DataError, r"image too small \(3x3 px\)", 400, ".png"),
    # type detection and polyglots
    Case("dicom_png_preamble", dicom_with_png_preamble, UnsupportedFormatError,
         r"DICOM whose preamble is also a PNG image \(polyglot\)", 415, ".dcm"),
    Case("nifti_dicm_at_128", lambda: bytes(bytearray(nifti_bytes(VOL, gz=False))[:128]) + b"DICM"
         + nifti_bytes(VOL, gz=False)[132:], UnsupportedFormatError, r"preamble is also a NIFTI image \(polyglot\)",
         415, ".nii"),
    Case("pdf", lambda: b"%PDF-1.7\n" + bytes(300), UnsupportedFormatError, r"unknown or unsupported file type", 415,
         ".png"),
    Case("empty", lambda: b"", DataError, r"empty (file|upload)", 400, ".png"),
    Case("nii_gz_text", lambda: b"just some text, not gzip\n" * 20, UnsupportedFormatError,
         r"unknown or unsupported file type", 415, ".nii.gz"),
    # DICOM: declared size, transfer syntax, element values
    Case("dicom_header_65535x65535x1000", lambda: dicom_patched(b"\x28\x00\x08\x00IS\x02\x001 ",
                                                                b"\x28\x00\x08\x00IS\x02\x0099",
                                                                rows=64, cols=64, NumberOfFrames=1)
         .replace(b"\x28\x00\x10\x00US\x02\x00\x40\x00", b"\x28\x00\x10\x00US\x02\x00\xff\xff", 1)
         .replace(b"\x28\x00\x11\x00US\x02\x00\x40\x00", b"\x28\x00\x11\x00US\x02\x00\xff\xff", 1),
         DataTooLargeError, r"DICOM header \(65535x65535, 99 frame\(s\)\) declares", 413, ".dcm"),
    Case("dicom_deflate_bomb", lambda: deflated_dicom(300 << 20), DataTooLargeError,
         r"deflated DICOM data expands beyond 1 MiB, more than its header declares", 413, ".dcm"),
    Case("dicom_deflate_bomb_no_header", lambda: deflated_dicom(0)[:imageio._meta_end(deflated_dicom(0))]
         + deflate_zeros(b"", 300 << 20, gzip_wrap=False), DataTooLargeError,
         r"deflated DICOM data expands beyond 64 MiB", 413, ".dcm", {"limits": SMALL}),
    Case("dicom_deflate_corrupt", lambda: deflated_dicom(4096)[:-40] + b"\x07" * 40, DataError,
         r"(corrupt|truncated) deflated DICOM stream", 400, ".dcm"),
    Case("dicom_unknown_ts", lambda: dicom_patched(b"1.2.840.10008.1.2.1\0", b"1.2.3.4.5.6.7.8.9.10"), DataError,
         r"unknown transfer syntax UID", 400, ".dcm"),
    Case("dicom_ts_holds_name", lambda: dicom_patched(b"1.2.840.10008.1.2.1\0", b"SMITH^JOHN^DOE^1234\0"),
         DataError, r"unknown transfer syntax UID", 400, ".dcm"),
    Case("dicom_intercept_name", lambda: dicom_patched(b"-1024 ", b"SMITH^", RescaleIntercept="-1024",
                                                       RescaleSlope="1"), DataError,
         r"invalid RescaleIntercept \(ValueError: not a single number\)", 400, ".dcm"),
    Case("dicom_slope_zero", lambda: _dicom_bytes(sc_dataset(RescaleSlope="0", RescaleIntercept="0")), DataError,
         r"RescaleSlope is 0", 400, ".dcm"),
    Case("dicom_slope_two_values", lambda: _dicom_bytes(sc_dataset(RescaleSlope=["1", "2"], RescaleIntercept="0")),
         DataError, r"invalid RescaleSlope", 400, ".dcm"),
    Case("dicom_slope_nan", lambda: dicom_patched(b"1.5 ", b"NaN ", RescaleSlope="1.5", RescaleIntercept="0"),
         DataError, r"invalid RescaleSlope", 400, ".dcm"),
    Case("dicom_frames_text", lambda: dicom_patched(b"\x28\x00\x08\x00IS\x02\x001 ", b"\x28\x00\x08\x00IS\x02\x00ab",
                                                    NumberOfFrames=1), DataError, r"invalid NumberOfFrames", 400,
         ".dcm"),
    Case("dicom_rows_zero", lambda: _dicom_bytes(sc_dataset()).replace(
        b"\x28\x00\x10\x00US\x02\x00\x40\x00", b"\x28\x00\x10\x00US\x02\x00\x00\x00", 1), DataError,
         r"invalid image size 0x64", 400, ".dcm"),
    Case("dicom_pixels_truncated", lambda: _dicom_bytes(sc_dataset())[:-4000], DataError,
         r"truncated or corrupt DICOM pixel data", 400, ".dcm"),
    Case("dicom_j2k_frame_60000", lambda: dicom_encapsulated(uids.JPEG2000Lossless, [j2k_codestream(60_000, 60_000)]),
         DataTooLargeError, r"compressed frame 0 declares 60000x60000 pixels.*header says 64x64", 413, ".dcm"),
    Case("dicom_j2k_tile_bomb", lambda: dicom_encapsulated(uids.JPEG2000Lossless, [j2k_codestream(512, 512, 1)],
                                                            rows=512, cols=512),
         DataTooLargeError, r"262144 tile\(s\)", 413, ".dcm"),
    Case("dicom_j2k_components", lambda: dicom_encapsulated(uids.JPEG2000Lossless, [j2k_codestream(64, 64,
                                                                                                   comps=16000)]),
         DataTooLargeError, r"16000 component\(s\)", 413, ".dcm"),
    Case("dicom_jpeg_frame_mismatch", lambda: dicom_encapsulated(uids.JPEGBaseline8Bit,
                                                                  [jpeg_header_bomb(20000, 20000)],
                                                                  BitsAllocated=8, BitsStored=8, HighBit=7),
         DataTooLargeError, r"compressed frame 0 declares 20000x20000", 413, ".dcm"),
    Case("dicom_rle_bomb", lambda: dicom_encapsulated(uids.RLELossless, [rle_bomb()], BitsAllocated=8, BitsStored=8,
                                                      HighBit=7),
         DataTooLargeError, r"RLE frame 0 segment 0 inflates far beyond the 4096 bytes", 413, ".dcm"),
    Case("dicom_deep_sequences", deep_sequence_dicom, DataError, r"truncated or corrupt DICOM \(\w+\)", 400, ".dcm"),
    Case("dicom_no_pixels", lambda: _dicom_bytes(sc_dataset()).split(b"\xe0\x7f\x10\x00")[0], DataError,
         r"DICOM has no pixel data \(modality CT", 400, ".dcm"),
    # NIfTI: header dims x item size, gzip inflation, affine
    Case("nii_gz_header_4000_cubed", lambda: nifti_header_bomb((4000, 4000, 4000)), DataTooLargeError,
         r"NIfTI header declares 64000\.0 M values", 413, ".nii.gz"),
    Case("nii_gz_200mb_in_200kb", lambda: nifti_header_bomb((1000, 1000, 200), payload=200_000_000), DataTooLargeError,
         r"NIfTI header declares 200\.0 M values, above the limit of 40\.0 M", 413, ".nii.gz", {"limits": SMALL}),
    Case("nii_sform_nan", lambda: nifti_bytes(VOL, edit=_nan_sform), DataError, r"sform holds NaN/inf", 400,
         ".nii.gz"),
    Case("nii_sform_zero", lambda: nifti_bytes(VOL, edit=_zero_sform), DataError, r"sform is singular", 400,
         ".nii.gz"),
    Case("nii_qform_nan", lambda: nifti_bytes(VOL, edit=_set(sform_code=0, quatern_b=np.nan)), DataError,
         r"qform holds NaN/inf", 400, ".nii.gz"),
    Case("nii_no_affine_zero_pixdim", lambda: nifti_bytes(VOL, edit=_set(sform_code=0, qform_code=0,
                                                                         pixdim=[1, 0, 0, 0, 1, 1, 1, 1])),
         DataError, r"no sform or qform, and pixdim\[1:4\] \[0\.0, 0\.0, 0\.0\] is zero.*voxel size unknown", 400,
         ".nii.gz"),
    Case("nii_complex", lambda: nifti_bytes(VOL.astype(np.complex64)), DataError,
         r"complex-valued NIfTI \(complex64\).*imaginary part", 400, ".nii.gz"),
    Case("nii_rgb", lambda: nifti_bytes(np.zeros((8, 8, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])),
         DataError, r"unsupported NIfTI data type", 400, ".nii.gz"),
    Case("nii_gz_truncated", lambda: nifti_bytes(np.random.default_rng(0).integers(0, 999, (32, 32, 8), np.int16))
         [:1500], DataError, r"truncated NIfTI", 400, ".nii.gz"),
    Case("nii_gz_bad_crc", lambda: nifti_bytes(VOL)[:-8] + bytes(8), DataError, r"corrupt gzip stream", 400,
         ".nii.gz"),
    Case("nii_header_only_pair", lambda: nifti_bytes(VOL, gz=False).replace(b"n+1\0", b"ni1\0", 1), DataError,
         r"header-only NIfTI", 400, ".nii"),
    Case("nii_bad_datatype", lambda: nifti_bytes(VOL, edit=_set(datatype=999)), DataError,
         r"invalid NIfTI header", 400, ".nii.gz"),
    Case("nii_negative_dim", lambda: (lambda b: b[:42] + struct.pack("<h", -5) + b[44:])(nifti_bytes(VOL, gz=False)),
         DataError, r"empty or negative size|invalid NIfTI header", 400, ".nii"),
    Case("nii_vox_offset_huge", lambda: nifti_bytes(VOL, edit=_set(vox_offset=1e12)), DataError,
         r"declares .* of data, above the limit|truncated NIfTI", 413, ".nii.gz"),
]


def _write(case: Case, tmp_path: Path) -> Path:
    path = tmp_path / f"{case.name}{case.suffix}"
    path.write_bytes(case.build())
    return path


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decoder_refuses_with_clear_error(case: Case, tmp_path: Path) -> None:
    path = _write(case, tmp_path)
    assert path.stat().st_size < 2 << 20, "hostile files must stay small"
    with pytest.raises(DataError) as err:
        imageio.read_image(path, **case.read)
    assert isinstance(err.value, case.error), (type(err.value), err.value)
    assert str(path) in str(err.value) and err.value.path == str(path)
    assert re.search(case.problem, err.value.problem), err.value.problem
    assert SECRET not in str(err.value) and "SMITH" not in str(err.value)


# ----------------------------------------------------------------------------- correct answers


def test_single_page_of_multipage_tiff_on_request() -> None:
    arr, meta = imageio.read_image_with_meta(multipage_tiff(), frame=1)
    assert arr.shape == (16, 16) and set(np.unique(arr)) == {20.0} and meta["pages"] == 3


def test_deflated_dicom_reads_like_the_plain_one() -> None:
    ds = sc_dataset(RescaleSlope="2", RescaleIntercept="-100")
    plain = imageio.read_image(_dicom_bytes(ds))
    ds.file_meta.TransferSyntaxUID = uids.DeflatedExplicitVRLittleEndian
    data = _dicom_bytes(ds)
    assert imageio._meta_end(data) < len(data) and b"1.2.840.10008.1.2.1.99" in data[:400]
    arr, meta = imageio.read_image_with_meta(data)
    np.testing.assert_array_equal(arr, plain)
    assert meta["dicom"]["TransferSyntax"] == "Deflated Explicit VR Little Endian"


def test_gzip_holding_more_than_the_header_declares_reads_only_what_is_declared() -> None:
    packed = deflate_zeros(nifti_bytes(VOL.astype(np.float32), gz=False), 300 << 20, gzip_wrap=True)
    assert len(packed) < 400_000  # 300 MB of zeros after the declared voxels
    out = imageio.read_image(packed, limits=SMALL)
    np.testing.assert_array_equal(out, imageio.nifti_to_slices(VOL.astype(np.float32), np.diag([2.0, 2, 3, 1])))


def test_nifti_reader_matches_nibabel_with_scaling(tmp_path: Path) -> None:
    data = np.random.default_rng(3).integers(-500, 500, (20, 18, 6)).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([-0.8, 0.9, 2.5, 1.0]))
    img.header.set_slope_inter(0.5, -20.0)
    nib.save(img, tmp_path / "s.nii.gz")
    ref = nib.load(tmp_path / "s.nii.gz")
    expected = imageio.nifti_to_slices(np.asarray(ref.dataobj, dtype=np.float32), ref.affine)
    np.testing.assert_allclose(imageio.read_image(tmp_path / "s.nii.gz"), expected, rtol=0, atol=1e-5)


def test_dicom_tiff_dual_preamble_still_reads() -> None:
    """CT_small's preamble is a TIFF header (the standard DICOM/TIFF dual format): read as DICOM, not refused."""
    path = shared("dicom-samples", "pydicom", "CT_small.dcm")
    assert imageio.detect_type(path.read_bytes()) == "dicom"
    assert imageio.read_image(path).shape == (128, 128)


def test_limits_accept_real_ct_volume_sizes() -> None:
    lim = imageio.DEFAULT_LIMITS
    lim.check("ct", pixels=512 * 512, voxels=512 * 512 * 1000, nbytes=512 * 512 * 1000 * 2)
    lim.check("ct-float", voxels=512 * 512 * 1000, nbytes=512 * 512 * 1000 * 4)
    lim.check("radiograph", pixels=4096 * 5120, voxels=4096 * 5120 * 3)
    with pytest.raises(DataTooLargeError, match="declares"):
        lim.check("bomb", pixels=9400 * 9400)


def test_use_limits_reaches_every_reader_in_the_block() -> None:
    with imageio.use_limits(SMALL):
        assert imageio.current_limits() is SMALL
        with pytest.raises(DataTooLargeError):
            imageio.read_image(_png(np.zeros((1200, 1000), np.uint8)))
    assert imageio.current_limits() is imageio.DEFAULT_LIMITS
    assert imageio.read_image(_png(np.zeros((1200, 1000), np.uint8))).shape == (1200, 1000)


# ----------------------------------------------------------------------------- lib.io.load_nifti and series


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("zero.nii.gz", b"", "empty file"),
    ("text.nii.gz", b"hello, not a volume\n" * 10, "unreadable or truncated NIfTI"),
    ("bomb.nii.gz", nifti_header_bomb((4000, 4000, 4000)), "declares 64000.0 M values"),
    ("pixdim.nii.gz", nifti_bytes(VOL, edit=_set(sform_code=0, qform_code=0, pixdim=[1, 0, 0, 0, 1, 1, 1, 1])),
     "voxel size unknown"),
    ("complex.nii.gz", nifti_bytes(VOL.astype(np.complex64)), "complex-valued"),
    ("nan.nii.gz", nifti_bytes(VOL, edit=_nan_sform), "sform holds NaN/inf"),
])
def test_load_nifti_refuses(tmp_path: Path, name: str, content: bytes, problem: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_nifti(path)
    assert err.value.path == str(path) and problem in err.value.problem


def test_series_with_a_hostile_slice_names_that_file(tmp_path: Path) -> None:
    for k in range(3):
        ds = sc_dataset(RescaleSlope="1", RescaleIntercept="-1024", ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                        ImagePositionPatient=[0, 0, 2.0 * k], PixelSpacing=[0.5, 0.5], SeriesInstanceUID="1.2.3")
        data = _dicom_bytes(ds)
        (tmp_path / f"s{k}.dcm").write_bytes(data.replace(b"-1024 ", b"SMITH^", 1) if k == 1 else data)
    with pytest.raises(DataError, match="invalid RescaleIntercept") as err:
        imageio.read_dicom_series(tmp_path)
    assert err.value.path.endswith("s1.dcm") and "SMITH" not in str(err.value)
    (tmp_path / "s1.dcm").write_bytes(dicom_with_png_preamble())
    skipped = SkippedCases()
    vol = imageio.read_dicom_series(tmp_path, skipped=skipped)
    assert vol.shape == (64, 64, 2) and "polyglot" in skipped.rows[0]["reason"]


# ----------------------------------------------------------------------------- the service


def tiny_export(root: Path, spec: dict) -> Path:
    """An export folder with a tiny ONNX model (mean of the input -> 2 probabilities), built without torch."""
    from onnx import TensorProto, helper, numpy_helper

    shape = [None, spec.get("channels", 1), spec["size"], spec["size"]]
    if spec.get("kind") == "3d":
        shape = [None, 1, spec["n_slices"], spec["size"], spec["size"]]
    axes = list(range(2, len(shape)))
    channels = shape[1]
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], axes=axes, keepdims=1),
             helper.make_node("Flatten", ["m"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "w", "b"], ["g"]),
             helper.make_node("Softmax", ["g"], ["probabilities"], axis=1)]
    inits = [numpy_helper.from_array(np.tile(np.array([[1.0, -1.0]], np.float32), (channels, 1)), "w"),
             numpy_helper.from_array(np.zeros(2, np.float32), "b")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(model.SerializeToString())
    (root / "labels.json").write_text(json.dumps({"0": "no", "1": "yes"}))
    (root / "metadata.json").write_text(json.dumps({"model_name": "tiny", "preprocessing": spec}))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("tiny") / "m", {"size": 32, "channels": 1, "kind": "2d"})


@pytest.fixture(scope="module")
def client(model_dir: Path) -> TestClient:
    return TestClient(serve.create_app(model_dir, max_upload_mb=2))


UPLOAD_CASES = [c for c in CASES if c.status is not None]


@pytest.mark.parametrize("case", UPLOAD_CASES, ids=[c.name for c in UPLOAD_CASES])
def test_service_answers_4xx_naming_the_problem(case: Case, client: TestClient,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    data = case.build()
    r = client.post("/predict", files={"file": (f"{SECRET}{case.suffix}", data, "application/octet-stream")})
    assert r.status_code == case.status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and len(detail) > 10
    if not case.read:  # the same problem text as the decoder gives (the service's limits are tighter)
        assert re.search(case.problem, detail), detail
    for text in (r.text, caplog.text):
        assert "SMITH" not in text and SECRET not in text


def test_service_refuses_what_the_library_would_accept(client: TestClient) -> None:
    """SERVICE_LIMITS are tighter: a 200 MB volume in a 200 kB .nii.gz, a 6000x6000 JPEG, a deflated DICOM
    expanding to 300 MB are 413 for the service (the library would decode the first two)."""
    for data, pattern in ((nifti_header_bomb((1000, 1000, 200), payload=200_000_000), r"200\.0 M values"),
                          (jpeg_header_bomb(6000, 6000), r"36\.0 M pixels"),
                          (deflated_dicom(0)[:imageio._meta_end(deflated_dicom(0))]
                           + deflate_zeros(b"", 300 << 20, gzip_wrap=False), r"expands beyond 256 MiB")):
        assert len(data) < 400_000
        r = client.post("/predict", files={"file": ("x", data)})
        assert r.status_code == 413 and re.search(pattern, r.json()["detail"]), r.text


def test_service_malformed_requests_are_4xx(client: TestClient) -> None:
    bad = [client.post("/predict", content=b"garbage", headers={"content-type": "multipart/form-data"}),
           client.post("/predict", content=b"--b\r\nnot headers\r\n", headers={
               "content-type": "multipart/form-data; boundary=b"}),
           client.post("/predict", content=b"x" * 100, headers={"content-type": "application/octet-stream"}),
           client.post("/predict", files={"other": ("x.png", _png(np.zeros((32, 32), np.uint8)))})]
    assert all(400 <= r.status_code < 500 for r in bad), [r.status_code for r in bad]


def test_service_scores_good_uploads_alongside_bombs(client: TestClient) -> None:
    """Concurrent uploads: bombs are refused while real images are scored, none waits forever or fails with 500."""
    good = _png((np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8))
    uploads = [good, png_header_bomb(9400, 9400), dicom_with_png_preamble(), good, deep_sequence_dicom(), good]
    results: dict[int, int] = {}

    def post(i: int, data: bytes) -> None:
        results[i] = client.post("/predict", files={"file": ("x", data)}).status_code

    threads = [threading.Thread(target=post, args=(i, d)) for i, d in enumerate(uploads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {0: 200, 1: 413, 2: 415, 3: 200, 4: 400, 5: 200}


def test_unexpected_decoder_failure_is_400_naming_only_the_class(client: TestClient, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object, **kw: object) -> None:
        raise RuntimeError(f"decoder crashed near {SECRET}")

    caplog.set_level(logging.DEBUG)
    png = _png(np.zeros((32, 32), np.uint8))
    monkeypatch.setattr(imageio, "preprocess", broken)  # past the decoders: the service's own catch-all
    r = client.post("/predict", files={"file": ("x", png)})
    assert r.status_code == 400 and "RuntimeError" in r.json()["detail"]
    monkeypatch.setattr(imageio, "_read_pil", broken)  # inside a decoder: a DataError naming the file
    with pytest.raises(DataError, match=r"scan.png: png could not be decoded \(RuntimeError\)"):
        imageio.read_image(png, name="scan.png")
    assert SECRET not in r.text and SECRET not in caplog.text


def test_pydicom_log_lines_never_carry_values(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("pydicom").warning("Invalid value for VR UI: %r. Please see ...", SECRET)
    assert "Invalid value for VR UI" in caplog.text and SECRET not in caplog.text


def test_service_silences_pydicom_warnings_that_quote_values() -> None:
    data = dicom_patched(b"1.2.840.10008.1.2.1\0", b"SMITH^JOHN^DOE^1234\0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        serve.quiet_pydicom_warnings()
        with pytest.raises(DataError, match="unknown transfer syntax"):
            imageio.read_image(data)
    assert not any("SMITH" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_cli_limits_are_options(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    img = tmp_path / "img.png"
    img.write_bytes(_png(np.zeros((64, 64), np.uint8)))
    assert serve.main(["--model", str(model_dir), "--predict", str(img), "--max-pixels", "1000"]) == 1
    assert "declares 4096 pixels per image, above the limit of 1000" in capsys.readouterr().out
    args = serve.parse_args(["--model", "m", "--max-voxels", "5", "--max-decoded-mb", "1.5"])
    assert serve.limits_from_args(args, serve.SERVICE_LIMITS) == DecodeLimits(
        serve.SERVICE_LIMITS.max_pixels, 5, int(1.5 * (1 << 20)))


def test_cli_predict_records_bad_files_and_goes_on(model_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(_png((np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8)))
    files = {"bomb.png": png_header_bomb(9400, 9400), "ts.dcm": dicom_patched(b"1.2.840.10008.1.2.1\0",
                                                                              b"1.2.3.4.5.6.7.8.9.10"),
             "empty.nii.gz": b"", "deep.dcm": deep_sequence_dicom()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / n) for n in ("bomb.png", "ts.dcm")] + [str(good)] + \
        [str(tmp_path / n) for n in ("empty.nii.gz", "deep.dcm")] + [str(good), str(tmp_path / "missing.png")]
    skipped_csv = tmp_path / "skipped.csv"
    assert serve.main(["--model", str(model_dir), "--predict", *paths, "--skipped", str(skipped_csv)]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["file"] for line in lines] == paths
    assert ["error" in line for line in lines] == [True, True, False, True, True, False, True]
    assert "declares" in lines[0]["error"] and "unknown transfer syntax" in lines[1]["error"]
    assert lines[2]["probabilities"] == lines[5]["probabilities"]
    import pandas as pd

    table = pd.read_csv(skipped_csv)
    assert len(table) == 5 and set(table["stage"]) == {"predict"}


# ----------------------------------------------------------------------------- memory per upload (child process)

_CHILD = r"""
import json, os, re, resource, sys
from fastapi.testclient import TestClient
from lib import serve

def status():
    text = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) << 10 for k in ("VmHWM", "VmRSS", "VmSize")}

models, uploads, headroom = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
clients = [TestClient(serve.create_app(m, max_upload_mb=20)) for m in models]
warm = open(uploads[0][1], "rb").read()
for c in clients:
    for _ in range(2):
        assert c.post("/predict", files={"file": ("x", warm)}).status_code == 200
resource.setrlimit(resource.RLIMIT_AS, (status()["VmSize"] + headroom,) * 2)
out = []
for name, path in uploads:
    data = open(path, "rb").read()
    for i, c in enumerate(clients):
        open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
        base = status()["VmRSS"]
        r = c.post("/predict", files={"file": ("x", data)})
        out.append({"upload": name, "model": i, "status": r.status_code, "detail": r.json().get("detail", ""),
                    "peak_mb": (status()["VmHWM"] - base) / 2**20})
print(json.dumps(out))
"""


def _accepted_uploads(root: Path) -> dict[str, bytes]:
    """The largest uploads SERVICE_LIMITS accept, one per decoder path."""
    lim = serve.SERVICE_LIMITS
    side = int(lim.max_pixels**0.5)
    rgb_side = int(min(lim.max_pixels, lim.max_voxels // 3) ** 0.5)  # colour: 3 values per pixel
    rgb = np.zeros((rgb_side, rgb_side, 3), np.uint8)
    rgb[::7, ::5] = 200
    grey16 = np.zeros((side, side), np.uint16)
    grey16[::3] = 60000
    depth = lim.max_voxels // (400 * 400)
    vol = np.zeros((400, 400, depth), np.float32)
    vol[::9, ::4] = 1.5
    return {"png_rgb_max_pixels": _png(rgb), "png_16bit_max_pixels": _png(grey16),
            "nii_gz_float32_max_voxels": nifti_bytes(vol),
            "nii_gz_small_volume_huge_gzip_tail": deflate_zeros(nifti_bytes(VOL, gz=False), 1 << 30, True),
            "dicom_deflated_max_voxels": deflated_dicom(2 * 2000 * 2000 * (lim.max_voxels // 4_000_000), 2000, 2000,
                                                        lim.max_voxels // 4_000_000)}


def test_memory_per_upload_is_bounded(tmp_path: Path) -> None:
    """Peak RSS above the service's baseline while it handles each upload: < 1 GB for the largest accepted
    uploads on a 2D and a 3D model, and small for every refused bomb. Runs under RLIMIT_AS (+1.5 GB)."""
    models = [str(tiny_export(tmp_path / "m2d", {"size": 32, "channels": 3, "kind": "2d"})),
              str(tiny_export(tmp_path / "m3d", {"size": 32, "channels": 1, "kind": "3d", "n_slices": 8}))]
    warm = tmp_path / "warm.png"
    warm.write_bytes(_png((np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8)))
    uploads = [("warm", str(warm))]
    bombs = {"png_9400": png_header_bomb(9400, 9400), "nii_gz_200mb": nifti_header_bomb((1000, 1000, 200),
                                                                                          payload=200_000_000),
             "dicom_deflate_300mb": deflated_dicom(300 << 20),
             "dicom_rle": dicom_encapsulated(uids.RLELossless, [rle_bomb()], BitsAllocated=8, BitsStored=8, HighBit=7),
             "dicom_j2k": dicom_encapsulated(uids.JPEG2000Lossless, [j2k_codestream(60_000, 60_000)])}
    accepted = _accepted_uploads(tmp_path)
    for name, data in {**bombs, **accepted}.items():
        assert len(data) < 20 << 20, name
        (tmp_path / name).write_bytes(data)
        uploads.append((name, str(tmp_path / name)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(models), json.dumps(uploads), str(3 << 29)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    report = "\n".join(f"{r['upload']:36s} model {r['model']} -> {r['status']} peak +{r['peak_mb']:.0f} MB"
                       for r in rows)
    print(report)
    for r in rows:
        expected = 413 if r["upload"] in bombs else 200
        assert r["status"] == expected, report + "\n" + str(r)
        assert r["peak_mb"] < 1024, report
        if r["upload"] in bombs:
            assert r["peak_mb"] < 128, report
