"""Re-running training under the same folder: resume only with the same settings, explicit epoch extension,
optimizers by torch name, periodic checkpoints."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from lib import models, train
from tests.test_train import run


def test_changed_settings_are_refused_with_the_changes_named(tmp_path: Path) -> None:
    run(tmp_path / "r", epochs=2)
    with pytest.raises(train.ConfigChangedError, match=r"lr: 0.01 -> 0.05") as err:
        run(tmp_path / "r", epochs=2, lr=0.05)
    assert "another output folder" in str(err.value)
    with pytest.raises(train.ConfigChangedError, match=r"optimizer: 'adamw' -> 'sgd'"):
        run(tmp_path / "r", epochs=2, optimizer="SGD")
    with pytest.raises(train.ConfigChangedError, match=r"epochs: 2 -> 4.*extend=True"):
        run(tmp_path / "r", epochs=4)
    _, log = run(tmp_path / "r", epochs=2)  # identical settings: resumes (nothing left to train)
    assert log["epoch"].tolist() == [1, 2]


def test_extending_epochs_continues_the_schedule(tmp_path: Path) -> None:
    run(tmp_path / "r", epochs=2)
    _, log = run(tmp_path / "r", epochs=4, extend=True)
    assert log["epoch"].tolist() == [1, 2, 3, 4]
    lr3 = log.loc[log["epoch"] == 3, "lr"].item()
    assert lr3 == pytest.approx(1e-2 * (1 + math.cos(math.pi * 2 / 4)) / 2)  # on the 4-epoch cosine, not 0
    assert lr3 > 1e-4
    with pytest.raises(train.ConfigChangedError, match="epochs: 4 -> 3"):  # shrinking is not an extension
        run(tmp_path / "r", epochs=3, extend=True)


@pytest.mark.parametrize("name, cls", [("Adam", torch.optim.Adam), ("SGD", torch.optim.SGD),
                                       ("rmsprop", torch.optim.RMSprop), ("nadam", torch.optim.NAdam)])
def test_optimizer_by_torch_name(tmp_path: Path, name: str, cls: type) -> None:
    cfg = train.TrainConfig(optimizer=name)
    opt = train.make_optimizer(torch.nn.Linear(2, 1), cfg)
    assert type(opt) is cls
    _, log = run(tmp_path / name, epochs=1, optimizer=name)
    assert len(log) == 1 and math.isfinite(log["train_loss"].item())


def test_unknown_optimizer_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="optimizer must be one of torch.optim's: .*AdamW.*got 'adamx'"):
        train.TrainConfig(optimizer="adamx")


def test_save_every_keeps_periodic_checkpoints(tmp_path: Path) -> None:
    run(tmp_path / "r", epochs=4, save_every=2)
    kept = sorted(p.name for p in (tmp_path / "r").glob("epoch*.pt"))
    assert kept == ["epoch002.pt", "epoch004.pt"]
    assert models.read_checkpoint(tmp_path / "r" / "epoch002.pt")["epoch"] == 2


# ------------------------------------------------------------------------------------------ recipes by name

def test_losses_by_name() -> None:
    from lib import recipes

    logits = torch.tensor([[2.0], [-1.0], [0.5], [0.3]])
    y = torch.tensor([[1.0], [0.0], [float("nan")], [-1.0]])  # missing and uncertain rows are skipped
    bce = recipes.named_loss("BCE", "binary")(logits, y)
    assert bce.item() == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:2], y[:2]).item())
    focal = recipes.named_loss("focal", "binary")(logits, y)
    from torchvision.ops import sigmoid_focal_loss

    assert focal.item() == pytest.approx(sigmoid_focal_loss(logits[:2], y[:2], alpha=-1, reduction="mean").item())
    assert focal.item() < bce.item()  # confident right answers count less
    mc_logits, mc_y = torch.tensor([[2.0, 0.1, -1.0], [0.0, 0.5, 0.2]]), torch.tensor([0, 2])
    smooth = recipes.named_loss("label_smoothing", "multiclass")(mc_logits, mc_y)
    assert smooth.item() == pytest.approx(torch.nn.CrossEntropyLoss(label_smoothing=0.1)(mc_logits, mc_y).item())
    assert recipes.named_loss("ce", "multiclass")(mc_logits, mc_y).item() == pytest.approx(
        torch.nn.functional.cross_entropy(mc_logits, mc_y).item())
    assert math.isfinite(recipes.named_loss("focal", "multiclass")(mc_logits, mc_y).item())
    assert recipes.named_loss("auto", "binary") is None
    with pytest.raises(ValueError, match="loss must be one of auto, cross-entropy, bce, focal, label-smoothing"):
        train.TrainConfig(loss="hinge")
    _, log = run(Path(__import__("tempfile").mkdtemp()) / "focal", epochs=1, loss_fn=recipes.named_loss(
        "focal", "binary"))
    assert math.isfinite(log["train_loss"].item())


def test_augmentation_flags_compose_and_replay() -> None:
    from lib import recipes

    x = torch.rand(1, 16, 16)
    aug = recipes.build_augment("flip+rotate+brightness+contrast+sharpness+equalize+invert", 2, seed=3)
    again = recipes.build_augment(["flip", "rotate", "brightness", "contrast", "sharpness", "equalize", "invert"], 2,
                                  seed=3)
    outs = [aug(x) for _ in range(5)]
    assert all(o.shape == x.shape and torch.isfinite(o).all() for o in outs)
    assert all(torch.equal(o, again(x)) for o in outs)  # one seed, same draws
    assert any(not torch.equal(o, x) for o in outs)
    inv = recipes.build_augment("invert", 2, seed=0)
    got = [inv(x) for _ in range(12)]
    assert all(torch.equal(g, x) or torch.allclose(g, 1 - x) for g in got)
    assert any(torch.allclose(g, 1 - x) for g in got) and any(torch.equal(g, x) for g in got)
    assert recipes.augment_flags("light") is None
    with pytest.raises(ValueError, match="unknown \\['blur'\\]"):
        recipes.build_augment("flip+blur")


def test_model_from_user_file_trains_and_reloads(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from tests.test_train import toy

    src = tmp_path / "mynet.py"
    src.write_text("from torch import nn\n\n"
                   "def tiny(in_chans, num_classes, width=4):\n"
                   "    return nn.Sequential(nn.Conv2d(in_chans, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
                   "                         nn.Flatten(), nn.Linear(width, num_classes))\n")
    name = f"{src}:tiny"
    model = models.create_model(name, 2, 1, width=5)
    meta = models.checkpoint_meta(name, 2, 1, "binary", ["square"], width=5)
    cfg = train.TrainConfig(epochs=1, progress=False, seed=1)
    train.fit(model, DataLoader(toy(16, 1), batch_size=8), DataLoader(toy(8, 2), batch_size=8),
              train.make_loss("binary"), train.classification_metrics("binary"), cfg, tmp_path / "out", meta)
    reloaded, got = models.load_checkpoint(tmp_path / "out" / "best.pt")
    assert got["model_name"] == name and isinstance(reloaded, torch.nn.Sequential)
    assert torch.equal(reloaded[0].weight, model[0].weight.detach().cpu())
    with pytest.raises(ValueError, match="no function 'wide'.*tiny"):
        models.create_model(f"{src}:wide", 2, 1)
    with pytest.raises(FileNotFoundError, match="model file not found"):
        models.create_model(str(tmp_path / "none.py"), 2, 1)


# ------------------------------------------------------------------------- every setting that changes training

def _tiny_dataset():
    import numpy as np
    import pandas as pd

    from lib import datasets

    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 16, 16, generator=g)
    y = (torch.arange(16) % 2).float()[:, None]
    table = pd.DataFrame({"case_id": [f"c{i}" for i in range(16)]})
    return datasets.CachedDataset(x, y, table, ["square"], "binary"), np.arange(12), np.arange(12, 16)


@pytest.mark.parametrize("change, named", [
    ({"augment": "flip+rotate"}, "augment: 'light' -> 'flip+rotate'"),
    ({"batch_size": 4}, "batch_size: 8 -> 4"),
    ({"uncertain": "positive"}, "uncertain: 'ignore' -> 'positive'"),
    ({"bn_momentum": 0.5}, "bn_momentum: None -> 0.5"),
    ({"model_kwargs": {"drop_rate": 0.2}}, "model_kwargs: {} -> {'drop_rate': 0.2}"),
    ({"loss": "focal"}, "loss: 'auto' -> 'focal'"),
    ({"tr_idx": list(range(1, 12))}, "train_rows: "),
])
def test_train_classifier_refuses_each_changed_setting(tmp_path: Path, change: dict, named: str) -> None:
    """Data pipeline, model and loss settings outside TrainConfig are stored and compared too: a re-run with any
    one of them changed stops and names it, instead of continuing the old run under the new settings."""
    ds, tr, va = _tiny_dataset()
    base = {"augment": "light", "batch_size": 8, "uncertain": "ignore", "bn_momentum": None, "model_kwargs": None,
            "loss": "auto", "tr_idx": tr}

    def go(**kw):
        kw = {**base, **kw}
        cfg = train.TrainConfig(epochs=1, progress=False, seed=3, loss=kw.pop("loss"))
        return train.train_classifier(ds, kw.pop("tr_idx"), va, tmp_path / "r", cfg, "resnet10t", **kw)

    _, first = go()
    with pytest.raises(train.ConfigChangedError, match=re.escape(named)) as err:
        go(**change)
    assert str(err.value).count(" -> ") == 1  # only the changed key is named
    _, again = go()  # the unchanged settings resume the finished run
    assert again["train_loss"].tolist() == first["train_loss"].tolist()


def test_pretrained_and_unrecorded_settings_count_as_changes() -> None:
    cfg = train.TrainConfig()
    assert train.config_changes({}, cfg, {}, {}, {"pretrained": False}, {"pretrained": True}) == [
        "pretrained: False -> True"]
    # a checkpoint that did not record a setting cannot prove it unchanged
    assert train.config_changes({}, cfg, {}, {}, None, {"augment": "light"}) == ["augment: None -> 'light'"]
    assert train.config_changes({}, cfg, {}, {}, {"augment": "light"}, {"augment": "light"}) == []


def test_segmentation_fold_refuses_changed_patch_settings(tmp_path: Path) -> None:
    import numpy as np
    import pandas as pd

    from lib.datasets import CachedDataset
    from lib.segmentation import train as segtrain

    g = np.random.default_rng(0)
    x = g.random((8, 1, 32, 32)).astype("float32")
    y = np.zeros((8, 1, 32, 32), "float32")
    y[::2, :, 8:16, 8:16] = 1
    x[::2, :, 8:16, 8:16] += 1
    table = pd.DataFrame({"case_id": [f"c{i}" for i in range(8)], "group": [f"g{i // 2}" for i in range(8)]})
    data = CachedDataset(torch.from_numpy(x), torch.from_numpy(y), table, ["lesion"], "segmentation")
    cfg = segtrain.SegConfig(epochs=1, batch_size=4, seed=1).train_config()
    segtrain.train_segmenter(data, np.arange(6), np.arange(6, 8), tmp_path / "f", cfg, batch_size=4)
    with pytest.raises(train.ConfigChangedError, match=r"patch_size: 0 -> 16"):
        segtrain.train_segmenter(data, np.arange(6), np.arange(6, 8), tmp_path / "f", cfg, batch_size=4,
                                 patch_size=16)
