"""Readers give clear, file-naming errors for bad input; batch skip tables record them."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from lib.io import DataError, SkippedCases, load_case, load_nifti


def _write(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as err:
        load_nifti(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(err.value)


def test_truncated_gzip(tmp_path):
    good = _write(tmp_path / "ct.nii.gz", np.zeros((8, 8, 8), np.int16))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match="bad.nii.gz.*(unreadable|truncated|not a readable)"):
        load_nifti(bad)


def test_not_a_nifti(tmp_path):
    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(gzip.compress(b"hello world" * 100))
    with pytest.raises(DataError, match="x.nii.gz"):
        load_nifti(bad)


def test_nan_voxels(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 1, 1] = np.nan
    with pytest.raises(DataError, match="1 NaN"):
        load_nifti(_write(tmp_path / "nan.nii.gz", data))


def test_shape_and_affine_mismatch(tmp_path):
    img = _write(tmp_path / "ct.nii.gz", np.zeros((8, 8, 8), np.int16))
    small = _write(tmp_path / "seg_small.nii.gz", np.zeros((8, 8, 7), np.uint8))
    with pytest.raises(DataError, match="seg_small.nii.gz: mask shape"):
        load_case(img, small)
    moved = _write(tmp_path / "seg_moved.nii.gz", np.zeros((8, 8, 8), np.uint8), np.diag([2.0, 1, 1, 1]))
    with pytest.raises(DataError, match="affine differs"):
        load_case(img, moved)
    image, mask = load_case(img, _write(tmp_path / "seg.nii.gz", np.zeros((8, 8, 8), np.uint8)))
    assert image.shape == mask.shape


def test_raw_files_are_not_written(tmp_path):
    path = _write(tmp_path / "ct.nii.gz", np.arange(512, dtype=np.int16).reshape(8, 8, 8))
    before = (path.stat().st_mtime_ns, path.read_bytes())
    load_case(path, path)
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before


def test_skipped_cases_table(tmp_path):
    skipped = SkippedCases()
    skipped.add("case1", DataError("/x/ct.nii.gz", "file not found"), stage="eda")
    skipped.add("case2", "empty mask for liver", stage="crop", path="/x/seg.nii.gz")
    df = skipped.to_frame()
    assert list(df.columns) == ["case", "stage", "file", "reason"] and len(skipped) == 2
    assert df.iloc[0].file == "/x/ct.nii.gz" and df.iloc[1].reason == "empty mask for liver"
    assert skipped.save(tmp_path / "skipped.csv").exists()


def test_header_checks_accept_qform_only_and_pixdim_only(tmp_path):
    """Valid orientations other than an sform are read, not refused: qform only, and pixdim only (no codes)."""
    from lib import imageio

    data = np.arange(8 * 6 * 4, dtype=np.int16).reshape(8, 6, 4)
    qform = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]))
    qform.header.set_sform(None, code=0)
    nib.save(qform, tmp_path / "q.nii.gz")
    bare = nib.Nifti1Image(data, None)
    bare.header.set_zooms((2.0, 2.0, 3.0))
    nib.save(bare, tmp_path / "bare.nii.gz")
    for name in ("q.nii.gz", "bare.nii.gz"):
        img = load_nifti(tmp_path / name)
        assert img.shape == (8, 6, 4) and abs(np.linalg.det(img.affine[:3, :3])) == pytest.approx(12.0)
        assert imageio.read_image(tmp_path / name).shape == (4, 6, 8)


def test_decode_limits_name_the_declared_size():
    from lib.io import DataTooLargeError, DecodeLimits

    limits = DecodeLimits(max_pixels=100, max_voxels=1000, max_bytes=1 << 20)
    limits.check("a.png", pixels=100, voxels=1000, nbytes=1 << 20)
    with pytest.raises(DataTooLargeError, match=r"a.png: PNG declares 101 pixels per image, above the limit of 100"):
        limits.check("a.png", pixels=101, what="PNG")
    with pytest.raises(DataTooLargeError, match=r"2.0 MiB of data, above the limit of 1.0 MiB"):
        limits.check("v.nii", nbytes=2 << 20)
