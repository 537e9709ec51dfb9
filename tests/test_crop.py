"""Organ crops: geometry (affine, margins, 2.5D edges), layouts, caching and bad inputs."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from lib import config, crop
from tests.conftest import shared

# An oblique-free but awkward grid: x flipped, y/z swapped, anisotropic spacing, odd origin (not RAS).
AFFINE = np.array([[-2.0, 0.0, 0.0, 40.0],
                   [0.0, 0.0, 3.0, -70.0],
                   [0.0, 2.5, 0.0, 12.5],
                   [0.0, 0.0, 0.0, 1.0]])
SHAPE = (30, 28, 24)
# A 3-cycle of axes (i -> y, j -> z, k -> x) catches code that confuses a permutation with its inverse.
CYCLIC = np.array([[0.0, 0.0, 1.8, -30.0],
                   [-2.2, 0.0, 0.0, 55.0],
                   [0.0, 3.1, 0.0, -8.0],
                   [0.0, 0.0, 0.0, 1.0]])


def _ramp(affine: np.ndarray = AFFINE, shape: tuple = SHAPE) -> np.ndarray:
    """HU that is a linear function of world position: any correct crop/resample reproduces it exactly."""
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = nib.affines.apply_affine(affine, ijk)
    return (xyz @ np.array([1.5, -0.7, 0.9]) - 20.0).reshape(shape).astype(np.float32)


def _ramp_at(xyz: np.ndarray) -> np.ndarray:
    return xyz @ np.array([1.5, -0.7, 0.9]) - 20.0


def _box_mask(lo=(10, 8, 6), hi=(18, 15, 12), shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def _img(arr: np.ndarray, affine: np.ndarray = AFFINE) -> nib.Nifti1Image:
    return nib.Nifti1Image(arr, affine)


def _save(arr: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def _crop_world(c: crop.Crop) -> np.ndarray:
    ijk = np.indices(c.image.shape[:3]).reshape(3, -1).T
    return crop.world(c.affine, ijk)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("affine", [AFFINE, CYCLIC], ids=["swapped", "cyclic"])
@pytest.mark.parametrize("params", [
    crop.CropParams(fmt="nifti"),                       # plain slicing, LPS reorientation
    crop.CropParams(fmt="nifti", spacing=(1.7, 2.2, 4.0)),  # resampled
    crop.CropParams(),                                   # fixed 16x64x64 training sample
    crop.CropParams(fit="pad", size=(8, 20, 20)),
], ids=["nifti", "resampled", "fixed", "pad"])
def test_crop_keeps_world_coordinates(params, affine):
    """Every crop voxel holds the source value at the same world position (linear ramp => exact)."""
    hu = _ramp(affine)
    c = crop.crop_volume(_img(hu, affine), _box_mask(), params.validate())
    xyz = _crop_world(c)
    vals = c.image.reshape(-1)
    src = nib.affines.apply_affine(np.linalg.inv(affine), xyz)
    within = ((src >= 0) & (src <= np.array(SHAPE) - 1)).all(1)
    beyond = ~((src >= -0.5) & (src <= np.array(SHAPE) - 0.5)).all(1)
    assert within.mean() > 0.5
    np.testing.assert_allclose(vals[within], _ramp_at(xyz[within]), atol=1e-3)
    assert np.all(vals[beyond] == crop.AIR_HU)
    # the mask overlays the source mask at the same world positions
    assert crop.overlay_check({"image": c.image, "mask": c.mask, "affine": c.affine}, _box_mask(), affine) == 1.0


def test_plain_crop_voxel_identity_and_mask_overlay():
    """A voxel of the source and the crop voxel at the same world point have identical values."""
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, SHAPE).astype(np.int16)
    mask = _box_mask()
    c = crop.crop_volume(_img(hu), mask, crop.CropParams(fmt="nifti", margin_mm=5.0))
    src = np.rint(nib.affines.apply_affine(np.linalg.inv(AFFINE), _crop_world(c))).astype(int)
    np.testing.assert_array_equal(c.image.reshape(-1), hu[tuple(src.T)])
    assert crop.overlay_check({"image": c.image, "mask": c.mask, "affine": c.affine}, mask, AFFINE) == 1.0
    # the crop's voxel order is LPS whatever the source was
    assert nib.aff2axcodes(c.affine) == ("L", "P", "S")


def test_sample_npz_axes_follow_documented_convention(tmp_path):
    """image[s, h, w] is voxel (w, h, s) of the stored affine: checked through a written sample."""
    hu = _ramp()
    c = crop.crop_volume(_img(hu), _box_mask(), crop.CropParams(size=(6, 10, 12), window=(0, 400)))
    arrays = crop.to_sample(c, (0, 400))
    crop.save_npz(tmp_path / "a.npz", arrays)
    with np.load(tmp_path / "a.npz") as z:
        img, aff, sp = z["image"], z["affine"], z["spacing"]
    assert img.shape == (6, 10, 12) and img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1
    s, h, w = 2, 3, 7
    hu_expected = _ramp_at(crop.world(aff, np.array([[w, h, s]])))[0]
    assert img[s, h, w] == pytest.approx(np.clip((hu_expected + 200) / 400, 0, 1), abs=1e-4)
    np.testing.assert_allclose(sp, crop.voxel_sizes(aff)[::-1], rtol=1e-5)


def test_margin_in_mm_per_axis():
    sp = crop.voxel_sizes(AFFINE)  # (2, 2.5, 3) mm: axes 1 and 2 are swapped in the affine
    np.testing.assert_allclose(sp, [2.0, 2.5, 3.0])
    np.testing.assert_array_equal(crop.margin_voxels(10.0, sp), [5, 4, 4])
    np.testing.assert_array_equal(crop.margin_voxels((4.0, 5.0, 6.0), sp), [2, 2, 2])
    lo, hi = crop.add_margin(np.array([10, 8, 6]), np.array([18, 15, 12]), crop.margin_voxels(10.0, sp), SHAPE)
    np.testing.assert_array_equal(lo, [5, 4, 2])
    np.testing.assert_array_equal(hi, [23, 19, 16])
    # clipped at the volume
    lo, hi = crop.add_margin(np.array([1, 0, 20]), np.array([4, 3, 24]), crop.margin_voxels(10.0, sp), SHAPE)
    np.testing.assert_array_equal(lo, [0, 0, 16])
    np.testing.assert_array_equal(hi, [9, 7, 24])


@pytest.mark.parametrize("affine", [AFFINE, CYCLIC], ids=["swapped", "cyclic"])
def test_margin_in_world_space(affine):
    """The crop reaches at least margin_mm beyond the mask on each side, and less than one voxel more."""
    mask = _box_mask()
    c = crop.crop_volume(_img(_ramp(affine), affine), mask, crop.CropParams(fmt="nifti", margin_mm=7.0))
    mask_xyz = crop.world(affine, np.argwhere(mask))
    crop_xyz = _crop_world(c)
    for ax in range(3):
        below = mask_xyz[:, ax].min() - crop_xyz[:, ax].min()
        above = crop_xyz[:, ax].max() - mask_xyz[:, ax].max()
        step = crop.voxel_sizes(c.affine)[ax]
        assert 7.0 <= below < 7.0 + step and 7.0 <= above < 7.0 + step, (ax, below, above)


def test_25d_stacks_repeat_edge_slices():
    """Neighbours beyond the first/last slice repeat the edge slice; inside they are the next slices."""
    hu = np.zeros((12, 12, 5), np.float32) + np.arange(5, dtype=np.float32) * 100  # slice z has HU 100*z
    mask = np.zeros(hu.shape, bool)
    mask[4:8, 4:8, :] = True  # organ spans the whole z range
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    c = crop.crop_volume(_img(hu, aff), mask, crop.CropParams(mode="25d", k=3, size=None, margin_mm=0))
    assert c.image.shape == (4, 4, 5, 3)
    z_values = c.image[0, 0]  # (z, k): one value per slice and channel
    np.testing.assert_allclose(z_values[0], [0, 0, 100])  # first slice: below is clamped
    np.testing.assert_allclose(z_values[2], [100, 200, 300])
    np.testing.assert_allclose(z_values[-1], [300, 400, 400])  # last slice: above is clamped
    arrays = crop.to_sample(c, (500, 1000))
    assert arrays["stack"].shape == (5, 3, 4, 4) and arrays["image"].shape == (5, 4, 4)
    assert arrays["stack"].dtype == arrays["image"].dtype == np.float32
    np.testing.assert_array_equal(arrays["image"], arrays["stack"][:, 1])


def test_25d_k5_at_edge_of_fixed_size_sample():
    hu = np.zeros((20, 20, 6), np.float32) + np.arange(6, dtype=np.float32)[None, None] * 10
    mask = np.zeros(hu.shape, bool)
    mask[5:15, 5:15, 0:2] = True  # organ on the first two slices only
    c = crop.crop_volume(_img(hu, np.eye(4)), mask, crop.CropParams(mode="25d", k=5, size=(2, 8, 8), margin_mm=0))
    np.testing.assert_allclose(c.image[4, 4, 0], [0, 0, 0, 10, 20])  # slices -2, -1 repeat slice 0
    np.testing.assert_allclose(c.image[4, 4, 1], [0, 0, 10, 20, 30])


def test_seg_mode_blanks_outside_dilated_mask():
    hu = np.full(SHAPE, 50, np.int16)
    mask = _box_mask()
    c = crop.crop_volume(_img(hu), mask, crop.CropParams(mode="seg", fmt="nifti", margin_mm=15, dilate_mm=3.0,
                                                         background_hu=-1000))
    near = crop.dilate_mm(c.mask > 0, crop.voxel_sizes(c.affine), 3.0)
    assert (c.image[near] == 50).all() and (c.image[~near] == -1000).all() and (~near).any()


def test_bbox_helpers():
    m = _box_mask()
    lo, hi = crop.bbox_of(m)
    np.testing.assert_array_equal(lo, [10, 8, 6])
    np.testing.assert_array_equal(hi, [18, 15, 12])
    assert crop.bbox_of(np.zeros((3, 3, 3))) is None
    lab = m.astype(np.uint8) * 5
    lab[0:2, 0:2, 0:2] = 2
    boxes = crop.label_bboxes(lab)
    assert set(boxes) == {2, 5}
    np.testing.assert_array_equal(boxes[5][0], [10, 8, 6])


def test_parse_class_map_formats():
    assert crop.parse_class_map({"1": "spleen", "2": "liver"}) == {1: "spleen", 2: "liver"}
    assert crop.parse_class_map({"total": {"5": "liver"}, "total_mr": {"1": "x"}}, "total") == {5: "liver"}
    assert crop.parse_class_map({"labels": {"background": 0, "liver": 1, "tumour": 2}}) == {1: "liver", 2: "tumour"}
    assert crop.parse_class_map({"labels": {"0": "background", "1": "pancreas"}}) == {1: "pancreas"}


# ----------------------------------------------------------------------------- batch, layouts, cache


def _labels(shape=SHAPE) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[_box_mask(shape=shape)] = 5  # liver
    lab[_box_mask((2, 2, 2), (7, 6, 5), shape)] = 1  # spleen
    return lab


CMAP = {1: "spleen", 5: "liver", 4: "gallbladder"}


def test_crop_cohort_index_and_cache(tmp_path):
    img = _save(_ramp().astype(np.int16), tmp_path / "in" / "a_ct.nii.gz")
    seg = _save(_labels(), tmp_path / "in" / "a_seg.nii.gz")
    les = np.zeros(SHAPE, np.uint8)
    les[12:14, 10:12, 8:9] = 1
    les[3, 3, 3] = 2  # a lesion of another organ (spleen): not part of the liver crop
    les_p = _save(les, tmp_path / "in" / "a_les.nii.gz")
    cases = pd.DataFrame([crop.case_row("a", img, seg, "multilabel", CMAP, les_p, patient_id="P1")])
    out = tmp_path / "crops"
    index, skipped = crop.crop_cohort(cases, ["liver", "spleen"], out, progress=False)
    assert skipped.empty and index.attrs["computed"] == 1
    assert list(index.columns) == crop.INDEX_COLUMNS and len(index) == 2
    liver = index.set_index("structure").loc["liver"]
    assert liver.voxels == _box_mask().sum() and liver.lesion_voxels == 4 and liver.patient_id == "P1"
    assert liver.bbox == "5:23,4:19,2:16" and liver["shape"] == "16x64x64"
    with np.load(out / liver.path) as z:
        assert z["image"].shape == z["mask"].shape == z["lesion"].shape == (16, 64, 64)
        assert z["lesion"].max() == 1  # the spleen's lesion was dropped from the liver crop
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")}

    again, _ = crop.crop_cohort(cases, ["liver", "spleen"], out, progress=False)
    assert again.attrs["computed"] == 0
    pd.testing.assert_frame_equal(again, index)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")} == written

    os.utime(seg, ns=(seg.stat().st_atime_ns, seg.stat().st_mtime_ns + 10**9))  # input touched
    assert crop.crop_cohort(cases, ["liver", "spleen"], out, progress=False)[0].attrs["computed"] == 1
    changed, _ = crop.crop_cohort(cases, ["liver", "spleen"], out, margin_mm=3.0, progress=False)  # new param
    assert changed.attrs["computed"] == 1 and changed.set_index("structure").loc["liver"].bbox != liver.bbox

    (out / liver.path).unlink()  # an output deleted by hand is rewritten
    assert crop.crop_cohort(cases, ["liver", "spleen"], out, margin_mm=3.0, progress=False)[0].attrs["computed"] == 1

    crop.crop_cohort(cases, ["liver"], out, mode="bbox", fmt="nifti", progress=False)  # another sub-folder
    full = crop.read_index(out)
    assert set(full.path.str.split("/").str[0]) == {"bbox", "bbox3d"} and len(full) == 3


def test_bad_inputs_are_skipped_with_reasons(tmp_path):
    d = tmp_path / "in"
    good_img = _save(_ramp().astype(np.int16), d / "good.nii.gz")
    good_seg = _save(_labels(), d / "good_seg.nii.gz")
    other = _labels()
    other[_box_mask()] = 0  # liver absent
    rows = [
        crop.case_row("good", good_img, good_seg, "multilabel", CMAP),
        crop.case_row("no_mask_file", good_img, d / "missing_seg.nii.gz", "multilabel", CMAP),
        crop.case_row("no_mask_given", good_img, "", "multilabel", CMAP),
        crop.case_row("shape", good_img, _save(_labels((30, 28, 20)), d / "shape_seg.nii.gz"), "multilabel", CMAP),
        crop.case_row("affine", good_img, _save(_labels(), d / "aff_seg.nii.gz", AFFINE + np.diag([0, 0, 0.5, 0])),
                      "multilabel", CMAP),
        crop.case_row("empty", good_img, _save(other, d / "empty_seg.nii.gz"), "multilabel", CMAP),
    ]
    corrupt = d / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(nib.Nifti1Image(_ramp(), AFFINE).to_bytes())[:4000])
    rows.append(crop.case_row("corrupt", corrupt, good_seg, "multilabel", CMAP))
    nan = _ramp()
    nan[3, 3, 3] = np.nan
    rows.append(crop.case_row("nan", _save(nan, d / "nan.nii.gz"), good_seg, "multilabel", CMAP))
    index, skipped = crop.crop_cohort(pd.DataFrame(rows), ["liver", "livr"], tmp_path / "crops", progress=False)
    assert list(index.case_id.unique()) == ["good"] and list(index.structure) == ["liver"]
    reason = skipped.groupby("case").reason.apply(" | ".join)
    files = skipped.set_index("case").file
    assert "file not found" in reason["no_mask_file"] and "missing_seg" in files["no_mask_file"]
    assert "no mask" in reason["no_mask_given"]
    assert "shape" in reason["shape"]
    assert "affine" in reason["affine"]
    assert "'liver' is empty" in reason["empty"]
    assert "truncated" in reason["corrupt"] or "unreadable" in reason["corrupt"]
    assert "NaN" in reason["nan"]
    assert "unknown structure 'livr' (did you mean liver?)" in reason["good"] and "spleen" in reason["good"]
    assert set(skipped.stage) == {"crop"}
    for f in d.iterdir():  # raw inputs untouched
        assert f.stat().st_size > 0


def test_totalseg_folder_and_nnunet_layouts(tmp_path):
    # TotalSegmentator default output: one binary file per structure
    root = tmp_path / "ts"
    _save(_ramp().astype(np.int16), root / "s01" / "ct.nii.gz")
    _save(_box_mask().astype(np.uint8), root / "s01" / "segmentations" / "liver.nii.gz")
    _save(np.zeros(SHAPE, np.uint8), root / "s01" / "segmentations" / "gallbladder.nii.gz")
    cases = crop.discover_cases(root)
    assert list(cases.mask_kind) == ["folder"] and cases.case_id.tolist() == ["s01"]
    index, skipped = crop.crop_cohort(cases, ["liver", "gallbladder", "spleen"], tmp_path / "c1", progress=False)
    assert index.structure.tolist() == ["liver"]
    reason = " | ".join(skipped.reason)
    assert "'gallbladder' is empty" in reason and "unknown structure 'spleen'" in reason

    # nnU-Net / MSD: imagesTr/CASE_0000 + labelsTr/CASE + dataset.json (v2 label order)
    nn = tmp_path / "Dataset001"
    _save(_ramp().astype(np.int16), nn / "imagesTr" / "liv_001_0000.nii.gz")
    _save(_ramp().astype(np.int16), nn / "imagesTr" / "liv_001_0001.nii.gz")  # second channel: ignored
    _save(_labels(), nn / "labelsTr" / "liv_001.nii.gz")
    _save(_ramp().astype(np.int16), nn / "imagesTr" / "liv_002_0000.nii.gz")  # label missing
    (nn / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "spleen": 1, "liver": 5}}))
    cases = crop.discover_cases(nn)
    assert cases.case_id.tolist() == ["liv_001", "liv_002"]
    index, skipped = crop.crop_cohort(cases, ["liver"], tmp_path / "c2", progress=False)
    assert index.case_id.tolist() == ["liv_001"]
    assert skipped.case.tolist() == ["liv_002"] and "file not found" in skipped.reason[0]


def test_two_workers_match_one(tmp_path, smoke_cohort):
    cases = crop.discover_cases(smoke_cohort).head(3)
    one, _ = crop.crop_cohort(cases, ["liver", "spleen"], tmp_path / "w1", progress=False, workers=1)
    two, _ = crop.crop_cohort(cases, ["liver", "spleen"], tmp_path / "w2", progress=False, workers=2)
    pd.testing.assert_frame_equal(one, two)
    for rel in one.path:
        a, b = crop.load_crop(tmp_path / "w1", rel), crop.load_crop(tmp_path / "w2", rel)
        np.testing.assert_array_equal(a["image"], b["image"])


def test_synthetic_cohort_every_organ_and_overlay(tmp_path, smoke_cohort):
    cases = crop.discover_cases(smoke_cohort)
    index, skipped = crop.crop_cohort(cases, crop.DEFAULT_STRUCTURES, tmp_path, mode="seg", progress=False)
    assert skipped.empty and len(index) == len(cases) * len(crop.DEFAULT_STRUCTURES)
    assert (index.lesion_voxels > 0).any()
    row = index.iloc[0]
    case = cases.set_index("case_id").loc[row.case_id]
    seg = nib.load(case["mask"])
    label = {v: int(k) for k, v in json.loads(case["class_map"]).items()}[row.structure]
    agree = crop.overlay_check(crop.load_crop(tmp_path, row.path), np.asanyarray(seg.dataobj) == label, seg.affine)
    assert agree == 1.0


def test_real_totalsegmentator_example(tmp_path):
    root = shared("ct-totalseg")
    cases = crop.discover_cases(root, image_glob="example_ct*.nii.gz")
    by_id = cases.set_index("case_id")
    assert by_id.loc["example_ct_sm", "mask"].endswith("example_seg.nii.gz")  # paired by grid, not by name
    index, skipped = crop.crop_cohort(cases, ["liver", "pancreas", "kidney_left"], tmp_path, fmt="nifti",
                                      progress=False)
    assert set(index.structure) == {"liver", "pancreas", "kidney_left"}
    assert "example_ct" in set(skipped.case)  # the 112-slice CT has no mask with its grid
    liver = index.set_index("structure").loc["liver"]
    assert liver.voxels == 38634  # matches the count in ../shared/data/README.md
    seg = nib.load(by_id.loc["example_ct_sm", "mask"])
    assert crop.overlay_check(crop.load_crop(tmp_path, liver.path), np.asanyarray(seg.dataobj) == 5, seg.affine) == 1.0


# ----------------------------------------------------------------------------- added with notebook 02


def test_overlay_check_detects_a_misplaced_crop():
    """The world-coordinate check is not vacuous: a crop whose affine is off by one voxel fails it."""
    mask = _box_mask()
    c = crop.crop_volume(_img(_ramp()), mask, crop.CropParams(fmt="nifti", margin_mm=4.0))
    good = {"image": c.image, "mask": c.mask, "affine": c.affine}
    assert crop.overlay_check(good, mask, AFFINE) == 1.0
    shifted = c.affine @ np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    assert crop.overlay_check({**good, "affine": shifted}, mask, AFFINE) < 0.99


def test_resampling_to_target_spacing_and_window_presets():
    c = crop.crop_volume(_img(_ramp()), _box_mask(), crop.CropParams(fmt="nifti", spacing=(1.0, 1.5, 2.0)))
    np.testing.assert_allclose(crop.voxel_sizes(c.affine), [1.0, 1.5, 2.0], atol=1e-9)
    hu = np.array([-45.0, 30.0, 105.0, 500.0])  # liver preset: level 30, width 150
    s = crop.to_sample(crop.Crop(hu.reshape(1, 1, 4), np.zeros((1, 1, 4), np.uint8), None, np.eye(4),
                                 np.ones(3)), "liver")
    np.testing.assert_allclose(s["image"].ravel(), [0.0, 0.5, 1.0, 1.0])
    assert crop.window_of("bone") == (400.0, 1800.0) and crop.window_of((50, 350)) == (50.0, 350.0)
    with pytest.raises(ValueError, match="abdomen"):
        crop.CropParams(window="lungs").validate()


def _tree(folder: Path) -> dict:
    """Every file under a folder with its content digest and mtime (to prove nothing was written there)."""
    import hashlib

    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_raw_inputs_are_never_written(tmp_path):
    """Cropping (good and bad cases, every mode, NIfTI and npz) leaves the input folder byte-identical."""
    d = tmp_path / "raw"
    img = _save(_ramp().astype(np.int16), d / "a.nii.gz")
    seg = _save(_labels(), d / "a_seg.nii.gz")
    bad = d / "b.nii.gz"
    bad.write_bytes(gzip.compress(nib.Nifti1Image(_ramp(), AFFINE).to_bytes())[:3000])
    cases = pd.DataFrame([crop.case_row("a", img, seg, "multilabel", CMAP),
                          crop.case_row("b", bad, seg, "multilabel", CMAP)])
    before = _tree(d)
    for mode in crop.MODES:
        crop.crop_cohort(cases, ["liver", "spleen"], tmp_path / "out", mode=mode, progress=False)
    crop.crop_cohort(cases, ["liver"], tmp_path / "out", fmt="nifti", progress=False)
    assert _tree(d) == before


def test_msd_layout_without_channel_suffix(tmp_path):
    """Decathlon names images like labels (imagesTr/X.nii.gz): a name ending in _0001 is a case, not a channel."""
    root = tmp_path / "Task03_Liver"
    _save(_ramp().astype(np.int16), root / "imagesTr" / "liver_0001.nii.gz")
    _save(_labels(), root / "labelsTr" / "liver_0001.nii.gz")
    _save(_ramp().astype(np.int16), root / "imagesTr" / "._liver_0001.nii.gz")  # macOS junk
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "5": "liver"}}))
    cases = crop.discover_cases(root)
    assert cases.case_id.tolist() == ["liver_0001"] and cases["mask"][0].endswith("labelsTr/liver_0001.nii.gz")
    index, skipped = crop.crop_cohort(cases, ["liver"], tmp_path / "c", progress=False)
    assert skipped.empty and index.voxels.tolist() == [int(_box_mask().sum())]


def test_open_cases_verify_overlay_and_sizes(tmp_path, smoke_cohort, monkeypatch):
    cases, root = crop.open_cases(smoke_cohort)  # a folder path: layout detected
    assert root == smoke_cohort and (cases.mask_kind == "multilabel").all()
    cases = cases.head(2)
    idx_npz, _ = crop.crop_cohort(cases, ["liver", "pancreas"], tmp_path, mode="25d", progress=False)
    idx_nii, _ = crop.crop_cohort(cases, ["liver", "pancreas"], tmp_path, fmt="nifti", progress=False)
    index = pd.concat([idx_npz, idx_nii], ignore_index=True)
    checked = crop.verify_overlay(index, cases, tmp_path)
    assert len(checked) == 8 and (checked.overlay == 1.0).all()
    sizes = crop.crop_sizes(index).set_index(["kind", "case_id", "structure"])
    nii = sizes.loc[("nifti 3D", cases.case_id[0], "liver")]
    box = [tuple(map(int, ab.split(":"))) for ab in nii.bbox.split(",")]
    sp = crop.voxel_sizes(nib.load(cases["image"][0]).affine)
    box_mm = sorted((b - a) * s for (a, b), s in zip(box, sp, strict=True))  # source axis order may differ
    assert sorted([nii.x_mm, nii.y_mm, nii.z_mm]) == pytest.approx(box_mm, rel=1e-3)
    assert sizes.loc[("npz sample", cases.case_id[0], "liver")].z_mm == pytest.approx(nii.z_mm, rel=1e-3)
    # relative dataset paths resolve against the repository when run from notebooks/
    monkeypatch.chdir(crop.config.NOTEBOOKS)
    assert config.data_path("data/README.md") == (config.ROOT / "data" / "README.md").resolve()


def test_ensure_crops_writes_the_stage_contract(tmp_path):
    """What notebook 03 calls when crops are missing: crops/index.csv + skipped_crop.csv in run_dir."""
    index = crop.ensure_crops(tmp_path, "smoke", structures=["liver", "spleen"])
    assert (tmp_path / "crops" / "index.csv").exists() and (tmp_path / "skipped_crop.csv").exists()
    on_disk = crop.read_index(tmp_path / "crops")
    assert list(on_disk.columns) == crop.INDEX_COLUMNS and len(on_disk) == len(index) > 0
    assert set(on_disk["mode"]) == {"bbox"} and on_disk.path.str.endswith(".npz").all()
    assert crop.ensure_crops(tmp_path, "smoke", structures=["liver", "spleen"]).attrs["computed"] == 0


def test_singleton_4d_is_a_volume_but_a_series_is_refused(tmp_path):
    d = tmp_path / "in"
    seg = _save(_labels(), d / "seg.nii.gz")
    one = _save(_ramp().astype(np.int16)[..., None], d / "one.nii.gz")  # (x, y, z, 1), as some converters write
    two = _save(np.stack([_ramp()] * 2, -1).astype(np.int16), d / "two.nii.gz")
    cases = pd.DataFrame([crop.case_row("one", one, seg, "multilabel", CMAP),
                          crop.case_row("two", two, seg, "multilabel", CMAP)])
    index, skipped = crop.crop_cohort(cases, ["liver"], tmp_path / "c", fmt="nifti", progress=False)
    assert index.case_id.tolist() == ["one"] and index["shape"][0].count("x") == 2
    assert skipped.case.tolist() == ["two"] and "one 3D volume" in skipped.reason[0] and "two" in skipped.file[0]


@pytest.mark.parametrize("spacing,mm", [((0.8, 0.8, 2.5), 5.0), ((3.1, 3.1, 9.4), 5.0), ((1.0, 1.3, 0.7), 3.0),
                                        ((0.7, 0.7, 1.0), 8.0)])
def test_dilate_mm_ball_equals_distance_transform(spacing, mm):
    """The fast run-length ball dilation and the exact distance transform select the same voxels."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    mask = rng.random((40, 36, 20)) > 0.995
    mask[0, 5, 3] = True  # at the border
    exact = ndimage.distance_transform_edt(~mask, sampling=spacing) <= mm
    np.testing.assert_array_equal(crop.dilate_mm(mask, spacing, mm), exact)
    assert crop.ball_mm(spacing, mm).sum() > 1


@pytest.mark.parametrize("labels", [{"background": 0, "spleen": 1, "liver": 5},  # nnU-Net v2: name -> label
                                    {"0": "background", "1": "spleen", "5": "liver"}],  # v1 / MSD: label -> name
                         ids=["nnunet-v2", "nnunet-v1"])
def test_eda_opens_the_nnunet_folder_that_crop_crops(tmp_path, labels):
    """Notebook 00 and notebook 02 read a folder through one case table and one class-map reader."""
    from lib import eda

    nn = tmp_path / "Dataset002_Abd"
    for case in ("abd_001", "abd_002"):
        _save(_ramp().astype(np.int16), nn / "imagesTr" / f"{case}_0000.nii.gz")
        _save(_labels(), nn / "labelsTr" / f"{case}.nii.gz")
    (nn / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels}))
    ds = eda.open_dataset(nn)
    assert ds.class_map == {1: "spleen", 5: "liver"} == crop.load_class_map(nn / "dataset.json")
    assert ds.cases.case_id.tolist() == ["abd_001", "abd_002"] and ds.name == nn.name
    cases_stats, organs, skipped = eda.case_statistics(ds, ["liver", "spleen"])
    assert len(cases_stats) == 2 and not len(skipped)
    assert organs.set_index(["case_id", "structure"]).loc[("abd_001", "liver"), "voxels"] == _box_mask().sum()
    cases, root = crop.open_cases(nn)
    assert root == nn and cases.case_id.tolist() == ds.cases.case_id.tolist()
    index, skipped = crop.crop_cohort(cases, ["liver", "spleen"], tmp_path / "crops", progress=False)
    assert skipped.empty and sorted(index.structure.unique()) == ["liver", "spleen"] and len(index) == 4
