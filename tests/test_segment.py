"""2D segmentation: TRUS generator, metrics/losses against references, bad inputs, affine-correct slices,
k-fold through the shared stages, inference, export, and the torch-free serving path."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lib import export, kfold, metrics
from lib import synth_trus as st
from lib.datasets import CachedDataset
from lib.io import DataError
from lib.segmentation import __main__ as cli
from lib.segmentation import data as sdata
from lib.segmentation import dataset as sds
from lib.segmentation import infer as sinf
from lib.segmentation import model as smodel
from lib.segmentation import onnx_export as sexp
from lib.segmentation import preprocess as spre
from lib.segmentation import train as strain
from tests.conftest import shared

TINY = replace(st.PROFILES["smoke"], n_patients=4, images_per_patient=2, size=32)


# ----------------------------------------------------------------------------- generator


def test_trus_render_is_deterministic_and_seed_dependent() -> None:
    a, ma, ra = st.render_image(TINY, 1, 0)
    b, mb, rb = st.render_image(TINY, 1, 0)
    c, _, _ = st.render_image(replace(TINY, seed=TINY.seed + 1), 1, 0)
    assert np.array_equal(a, b) and ra == rb and all(np.array_equal(ma[k], mb[k]) for k in ma)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1


def test_trus_masks_nest_inside_fan_and_gland() -> None:
    spec = replace(TINY, size=64)
    for i in range(4):
        img, m, rec = st.render_image(spec, i, 0)
        assert set(np.unique(m["lesion"])) <= {0, 1}
        assert not (m["lesion"] & ~m["gland"].astype(bool)).any()
        assert not (m["gland"] & ~m["fov"].astype(bool)).any()
        assert (img[m["fov"] == 0] == 0).all()  # black outside the fan
        assert rec["lesion_area_px"] == int(m["lesion"].sum())
    _, m, rec = st.render_image(replace(spec, lesion_free_rate=1.0), 0, 0)
    assert m["lesion"].sum() == 0 and rec["has_lesion"] == 0


def test_ensure_trus_writes_identical_files(tmp_path) -> None:
    a = st.ensure_trus("smoke", root=tmp_path / "a", n_patients=2, images_per_patient=2, size=32)
    b = st.ensure_trus("smoke", root=tmp_path / "b", n_patients=2, images_per_patient=2, size=32)
    ia, ib = pd.read_csv(a / "index.csv"), pd.read_csv(b / "index.csv")
    pd.testing.assert_frame_equal(ia, ib)
    assert len(ia) == 4 and ia.patient_id.nunique() == 2
    for rel in list(ia.image_path) + list(ia.mask_path):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert set(np.unique(np.asarray(Image.open(a / ia.mask_path[0])))) <= {0, 255}


# ----------------------------------------------------------------------------- metrics and losses


def test_dice_iou_match_sklearn_and_empty_convention() -> None:
    from sklearn.metrics import f1_score, jaccard_score

    rng = np.random.default_rng(0)
    pred = rng.random((5, 1, 16, 16)) > 0.6
    truth = rng.random((5, 1, 16, 16)) > 0.5
    dice, iou = metrics.dice_iou(pred, truth)
    for i in range(5):
        assert dice[i] == pytest.approx(f1_score(truth[i].ravel(), pred[i].ravel()), abs=1e-6)
        assert iou[i] == pytest.approx(jaccard_score(truth[i].ravel(), pred[i].ravel()), abs=1e-6)
    empty = np.zeros((2, 1, 8, 8), bool)
    some = empty.copy()
    some[1, 0, 2:4, 2:4] = True
    d, j = metrics.dice_iou(some, empty)  # image 0: both empty -> 1; image 1: false positive on empty truth -> 0
    assert d.tolist() == [1.0, 0.0] and j.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="shape"):
        metrics.dice_iou(pred, truth[:, :, :8])


def test_seg_metrics_reports_dice_on_lesion_images() -> None:
    y = torch.zeros(2, 1, 8, 8)
    y[0, 0, :4, :4] = 1
    logits = torch.full_like(y, -10.0)
    logits[0, 0, :4, :2] = 10.0  # half the lesion found; image 1 empty and predicted empty
    out = strain.seg_metrics()(logits, y)
    assert out["dice_pos"] == pytest.approx(2 * 8 / (8 + 16))
    assert out["dice"] == pytest.approx((out["dice_pos"] + 1) / 2)
    assert out["pred_fg"] == pytest.approx(8 / 128)  # share of pixels predicted foreground


def test_losses_match_monai_references() -> None:
    from monai.losses import DiceLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 16, 16, generator=g)
    y = (torch.rand(3, 1, 16, 16, generator=g) > 0.7).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    ref = DiceLoss(sigmoid=True, batch=True)(logits, y) + bce
    assert float(smodel.make_seg_loss("dicece")(logits, y)) == pytest.approx(float(ref), rel=1e-5)
    # by hand: batch Dice = 1 - (2 sum(p y) + s) / (sum p + sum y + s), s = 1e-5 (MONAI's smoothing)
    p = logits.sigmoid()
    by_hand = 1 - (2 * (p * y).sum() + 1e-5) / (p.sum() + y.sum() + 1e-5) + bce
    assert float(smodel.make_seg_loss("dicece")(logits, y)) == pytest.approx(float(by_hand), rel=1e-5)
    # smp Dice pools the batch too; MONAI batch=True with smp's smoothing is the same quantity
    ref_smp = DiceLoss(sigmoid=True, batch=True, smooth_nr=0.0, smooth_dr=1e-7)(logits, y) + bce
    assert float(smodel.make_seg_loss("dice+bce")(logits, y)) == pytest.approx(float(ref_smp), rel=1e-4)
    perfect = (y * 2 - 1) * 20
    for name in smodel.LOSSES:
        assert float(smodel.make_seg_loss(name)(perfect, y)) < float(smodel.make_seg_loss(name)(logits, y))
    with pytest.raises(ValueError, match="loss must be"):
        smodel.make_seg_loss("hinge")


# ----------------------------------------------------------------------------- bad inputs


def test_binarise_mask_accepts_binary_refuses_label_maps() -> None:
    assert sdata.binarise_mask(np.array([[0, 255], [255, 0]], np.uint8)).tolist() == [[0, 1], [1, 0]]
    assert sdata.binarise_mask(np.array([[0, 1]], np.uint8)).dtype == np.uint8
    with pytest.raises(DataError, match="label=") as exc:
        sdata.binarise_mask(np.array([[0, 1, 2, 5]], np.uint8), "seg.png")
    assert "seg.png" in str(exc.value)
    with pytest.raises(DataError, match="fractional"):
        sdata.binarise_mask(np.array([[0.0, 0.4, 1.0]]), "soft.nii.gz")
    assert sdata.binarise_mask(np.array([[0, 1, 2, 5]]), label=2).tolist() == [[0, 0, 1, 0]]


def test_bad_pairs_are_skipped_with_reasons(tmp_path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(tmp_path / "ok.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "ok_mask.png")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "small_mask.png")
    Image.fromarray(np.arange(1600, dtype=np.uint8).reshape(40, 40) % 4).save(tmp_path / "labels_mask.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    table = pd.DataFrame({"case_id": ["good", "size", "labels", "corrupt"],
                          "image_path": ["ok.png", "ok.png", "ok.png", "corrupt.png"],
                          "mask_path": ["ok_mask.png", "small_mask.png", "labels_mask.png", "ok_mask.png"],
                          "group": ["a", "b", "c", "d"]})
    raw = sdata.load_pairs(table, tmp_path)
    assert raw.table.case_id.tolist() == ["good"]
    reasons = raw.skipped.to_frame().set_index("case").reason
    assert "does not match image" in reasons["size"]
    assert "not binary" in reasons["labels"]
    assert "corrupt" in reasons["corrupt"] or "unknown" in reasons["corrupt"]


# ----------------------------------------------------------------------------- preprocessing and folds


def test_preprocess_crops_fan_and_restores_geometry() -> None:
    img, m, _ = st.render_image(replace(TINY, size=96), 0, 0)
    pre = spre.Preprocess(size=64, denoise="gradient")
    x, geom = spre.preprocess_image(img[None], pre)
    y0, y1, x0, x1 = geom["box"]
    fy, fx = np.nonzero(m["fov"])
    assert (y0, x0) == (fy.min(), fx.min()) and (y1, x1) == (fy.max() + 1, fx.max() + 1)
    assert x.shape == (1, 64, 64) and x.min() >= 0 and x.max() <= 1
    back = spre.restore_probability(spre.preprocess_mask(m["lesion"], geom, 64).astype(np.float32), geom)
    assert back.shape == img.shape
    d, _ = metrics.dice_iou(back[None, None] > 0.5, m["lesion"][None, None].astype(bool))
    assert d[0] > 0.8  # round trip through the crop/resize keeps the lesion in place
    with pytest.raises(ValueError, match="multiple of 32"):
        spre.Preprocess(size=50)


@pytest.mark.parametrize("method", ["gradient", "curvature", "isotropic", "tv"])
def test_denoisers_reduce_noise(method: str) -> None:
    rng = np.random.default_rng(1)
    flat = np.full((48, 48), 0.5, np.float32) + rng.normal(0, 0.1, (48, 48)).astype(np.float32)
    out = spre.denoise(flat, method, iterations=5, conductance=3.0)
    assert out.shape == flat.shape and out.std() < 0.7 * flat.std()


def _lesion_data(n: int = 8, size: int = 64) -> CachedDataset:
    """Images with an in-field disc (image > 0) and, in every other image, a 2x2 lesion near a corner."""
    x = torch.zeros(n, 1, size, size)
    yy, xx = np.mgrid[:size, :size]
    x[:, 0] = torch.as_tensor(((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2 - 2) ** 2) * 0.5)
    y = torch.zeros(n, 1, size, size)
    y[::2, 0, 12:14, 12:14] = 1
    table = pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "group": [f"g{i // 2}" for i in range(n)]})
    return CachedDataset(x, y, table, ["lesion"], "segmentation")


def test_patch_sampler_hits_lesions_at_requested_rate_and_is_deterministic() -> None:
    data = _lesion_data()
    for pos_fraction in (0.25, 0.75):
        ds = sds.SegDataset(data, None, seed=3, patch_size=16, pos_fraction=pos_fraction, samples_per_epoch=400)
        assert len(ds) == 400
        items = [ds[i] for i in range(len(ds))]
        assert all(x.shape == (1, 16, 16) and y.shape == (1, 16, 16) for x, y in items)
        drawn = [ds.draw(i) for i in range(len(ds))]
        positive = np.array([p for _, p, _ in drawn])
        assert abs(positive.mean() - pos_fraction) < 0.07  # binomial sd 0.022 at n = 400
        has_lesion = np.array([float(y.sum()) > 0 for _, y in items])
        assert has_lesion[positive].all()  # a positive patch always contains lesion pixels
        assert all(j % 2 == 0 for j, p, _ in drawn if p)  # ... and comes from an image that has a lesion
        # negatives are centred on in-field background: a 2x2 lesion in a 16 px patch is rarely caught
        assert has_lesion[~positive].mean() < 0.25
        assert abs(has_lesion.mean() - pos_fraction) < 0.15
    a = sds.SegDataset(data, "light", seed=5, patch_size=16, pos_fraction=0.5, samples_per_epoch=20)
    b = sds.SegDataset(data, "light", seed=5, patch_size=16, pos_fraction=0.5, samples_per_epoch=20)
    first = [a[i] for i in range(20)]
    assert all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(first, [b[i] for i in range(20)],
                                                                                     strict=True))
    assert a.draw(7) == b.draw(7)  # item i does not depend on what came before
    b.set_random_state(6)  # next epoch: other patches
    assert [b.draw(i) for i in range(20)] != [a.draw(i) for i in range(20)]
    whole = sds.SegDataset(data, None)  # default: whole images, as before
    assert len(whole) == len(data) and torch.equal(whole[2][1], data.y[2])
    with pytest.raises(ValueError, match="patch_size"):
        sds.SegDataset(data, None, patch_size=128)
    with pytest.raises(ValueError, match="pos_fraction"):
        sds.SegDataset(data, None, patch_size=16, pos_fraction=1.5)


def test_make_folds_keeps_patients_together() -> None:
    table = pd.DataFrame({"group": np.repeat(list("abcdef"), 3), "has_lesion": [1, 0, 1] * 6})
    folds = strain.make_folds(table, n_splits=3, seed=1)
    assert set(folds) == {0, 1, 2}
    assert (table.assign(fold=folds).groupby("group").fold.nunique() == 1).all()
    assert np.array_equal(folds, strain.make_folds(table, n_splits=3, seed=1))


# ----------------------------------------------------------------------------- train -> infer -> export


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MONAI U-Net trained one fold for two epochs through lib.train.fit (seconds on CPU)."""
    root = tmp_path_factory.mktemp("seg")
    trus = st.ensure_trus("smoke", root=root / "trus", n_patients=4, images_per_patient=2, size=48)
    data = sds.prepare_dataset(sdata.load_trus(trus), spre.Preprocess(size=32))
    cfg = strain.SegConfig(model="monai:UNet", epochs=2, batch_size=4, n_splits=2, resume=False, n_boot=200)
    res = strain.cross_validate(data, cfg, root / "run", folds=[0])
    return root, trus, data, res


def test_kfold_writes_artifacts_and_scores(trained) -> None:
    root, _, data, res = trained
    assert {"dice", "iou", "fold", "group", "case_id", "has_lesion"} <= set(res.oof.columns)
    assert res.oof.dice.between(0, 1).all() and set(res.oof.fold) == {0}
    assert (root / "run" / "fold0" / "best.pt").exists() and (root / "run" / "oof.csv").exists()
    assert (root / "run" / "folds.csv").exists() and (root / "run" / "metrics.json").exists()
    table = kfold.metrics_table(res.summary)
    assert table.index.tolist() == ["fold 0", "pooled"] and (table.dice_lo <= table.dice + 1e-9).all()
    pooled = res.summary["pooled"]
    assert pooled["n"] == len(res.oof) and pooled["n_groups"] == res.oof.group.nunique()
    assert pooled["dice"] == pytest.approx(res.oof.dice.mean())
    # the maps of the validated images are the ones scored
    va = res.oof.row.to_numpy()
    dice, _ = metrics.dice_iou(res.maps[va] > 0.5, data.y[va, 0].numpy() > 0.5)
    np.testing.assert_allclose(dice, res.oof.dice.to_numpy())
    log = pd.read_csv(root / "run" / "fold0" / "log.csv")
    assert len(log) == 2 and "dice" in log


def test_kfold_ships_last_epoch(trained) -> None:
    """Folds are scored on their validation images, so no epoch is picked on them: best.pt is the last epoch."""
    root, *_ = trained
    tcfg = strain.SegConfig().train_config()
    # nothing in training reads the scored fold: no best epoch, no plateau schedule, no early stopping
    assert tcfg.select == "last" and tcfg.scheduler == "cosine" and tcfg.patience == 0
    _, meta = sinf.load_segmenter(root / "run" / "fold0" / "best.pt")
    assert meta["epoch"] == 2 and meta["train_config"]["select"] == "last"


@pytest.mark.parametrize("name", ["smp:fpn-resnet18", "monai:UNet"])
def test_output_bias_starts_at_the_foreground_prior(name: str) -> None:
    """An untrained network predicts about the training foreground share instead of 0.5 everywhere."""
    torch.manual_seed(0)
    net = smodel.build_model(name, 1, 1).eval()
    bias = smodel.init_output_bias(net, 0.02)
    assert bias == pytest.approx(np.log(0.02 / 0.98))
    with torch.no_grad():
        p = net(torch.rand(2, 1, 64, 64)).sigmoid()
    assert float(p.mean()) < 0.1 and float((p > 0.5).float().mean()) < 0.05
    with pytest.raises(ValueError, match="no one-channel output convolution"):
        smodel.init_output_bias(torch.nn.Linear(3, 1), 0.1)


def test_segment_array_and_folder_cli(trained, tmp_path) -> None:
    import nibabel as nib

    root, trus, data, _ = trained
    model, meta = sinf.load_segmenter(root / "run" / "fold0" / "best.pt")
    assert meta["preprocessing"]["size"] == 32 and meta["task"] == "segmentation" and meta["threshold"] == 0.5
    img = np.asarray(Image.open(trus / "images" / "T0000_00.png"))
    mask, area = sinf.segment_array(model, img, spacing_mm=0.5)
    assert mask.shape == img.shape and set(np.unique(mask)) <= {0, 1}
    assert area == {"pixels": int(mask.sum()), "mm2": mask.sum() * 0.25}
    # the probability map is the network's output mapped back: thresholding it reproduces the mask
    prob = sinf.segment_probability(model, img)
    assert np.array_equal(mask, (prob > 0.5).astype(np.uint8))
    assert sinf.mask_area(np.ones((4, 5)), 0.5) == {"pixels": 20, "mm2": 5.0}
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes((trus / "images" / "T0001_00.png").read_bytes())
    (src / "broken.png").write_bytes(b"not an image at all")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(src / "tiny.png")
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((40, 40, 3)).astype(np.float32), affine),
             str(src / "vol.nii.gz"))
    assert cli.main(["predict", "--model", str(root / "run" / "fold0" / "best.pt"), "--input", str(src),
                    "--out", str(tmp_path / "out")]) == 0
    preds = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert sorted(preds.output.map(lambda p: p.split("/")[-1])) == ["a_mask.png", "vol_mask.nii.gz"]
    skipped = pd.read_csv(tmp_path / "out" / "skipped_segment.csv").set_index("case").reason
    assert sorted(skipped.index) == ["broken.png", "tiny.png"] and "too small" in skipped["tiny.png"]
    out = nib.load(str(tmp_path / "out" / "vol_mask.nii.gz"))
    assert out.shape == (40, 40, 3) and np.allclose(out.affine, affine)
    png = np.asarray(Image.open(tmp_path / "out" / "a_mask.png"))
    expected, _ = sinf.segment_array(model, np.asarray(Image.open(src / "a.png")))
    assert png.shape == expected.shape and np.array_equal(png > 0, expected > 0)


def test_segment_array_refuses_bad_images(trained) -> None:
    root, *_ = trained
    model, _ = sinf.load_segmenter(root / "run" / "fold0" / "best.pt")
    bad = np.full((40, 40), 0.5, np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sinf.segment_array(model, bad)
    with pytest.raises(ValueError, match="2D image"):
        sinf.segment_array(model, np.zeros((2, 3, 40, 40)))
    with pytest.raises(ValueError, match="recipe"):
        sinf.segment_array(smodel.build_model("monai:UNet"), np.zeros((40, 40)))
    with pytest.raises(DataError, match="checkpoint not found"):
        sinf.load_segmenter(root / "nope.pt")


def test_onnx_export_parity_and_session_inference(trained, tmp_path) -> None:
    import io
    import json

    root, trus, *_ = trained
    ckpt = root / "run" / "fold0" / "best.pt"
    meta = sexp.export_segmenter(ckpt, tmp_path / "exp", sample=trus / "images" / "T0002_00.png")
    assert {p.name for p in (tmp_path / "exp").iterdir()} == {"model.onnx", "metadata.json", "labels.json",
                                                                "sample.png"}
    on_disk = json.loads((tmp_path / "exp" / "metadata.json").read_text())
    assert on_disk["task"] == "segmentation" and on_disk["parity"]["max_abs_diff"] < 1e-4
    assert on_disk["parity"]["n_inputs"] == 5 and meta["preprocessing"]["size"] == 32
    sess, smeta = sinf.load_segmenter(tmp_path / "exp")
    model, _ = sinf.load_segmenter(ckpt)
    img = np.asarray(Image.open(trus / "images" / "T0003_00.png"))
    p_onnx, p_torch = sinf.segment_probability(sess, img), sinf.segment_probability(model, img)
    assert np.abs(p_onnx - p_torch).max() < 1e-4 and smeta["in_chans"] == 1
    mask, area = sinf.segment_array(sess, img)
    assert area["pixels"] == int(mask.sum()) and mask.shape == img.shape
    assert Image.open(io.BytesIO(sinf.mask_png(mask))).size == (img.shape[1], img.shape[0])
    up_mask, up_area = sinf.segment_source(sess, (trus / "images" / "T0003_00.png").read_bytes())  # an upload
    assert np.array_equal(up_mask, mask) and up_area == area
    with pytest.raises(DataError, match="unknown or unsupported"):
        sinf.segment_source(sess, b"\x00garbage bytes")
    assert cli.main(["export", "--model", str(ckpt), str(ckpt), "--out", str(tmp_path / "ens")]) == 0
    assert json.loads((tmp_path / "ens" / "metadata.json").read_text())["n_models"] == 2
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable ONNX"):
        sinf.load_segmenter(tmp_path / "bad.onnx")


def _dicom_bytes(pixels: np.ndarray, spacing: tuple[float, float]) -> bytes:
    """A minimal 16-bit greyscale DICOM (secondary capture) with a pixel spacing, written by pydicom."""
    import io

    from tests.conftest import secondary_capture

    ds = secondary_capture("US")
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *pixels.shape, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_segment_source_dicom_reports_mm2_from_pixel_spacing(trained) -> None:
    root, trus, *_ = trained
    model, _ = sinf.load_segmenter(root / "run" / "fold0" / "best.pt")
    img = np.asarray(Image.open(trus / "images" / "T0003_00.png"))
    mask, area = sinf.segment_source(model, _dicom_bytes(img, (0.5, 0.25)), name="upload.dcm")
    expected, _ = sinf.segment_array(model, img.astype(np.float32))
    assert np.array_equal(mask, expected)
    assert area == {"pixels": int(mask.sum()), "mm2": pytest.approx(mask.sum() * 0.125)}
    # PNG states no spacing; a one-slice NIfTI states its zooms
    assert sinf.segment_source(model, (trus / "images" / "T0003_00.png").read_bytes())[1]["mm2"] is None
    assert sinf.pixel_spacing({"dicom": {"PixelSpacing": [0.7, 0.7]}}) == [0.7, 0.7]
    assert sinf.pixel_spacing({"spacing": [0.5, 0.5, 2.0]}) == [0.5, 0.5]
    assert sinf.pixel_spacing({"dicom": {"Modality": "US"}}) is None
    assert sinf.pixel_spacing({"dicom": {"PixelSpacing": ["0", "0"]}}) is None


def test_resume_only_with_same_stamp(trained) -> None:
    root, _, data, res = trained
    cfg = strain.SegConfig(model="monai:UNet", epochs=2, batch_size=4, n_splits=2, resume=True)
    cfg = replace(cfg, n_boot=200)
    again = strain.cross_validate(data, cfg, root / "run", folds=[0])  # same data and settings: resumes
    pd.testing.assert_frame_equal(again.oof, res.oof)
    other = strain.SegConfig(model="monai:UNet", epochs=3, n_splits=2)
    assert strain.run_stamp(data, cfg) != strain.run_stamp(data, other)


def test_build_model_by_name() -> None:
    # batch of 2 at 64 px: the encoders' 1/32 bottleneck is 2x2, so batch norm has several values per channel
    x = torch.zeros(2, 2, 64, 64)
    for name in ("smp:fpn-resnet18", "smp:unet-tu-resnet10t", "monai:UNet", "monai:FlexibleUNet"):
        assert smodel.build_model(name, 2, 1)(x).shape == (2, 1, 64, 64)
    for old, new in (("monai-unet", "monai:UNet"), ("fpn", "smp:fpn-")):  # the old spellings name the new ones
        with pytest.raises(ValueError, match=f"write {new}"):
            smodel.build_model(old)
    with pytest.raises(ValueError, match="not a segmentation network"):
        smodel.build_model("resnet10t")


def test_ct_crops_loader(tmp_path) -> None:
    crops = tmp_path / "crops"
    (crops / "bbox" / "liver").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, pid in enumerate(["P0", "P0", "P1"]):
        mask = np.zeros((4, 32, 32), np.uint8)
        mask[1:3, 8:20, 8:20] = 1
        np.savez(crops / "bbox" / "liver" / f"S{i}.npz", image=rng.random((4, 32, 32), dtype=np.float32), mask=mask,
                 lesion=np.zeros_like(mask), spacing=np.ones(3, np.float32), affine=np.eye(4))
        rows.append({"case_id": f"S{i}", "patient_id": pid, "structure": "liver", "organ": "liver", "mode": "bbox",
                     "path": f"bbox/liver/S{i}.npz", "shape": "4x32x32", "spacing": "2x1x1", "voxels": 288,
                     "bbox": "", "lesion_voxels": 0})
    np.savez(crops / "bbox" / "liver" / "S3.npz", image=np.zeros((4, 32, 32), np.float32),
             mask=np.full((4, 32, 32), 3, np.uint8))  # a label map: refused and listed
    rows.append({**rows[-1], "case_id": "S3", "path": "bbox/liver/S3.npz"})
    pd.DataFrame(rows).to_csv(crops / "index.csv", index=False)
    raw = sdata.load_ct_crops(crops, "liver", max_slices_per_study=3)  # slices 0, 2, 3 of each crop
    assert len(raw) == 9 and set(raw.table.group) == {"P0", "P1"} and raw.channels == ["ct"]
    assert raw.table.has_lesion.tolist() == [0, 1, 0] * 3 and raw.masks[1].sum() == 144
    assert raw.skipped.to_frame().case.tolist() == ["S3"] and "not binary" in raw.skipped.rows[0]["reason"]
    with pytest.raises(DataError, match="crop index"):
        sdata.load_ct_crops(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- real data


def test_data_sets_by_registry_name() -> None:
    """Segmentation sets are looked up in lib.datasets: its "did you mean" and wrong-stage errors, one list."""
    from lib import overrides

    with pytest.raises(ValueError, match="Did you mean 'trus'"):
        sdata.load_dataset("trsu")
    with pytest.raises(ValueError, match="not used by stage 06_segment"):
        sdata.load_dataset("brain-mri")
    assert overrides.segments("trus") and overrides.segments("ms-lesion")
    assert not overrides.segments("brain-mri") and not overrides.segments("images.csv")


def test_ms_lesion_slices_are_grouped_and_binary() -> None:
    root = shared(*sdata.MS_ROOT)
    raw = sdata.load_ms_lesion(root, patients=["patient07"], max_slices_per_patient=4)
    assert len(raw) == 4 and raw.channels == list(sdata.MS_MODALITIES)
    assert raw.images[0].shape == (3, 218, 182) and raw.masks[0].shape == (218, 182)
    assert set(raw.table.group) == {"patient07"}
    assert all(set(np.unique(m)) <= {0, 1} for m in raw.masks)


# ----------------------------------------------------------------------------- affine, CIs, export errors, serving


def _oblique_copy(vol: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same physical image stored with another voxel order (axes permuted, one flipped) and its affine."""
    import nibabel as nib

    ornt = np.array([[1, -1], [2, 1], [0, 1]])  # axis 0 -> axis 1 (flipped), axis 1 -> axis 2, axis 2 -> axis 0
    data = nib.orientations.apply_orientation(vol, ornt)
    return np.ascontiguousarray(data), affine @ nib.orientations.inv_ornt_aff(ornt, vol.shape)


def test_slices_follow_the_affine_not_the_voxel_order(tmp_path) -> None:
    import nibabel as nib

    rng = np.random.default_rng(0)
    vol = rng.random((20, 24, 6)).astype(np.float32)
    vol[2:5, 18:22, 3] = 5.0  # a marker: patient's left-anterior corner of slice 3 in a RAS volume
    ras = np.diag([0.8, 0.8, 2.0, 1.0])
    data, affine = _oblique_copy(vol, ras)
    assert data.shape != vol.shape and nib.aff2axcodes(affine) != ("R", "A", "S")
    a, b = sdata.volume_slices(vol, ras), sdata.volume_slices(data, affine)
    np.testing.assert_array_equal(a, b)  # the same axial slices whatever the storage order
    assert a.shape == (6, 24, 20)
    rows, cols = np.nonzero(a[3] == 5.0)  # display orientation: anterior up, patient's left on the right
    assert rows.max() < 12 and cols.min() >= 10
    np.testing.assert_array_equal(sdata.slices_to_volume(b, affine), data)  # the inverse lands on the source grid
    # a one-slice file and the folder CLI read by the same rule
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "obl.nii.gz"))
    mask = (sdata.volume_slices(data, affine) > 4).astype(np.uint8)
    out = sdata.slices_to_volume(mask, affine)
    assert out.shape == data.shape and np.array_equal(out > 0, data > 4)


def test_segment_file_writes_mask_on_the_source_grid(trained, tmp_path) -> None:
    import nibabel as nib

    root, trus, *_ = trained
    model, meta = sinf.load_segmenter(root / "run" / "fold0" / "best.pt")
    img = np.asarray(Image.open(trus / "images" / "T0001_00.png")).astype(np.float32)
    ras_vol = sdata.slices_to_volume(np.stack([img, img]), np.eye(4))  # two identical axial slices, RAS
    data, affine = _oblique_copy(ras_vol, np.diag([0.5, 0.5, 2.0, 1.0]))
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "in.nii.gz"))
    row = sinf.segment_file(tmp_path / "in.nii.gz", model, meta, tmp_path / "out")
    out = nib.load(row["output"])
    assert out.shape == data.shape and np.allclose(out.affine, affine)
    expected, _ = sinf.segment_array(model, img)
    np.testing.assert_array_equal(sdata.volume_slices(np.asarray(out.dataobj), affine)[0] > 0, expected > 0)


def test_grouped_ci_resamples_patients() -> None:
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(4), 25)
    values = np.repeat(rng.random(4), 25) + rng.normal(0, 0.01, 100)  # images of one patient are alike
    lo_img, hi_img = metrics.mean_ci(values, n_boot=500)
    lo_pat, hi_pat = metrics.mean_ci(values, patients, n_boot=500)
    assert lo_pat <= values.mean() <= hi_pat and hi_pat - lo_pat > 3 * (hi_img - lo_img)
    assert metrics.mean_ci(values, np.zeros(100), n_boot=100) == (pytest.approx(np.nan, nan_ok=True),) * 2
    frame = metrics.overlap_frame(np.ones((4, 1, 4, 4)), np.full((4, 1, 4, 4), 0.9))
    summary = metrics.overlap_summary(frame, ["a", "a", "b", "b"], n_boot=50)
    assert summary["dice"] == 1.0 and summary["n_groups"] == 2 and summary["dice_ci"] == [1.0, 1.0]


def test_export_raises_on_parity_failure(trained, tmp_path) -> None:
    root, *_ = trained
    with pytest.raises(RuntimeError, match="ONNX Runtime vs torch"):
        sexp.export_segmenter(root / "run" / "fold0" / "best.pt", tmp_path / "exp", tol=-1.0)
    assert export.PARITY_TOL > 0


def test_serving_a_segmentation_export_stays_torch_free(trained, tmp_path) -> None:
    import subprocess
    import sys

    root, trus, *_ = trained
    sexp.export_segmenter(root / "run" / "fold0" / "best.pt", tmp_path / "exp")
    code = "\n".join([
        "import sys", "from fastapi.testclient import TestClient", "from lib import serve",
        f"c = TestClient(serve.create_app(None, segmenter_dir={str(tmp_path / 'exp')!r}))",
        f"png = open({str(trus / 'images' / 'T0000_00.png')!r}, 'rb').read()",
        "r = c.post('/segment?output=json', files={'file': ('x', png)})",
        "assert r.status_code == 200, r.text", "print(r.json()['area']['pixels'], 'torch' in sys.modules)"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False"  # the service answered without importing torch
