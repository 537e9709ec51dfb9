"""lib.imageio on real DICOM/PNG/JPEG/NIfTI files from ../shared/data and on deliberately broken files."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from lib import imageio
from lib.io import DataError
from tests.conftest import shared

PYDICOM = ("dicom-samples", "pydicom")
PHILIPS = ("dicom-samples", "mr-philips-epi-magdeburg2014")
CT_SERIES = ("ct-totalseg", "example_ct_dicom")


def _dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def ct_series() -> nib.Nifti1Image:
    return imageio.read_dicom_series(shared(*CT_SERIES))


# ----------------------------------------------------------------------------- sniffing


def test_sniff_by_content_not_name() -> None:
    png_named_jpg = shared("brain-mri-tumor", "no", "No15.jpg")
    assert imageio.sniff_type(png_named_jpg.read_bytes()) == "png"
    assert imageio.sniff_type(shared("brain-mri-tumor", "yes", "Y1.jpg").read_bytes()) == "jpeg"
    # CT_small's 128-byte preamble is a TIFF header (dual-format file): DICM must win
    assert imageio.sniff_type(shared(*PYDICOM, "CT_small.dcm").read_bytes()) == "dicom"
    assert imageio.sniff_type(shared(*PYDICOM, "rtstruct.dcm").read_bytes()) == "dicom"  # no preamble
    assert imageio.sniff_type(shared("ct-totalseg", "example_ct_sm.nii.gz").read_bytes()) == "nifti"
    assert imageio.sniff_type(b"%PDF-1.4 hello") is None
    assert imageio.sniff_type(gzip.compress(b"not a nifti" * 100)) is None


def test_png_named_jpg_reads_and_preprocesses() -> None:
    path = shared("brain-mri-tumor", "no", "No15.jpg")
    arr, meta = imageio.read_image_with_meta(path)
    assert meta["type"] == "png" and arr.ndim == 3 and arr.shape[-1] == 3
    x = imageio.load_input(path, {"size": 64, "channels": 1})
    assert x.shape == (1, 64, 64) and x.dtype == np.float32
    assert 0.0 <= x.min() < 0.1 and 0.9 < x.max() <= 1.0


def test_16bit_png_keeps_depth(tmp_path: Path) -> None:
    from PIL import Image

    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 15).astype(np.uint16)
    p = tmp_path / "ramp.bin"
    Image.fromarray(ramp).save(p, format="PNG")
    arr = imageio.read_image(p)
    assert arr.shape == (64, 64) and arr.max() == ramp.max() > 255
    np.testing.assert_array_equal(arr, ramp.astype(np.float32))


# ----------------------------------------------------------------------------- single DICOM files


def test_ct_small_hounsfield() -> None:
    path = shared(*PYDICOM, "CT_small.dcm")
    raw = pydicom.dcmread(path).pixel_array.astype(np.float32)
    hu = imageio.read_image(path)
    np.testing.assert_array_equal(hu, raw - 1024.0)  # intercept -1024, slope 1
    assert -1100 <= hu.min() < -800, "air/lung should be near -1000 HU"
    assert 500 < hu.max() < 3100, "bone should be several hundred HU"
    w = imageio.read_image(path, window="abdomen")
    np.testing.assert_allclose(w, imageio.apply_window(hu, 40, 400))
    assert w.min() == 0.0 and w.max() == 1.0


def test_mr_small_no_rescale_and_voi_window() -> None:
    path = shared(*PYDICOM, "MR_small.dcm")
    raw = pydicom.dcmread(path).pixel_array.astype(np.float32)
    np.testing.assert_array_equal(imageio.read_image(path), raw)
    voi = imageio.read_image(path, window="voi")  # WindowCenter 600 / WindowWidth 1600 in the file
    np.testing.assert_allclose(voi, np.clip((raw - (600 - 800)) / 1600, 0, 1), atol=1e-6)


def test_philips_slope_applied() -> None:
    files = sorted(shared(*PHILIPS, "In", "Magdeburg_2014", "fmri").glob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    slope = float(ds.RescaleSlope)
    assert abs(slope - 1.29035) < 1e-4
    np.testing.assert_allclose(imageio.read_image(files[0]), ds.pixel_array * slope, rtol=1e-6)


def test_philips_series_matches_dcm2niix_reference() -> None:
    """27 files = 9 positions x 3 time points -> (64, 64, 9, 3), same grid as dcm2niix's NIfTI (which flips rows)."""
    img = imageio.read_dicom_series(shared(*PHILIPS, "In", "Magdeburg_2014", "fmri"))
    ref = nib.load(shared(*PHILIPS, "Ref", "EPI_asc_CLEAR_201.nii"))
    assert img.shape == ref.shape == (64, 64, 9, 3)
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, img.shape[1] - 1  # dcm2niix stores rows bottom-up
    np.testing.assert_allclose(img.affine @ flip, ref.affine, atol=0.02)
    # the reference header says vox_offset 0 (invalid for .nii): read its int16 voxels after the 352-byte header
    path = shared(*PHILIPS, "Ref", "EPI_asc_CLEAR_201.nii")
    stored = np.frombuffer(path.read_bytes()[352:], dtype=ref.header.get_data_dtype()).reshape(ref.shape, order="F")
    ours = np.asanyarray(img.dataobj)[:, ::-1] / 1.29035409035409  # reference keeps stored values (no scl_slope)
    np.testing.assert_allclose(ours, stored, atol=1e-2)


def test_seg_single_frame_binary() -> None:
    path = shared(*PYDICOM, "liver_1frame.dcm")
    arr, meta = imageio.read_image_with_meta(path)
    assert arr.shape == (512, 512) and set(np.unique(arr)) == {0.0, 1.0}
    assert int(arr.sum()) == int(pydicom.dcmread(path).pixel_array.sum()) > 1000
    assert meta["dicom"]["Modality"] == "SEG"


def test_multiframe_choose_frame_or_all() -> None:
    path = shared(*PYDICOM, "rtdose.dcm")
    ds = pydicom.dcmread(path)
    allf = imageio.read_image(path)
    assert allf.shape == (int(ds.NumberOfFrames), 10, 10)
    np.testing.assert_allclose(allf, ds.pixel_array * float(ds.DoseGridScaling), rtol=1e-6)
    np.testing.assert_array_equal(imageio.read_image(path, frame=3), allf[3])
    with pytest.raises(DataError, match="frame 15 out of range"):
        imageio.read_image(path, frame=15)


def test_monochrome1_inverted_but_hu_kept() -> None:
    mr = pydicom.dcmread(shared(*PYDICOM, "MR_small.dcm"))
    normal = imageio.read_image(_dicom_bytes(mr))
    mr.PhotometricInterpretation = "MONOCHROME1"
    inverted = imageio.read_image(_dicom_bytes(mr))
    total = normal + inverted
    assert np.ptp(total) == 0  # mirrored: v -> const - v
    assert np.corrcoef(normal.ravel(), inverted.ravel())[0, 1] < -0.999
    voi_inv = imageio.read_image(_dicom_bytes(mr), window="voi")
    np.testing.assert_allclose(voi_inv, 1 - imageio.read_image(shared(*PYDICOM, "MR_small.dcm"), window="voi"))
    ct = pydicom.dcmread(shared(*PYDICOM, "CT_small.dcm"))
    ct.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_array_equal(imageio.read_image(_dicom_bytes(ct)), ct.pixel_array - 1024.0)


def test_rgb_dicom() -> None:
    from tests.conftest import secondary_capture

    rgb = np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)
    ds = secondary_capture("OT")
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 32, 40, 3, "RGB"
    ds.PlanarConfiguration, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 0, 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    arr = imageio.read_image(_dicom_bytes(ds))
    np.testing.assert_array_equal(arr, rgb.astype(np.float32))
    assert imageio.preprocess(arr, {"size": 16, "channels": 3}).shape == (3, 16, 16)


# ----------------------------------------------------------------------------- DICOM series


def test_ct_series_ordered_hu_and_affine(ct_series: nib.Nifti1Image) -> None:
    folder = shared(*CT_SERIES)
    assert ct_series.shape == (512, 512, 20)
    z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in folder.iterdir()]
    a = ct_series.affine
    assert a[2, 3] == pytest.approx(min(z)) and a[2, 2] == pytest.approx(2.0)  # ascending along the normal
    np.testing.assert_allclose(np.abs(np.diag(a)[:3]), [0.9765625, 0.9765625, 2.0])
    assert nib.aff2axcodes(a) == ("L", "P", "S")
    data = np.asanyarray(ct_series.dataobj)
    assert data.min() == -1024 and 1000 < data.max() < 3100
    # each k-slice is the file at that position (not filename or instance order)
    files = {round(float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]), 3): p
             for p in folder.iterdir()}
    for k in (0, 7, 19):
        zk = round(float(nib.affines.apply_affine(a, [0, 0, k])[2]), 3)
        np.testing.assert_array_equal(data[:, :, k].T, imageio.read_image(files[zk]))


def test_ct_series_matches_simpleitk(ct_series: nib.Nifti1Image) -> None:
    sitk = pytest.importorskip("SimpleITK")
    folder = str(shared(*CT_SERIES))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
    ref = reader.Execute()
    np.testing.assert_array_equal(np.asanyarray(ct_series.dataobj).transpose(2, 1, 0), sitk.GetArrayFromImage(ref))
    lps = np.eye(4)
    lps[:3, :3] = np.array(ref.GetDirection()).reshape(3, 3) * np.array(ref.GetSpacing())
    lps[:3, 3] = ref.GetOrigin()
    np.testing.assert_allclose(ct_series.affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-4)


def _bone_behind_body(img: nib.Nifti1Image) -> float:
    """World y (RAS: + is anterior) of the body centroid minus that of bone: > 0 when the spine is posterior."""
    d = np.asanyarray(img.dataobj)
    centroid = {k: nib.affines.apply_affine(img.affine, np.argwhere(m).mean(0)) for k, m in
                (("body", d > -300), ("bone", d > 250))}
    return float(centroid["body"][1] - centroid["bone"][1])


def test_ct_series_orientation_like_reference_nifti(ct_series: nib.Nifti1Image) -> None:
    """Same anatomical orientation as TotalSegmentator's example CT: spine/table posterior in world space."""
    ref = nib.load(shared("ct-totalseg", "example_ct.nii.gz"))
    assert _bone_behind_body(ref) > 10
    assert _bone_behind_body(ct_series) > 10  # a missing LPS->RAS flip would put it anterior


def test_series_nifti_slices_match_dicom_slices(ct_series: nib.Nifti1Image, tmp_path: Path) -> None:
    out = tmp_path / "ct.nii.gz"
    nib.save(ct_series, out)
    vol = imageio.read_image(out)
    assert vol.shape == (20, 512, 512)
    lowest = min(shared(*CT_SERIES).iterdir(),
                 key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    np.testing.assert_array_equal(vol[0], imageio.read_image(lowest))  # DICOM display orientation both ways


def test_dicom_series_to_nifti_refuses_raw_folder(tmp_path: Path) -> None:
    folder = shared(*CT_SERIES)
    with pytest.raises(ValueError, match="raw DICOM folder"):
        imageio.dicom_series_to_nifti(folder, folder / "out.nii.gz")


def test_series_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        imageio.read_dicom_series(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no DICOM image slices"):
        imageio.read_dicom_series(tmp_path)


def test_nifti_orientation_independent_of_storage(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(size=(12, 10, 6)).astype(np.float32)
    ras = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [11, 9]
    lps = nib.Nifti1Image(data[::-1, ::-1].copy(), ras.affine @ flip)  # same world image stored the other way round
    nib.save(ras, tmp_path / "a.nii.gz")
    nib.save(lps, tmp_path / "b.nii")
    a, b = imageio.read_image(tmp_path / "a.nii.gz"), imageio.read_image(tmp_path / "b.nii")
    assert a.shape == (6, 10, 12)
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- broken files


def test_broken_files_give_clear_errors(tmp_path: Path) -> None:
    ct = shared(*PYDICOM, "CT_small.dcm").read_bytes()
    with pytest.raises(DataError, match="truncated or corrupt DICOM"):
        imageio.read_image(ct[: len(ct) // 2], name="half.dcm")
    with pytest.raises(DataError, match="no pixel data"):
        imageio.read_image(shared(*PYDICOM, "rtstruct.dcm"))
    jpg = shared("brain-mri-tumor", "yes", "Y1.jpg").read_bytes()
    with pytest.raises(DataError, match="truncated or corrupt image"):
        imageio.read_image(jpg[: len(jpg) // 3])
    nii = shared("ct-totalseg", "example_ct_sm.nii.gz").read_bytes()
    with pytest.raises(DataError, match="truncated"):
        imageio.read_image(nii[: len(nii) // 2])
    with pytest.raises(DataError, match="unknown or unsupported file type"):
        imageio.read_image(b"GIF89a" + bytes(200))
    with pytest.raises(DataError, match="empty file"):
        imageio.read_image(b"")
    with pytest.raises(DataError, match="file not found"):
        imageio.read_image(tmp_path / "missing.png")


@pytest.mark.parametrize(("uid", "why"), [("1.2.840.10008.1.2.4.80", "no decoder plugin"),
                                          ("1.2.840.10008.1.2.4.100", "no decoder exists")])
def test_unsupported_transfer_syntax(uid: str, why: str) -> None:
    ds = pydicom.dcmread(shared(*PYDICOM, "MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = uid
    ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    with pytest.raises(DataError, match=f"unsupported transfer syntax .*{why}"):
        imageio.read_image(buf.getvalue())


def test_gzip_bomb_refused() -> None:
    bomb = gzip.compress(bytes(10_000))
    with pytest.raises(DataError, match="expands beyond"):
        imageio._gunzip(bomb, "bomb.gz", limit=1000)


# ----------------------------------------------------------------------------- windows, preprocess, privacy


def test_windows() -> None:
    assert set(imageio.WINDOWS) >= {"abdomen", "liver", "bone", "lung", "brain", "mediastinum"}
    w = imageio.apply_window(np.array([-1000, -160, 40, 240, 3000]), 40, 400)
    np.testing.assert_allclose(w, [0, 0, 0.5, 1, 1])
    assert w.dtype == np.float32
    assert imageio.resolve_window("Lung") == (-600.0, 1500.0)
    assert imageio.resolve_window({"level": 1, "width": 2}) == (1.0, 2.0)
    with pytest.raises(ValueError, match="unknown window preset"):
        imageio.resolve_window("kidney-ish")
    with pytest.raises(ValueError, match="width"):
        imageio.apply_window(np.zeros(3), 0, 0)


def test_preprocess_shapes_and_errors() -> None:
    vol = np.random.default_rng(2).normal(0, 200, (9, 40, 30)).astype(np.float32)
    assert imageio.preprocess(vol, {"size": 16, "channels": 1}).shape == (1, 16, 16)
    slab = imageio.preprocess(vol, {"size": [16, 20], "channels": 4, "kind": "slab", "window": "abdomen"})
    assert slab.shape == (4, 16, 20) and slab.min() >= 0 and slab.max() <= 1
    assert imageio.preprocess(vol, {"size": 16, "kind": "3d", "n_slices": 5}).shape == (1, 5, 16, 16)
    grey = imageio.preprocess(vol[0], {"size": 16, "channels": 3})
    np.testing.assert_array_equal(grey[0], grey[2])
    with pytest.raises(DataError, match="expects 2"):
        imageio.preprocess(np.zeros((20, 20, 3)), {"size": 16, "channels": 2})
    with pytest.raises(DataError, match="too small"):
        imageio.preprocess(np.zeros((4, 4)), {"size": 16})
    with pytest.raises(DataError, match="NaN"):
        imageio.preprocess(np.full((20, 20), np.nan), {"size": 16})


def test_no_identifying_tags_returned() -> None:
    path = shared(*PYDICOM, "CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert str(ds.PatientName) and str(ds.PatientID)  # the sample does carry (fake) identifiers
    _, meta = imageio.read_image_with_meta(path)
    text = json.dumps(meta)
    for tag in imageio.IDENTIFYING_TAGS:
        assert tag not in text
        value = str(ds.get(tag, "") or "")
        if len(value) > 3:
            assert value not in text, tag
    assert set(meta["dicom"]) <= set(imageio.SAFE_TAGS) | {"TransferSyntaxUID", "TransferSyntax"}
    assert not set(imageio.SAFE_TAGS) & set(imageio.IDENTIFYING_TAGS)

