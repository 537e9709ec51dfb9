"""Training datasets: bad input is skipped and listed (or a clear error when nothing is left), odd image modes and
bit depths decode to [0, 1], crops join labels under the uncertain policy, grouped holdout, resume with augmentation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lib import datasets, models, train
from lib.io import DataError
from tests.conftest import shared


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def _folder(root: Path) -> Path:
    """A class-per-folder tree with every kind of good and bad file."""
    rng = np.random.default_rng(0)
    img = (rng.random((40, 48)) * 255).astype(np.uint8)
    _png(root / "yes" / "grey.png", img)
    _png(root / "yes" / "deep16.png", (img.astype(np.uint16) * 257 + 3))  # 16-bit grey
    (root / "no").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.stack([img, img // 2, 255 - img], -1)).save(root / "no" / "rgb.jpg")
    Image.fromarray(img).convert("P").save(root / "no" / "palette.png")
    Image.fromarray(np.stack([img, img, img, img], -1), mode="RGBA").save(root / "no" / "rgba.png")
    Image.fromarray(img > 128).save(root / "no" / "bilevel.png")  # mode "1"
    good = (root / "yes" / "grey.png").read_bytes()
    (root / "yes" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "yes" / "text.png").write_text("not an image")
    (root / "no" / "empty.png").write_bytes(b"")
    _png(root / "no" / "tiny.png", img[:4, :4])
    return root


def test_image_folder_odd_modes_decoded_and_bad_files_listed(tmp_path: Path) -> None:
    ds, group_col = datasets.build_dataset(str(_folder(tmp_path / "imgs")), channels=1, size=32)
    names = sorted(Path(p).name for p in ds.table["path"])
    assert names == ["bilevel.png", "deep16.png", "grey.png", "palette.png", "rgb.jpg", "rgba.png"]
    assert ds.task == "binary" and ds.label_names == ["yes"] and tuple(ds.x.shape[1:]) == (1, 32, 32)
    assert float(ds.x.min()) >= 0 and float(ds.x.max()) <= 1 and float(ds.x.std()) > 0.05
    assert torch.equal(ds.y[:, 0], torch.tensor([n.startswith(("grey", "deep")) for n in ds.table["path"].map(
        lambda p: Path(p).name)], dtype=torch.float32))
    bad = ds.skipped.to_frame()
    assert sorted(Path(f).name for f in bad["file"]) == ["empty.png", "text.png", "tiny.png", "truncated.png"]
    reasons = dict(zip(bad["file"].map(lambda f: Path(f).name), bad["reason"], strict=True))
    assert "truncated" in reasons["truncated.png"] and "small" in reasons["tiny.png"]
    assert reasons["empty.png"] and reasons["text.png"]  # wording is lib.splits' / lib.imageio's
    assert group_col == "group"


def test_csv_dataset_missing_labels_dicom_and_rgb_channels(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    rows = [("yes/grey.png", "tumour"), ("no/rgb.jpg", "normal"), ("no/palette.png", None), ("gone.png", "normal"),
            ("no/rgba.png", "other")]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(root / "table.csv", index=False)
    ds = datasets.csv_dataset(root / "table.csv", classes=["normal", "tumour"], channels=3, size=24, task="binary")
    assert [Path(p).name for p in ds.table["path"]] == ["grey.png", "rgb.jpg"] and ds.in_chans == 3
    reasons = " | ".join(ds.skipped.to_frame()["reason"])
    assert "missing or not in" in reasons and "file not found" in reasons and len(ds.skipped) == 3

    ct = shared("dicom-samples", "pydicom", "CT_small.dcm")
    shutil.copy(ct, root / "ct.dcm")
    pd.DataFrame({"path": ["ct.dcm", "yes/deep16.png"], "label": ["a", "b"]}).to_csv(root / "dcm.csv", index=False)
    ds = datasets.csv_dataset(root / "dcm.csv", size=32)
    assert len(ds) == 2 and ds.task == "binary" and float(ds.x[0].std()) > 0.05


def test_empty_dataset_and_missing_files_are_clear_errors(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    (root / "x").mkdir(parents=True)
    (root / "x" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="no readable images|no usable images"):
        datasets.build_dataset(str(root))
    with pytest.raises(DataError, match="CSV not found"):
        datasets.csv_dataset(tmp_path / "none.csv")
    with pytest.raises(DataError, match="labels file not found"):
        datasets.load_labels("reports", tmp_path)
    with pytest.raises(ValueError, match="existing folder or CSV file"):
        datasets.build_dataset("no-such-dataset")


def _crops(root: Path) -> tuple[Path, pd.DataFrame]:
    """Fake crops/index.csv: 12 good liver crops (lesion = bright blob) plus broken files, and their labels."""
    rng = np.random.default_rng(1)
    rows, labels = [], []
    for i in range(12):
        img = rng.random((6, 20, 20)).astype(np.float32) * 0.3
        if i % 2:
            img[:, 6:12, 6:12] += 0.6
        np.savez(root / f"c{i}.npz", image=img, mask=np.ones_like(img, np.uint8))
        rows.append({"case_id": f"S{i}", "patient_id": f"P{i // 2}", "organ": "liver", "mode": "bbox",
                     "path": f"c{i}.npz"})
        labels.append({"study_id": f"S{i}", "liver_abnormal": [0, 1][i % 2] if i not in (2, 3) else [None, -1][i - 2]})
    (root / "broken.npz").write_bytes(b"PK\x03\x04 nonsense")
    np.savez(root / "nan.npz", image=np.full((6, 20, 20), np.nan, np.float32))
    np.savez(root / "flat.npz", image=np.zeros((20, 20), np.float32))
    for name in ("broken", "nan", "flat", "missing"):
        rows.append({"case_id": f"S_{name}", "patient_id": "PX", "organ": "liver", "mode": "bbox",
                     "path": f"{name}.npz"})
        labels.append({"study_id": f"S_{name}", "liver_abnormal": 1})
    rows.append({"case_id": "S_nolabel", "patient_id": "PY", "organ": "liver", "mode": "bbox", "path": "c0.npz"})
    pd.DataFrame(rows).to_csv(root / "index.csv", index=False)
    return root, pd.DataFrame(labels)


def test_crop_dataset_joins_labels_and_lists_bad_crops(tmp_path: Path) -> None:
    crops, labels = _crops(tmp_path)
    ds = datasets.crop_dataset(crops, labels, kind="25d", n_slices=3, size=16)
    assert len(ds) == 10 and tuple(ds.x.shape[1:]) == (3, 16, 16) and ds.preprocessing["kind"] == "25d"
    reasons = ds.skipped.to_frame().set_index("case")["reason"]
    assert "blank or uncertain" in reasons["S2"] and "blank or uncertain" in reasons["S3"]
    assert "no labels row" in reasons["S_nolabel"] and "unreadable" in reasons["S_broken"]
    assert "NaN" in reasons["S_nan"] and "(S, H, W)" in reasons["S_flat"] and "not found" in reasons["S_missing"]
    as_pos = datasets.crop_dataset(crops, labels, kind="2d", size=16, uncertain="positive")
    assert len(as_pos) == 11 and as_pos.table.set_index("case_id").loc["S3", "target"] == 1
    three_d = datasets.crop_dataset(crops, labels, kind="3d", n_slices=4, size=16)
    assert tuple(three_d.x.shape[1:]) == (1, 4, 16, 16)
    with pytest.raises(DataError, match="no npz crops for organ 'spleen'"):
        datasets.crop_dataset(crops, labels, organ="spleen")
    with pytest.raises(DataError, match="label columns"):
        datasets.crop_dataset(crops, labels.drop(columns="liver_abnormal"))
    with pytest.raises(DataError, match="no usable crops"):
        datasets.crop_dataset(crops, labels.assign(liver_abnormal=None))


def test_holdout_split_is_grouped_and_3d_model_trains(tmp_path: Path) -> None:
    crops, labels = _crops(tmp_path)
    ds = datasets.crop_dataset(crops, labels, kind="3d", n_slices=4, size=16)
    tr, va = datasets.holdout_split(ds, "patient_id", 0.34, seed=3)
    assert len(tr) + len(va) == len(ds) and not set(ds.table.patient_id[tr]) & set(ds.table.patient_id[va])
    cfg = train.TrainConfig(epochs=1, progress=False, resume=False, seed=1)
    model, log = train.train_classifier(ds, tr, va, tmp_path / "m3d", cfg, "monai:resnet10", augment="medium",
                                        batch_size=4, model_kwargs={"spatial_dims": 3})
    assert len(log) == 1
    loaded, meta = models.load_checkpoint(tmp_path / "m3d" / "best.pt")
    assert meta["preprocessing"]["kind"] == "3d"
    assert np.allclose(train.predict_rows(loaded, ds, va), train.predict_rows(model, ds, va), atol=1e-5)


def test_train_classifier_with_augmentation_resumes_exactly(tmp_path: Path) -> None:
    """Stopped after 2 of 4 epochs and continued: the same log and weights as 4 epochs in one go (MONAI
    augmentation, plateau scheduler and optimizer state all restored)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 2, 16, 16, generator=g) * 0.5
    y = (torch.arange(24) % 2).float()[:, None]
    x[y[:, 0] == 1, 0, 4:9, 4:9] += 0.5
    table = pd.DataFrame({"case_id": [f"c{i}" for i in range(24)], "patient_id": [f"p{i // 2}" for i in range(24)]})
    ds = datasets.CachedDataset(x, y, table, ["square"], "binary")
    tr, va = np.arange(16), np.arange(16, 24)

    def go(out: Path, epochs: int) -> tuple[torch.nn.Module, pd.DataFrame]:
        cfg = train.TrainConfig(epochs=epochs, lr=3e-3, scheduler="plateau", patience=4, progress=False, seed=5,
                                optimizer="sgd", extend=True)  # a run stopped at 2 epochs continues to 4
        return train.train_classifier(ds, tr, va, out, cfg, "resnet10t", augment="medium", batch_size=8)

    m1, log1 = go(tmp_path / "whole", 4)
    go(tmp_path / "cut", 2)
    m2, log2 = go(tmp_path / "cut", 4)
    cols = ["epoch", "lr", "train_loss", "val_loss", "auc"]
    pd.testing.assert_frame_equal(log1[cols], log2[cols])
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_augment_skips_metatensor_bookkeeping_without_changing_values():
    """The wrapper turns MONAI's MetaTensor tracking off while it runs (a loader-speed fix): same draws and values
    as the bare Compose, plain tensors out, and the global setting restored afterwards."""
    from monai.data import get_track_meta

    from lib.datasets import make_augment

    ours, bare = make_augment("medium", 2, seed=3), make_augment("medium", 2, seed=3).compose
    x = torch.rand(4, 32, 32)
    for _ in range(10):
        out = ours(x)
        assert type(out) is torch.Tensor and torch.equal(out, bare(x).as_tensor())
    assert get_track_meta()


def test_folder_dataset_skips_and_records_a_decompression_bomb(tmp_path: Path) -> None:
    """A PNG declaring 100000 x 100000 pixels in a class folder is skipped with its reason, not a crash."""
    import struct
    import zlib

    from PIL import Image

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    for cls in ("no", "yes"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            pixels = np.random.default_rng(i + 10 * (cls == "yes")).integers(0, 255, (32, 32), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    (tmp_path / "yes" / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                               + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))
    ds, _ = datasets.build_dataset(str(tmp_path), size=16)
    assert len(ds) == 8
    reasons = [r["reason"] for r in ds.skipped.rows if "bomb" in r["case"] or r["file"].endswith("bomb.png")]
    assert reasons and "too many pixels" in reasons[0]
