"""Re-running training under the same folder: resume only with the same settings, explicit epoch extension,
optimizers by torch name, periodic checkpoints."""

from __future__ import annotations

import math
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
