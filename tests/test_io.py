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
