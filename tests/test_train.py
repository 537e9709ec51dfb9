"""Training loop: losses and policies, determinism, exact resume after an interrupt, torchrun with 2 CPU processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lib import config, models, train


def toy(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, 12, 12, generator=g) * 0.3
    y = (torch.rand(n, generator=g) < 0.5).float()[:, None]
    x[y[:, 0] == 1, 0, 3:8, 3:8] += 0.5
    return TensorDataset(x, y)


def small_cnn() -> nn.Module:
    config.seed_everything(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 1))


def run(out: Path, epochs: int = 4, loss_fn=None, **kw) -> tuple[nn.Module, object]:
    model = small_cnn()
    tr = DataLoader(toy(40, 1), batch_size=8, shuffle=True)
    va = DataLoader(toy(16, 2), batch_size=8)
    cfg = train.TrainConfig(**{"epochs": epochs, "lr": 1e-2, "progress": False, "seed": 7, **kw})
    meta = models.checkpoint_meta("small_cnn", 2, 1, "binary", ["square"])
    log = train.fit(model, tr, va, loss_fn or train.make_loss("binary"), train.classification_metrics("binary"),
                    cfg, out, meta)
    return model, log


def test_uncertain_policies() -> None:
    t = torch.tensor([1.0, 0.0, -1.0, float("nan")])
    for policy, want_y, want_valid in [("ignore", [1, 0, 0, 0], [1, 1, 0, 0]), ("positive", [1, 0, 1, 0], [1, 1, 1, 0]),
                                       ("negative", [1, 0, 0, 0], [1, 1, 1, 0])]:
        y, valid = train.apply_uncertain_policy(t, policy)
        assert y.tolist() == want_y and valid.int().tolist() == want_valid, policy
    with pytest.raises(ValueError, match="uncertain policy"):
        train.apply_uncertain_policy(t, "maybe")


def test_masked_multilabel_loss_ignores_uncertain_and_missing() -> None:
    logits = torch.tensor([[2.0, -1.0, 5.0], [0.5, 0.0, -3.0]])
    targets = torch.tensor([[1.0, -1.0, float("nan")], [0.0, 1.0, -1.0]])
    loss = train.make_loss("multilabel", uncertain="ignore")(logits, targets)
    keep = torch.tensor([[True, False, False], [True, True, False]])
    want = nn.functional.binary_cross_entropy_with_logits(logits[keep], torch.tensor([1.0, 0.0, 1.0]))
    assert torch.isclose(loss, want)
    as_pos = train.make_loss("multilabel", uncertain="positive")(logits, targets)
    assert not torch.isclose(as_pos, want)


def test_weights_for_imbalance() -> None:
    pw = train.positive_weights([[1, 0], [0, 0], [0, -1], [0, 1]])
    assert pw.tolist() == pytest.approx([3.0, 2.0])  # label 2: uncertain ignored -> 2 negatives / 1 positive
    cw = train.class_weights([0, 0, 0, 1], 2)
    assert cw.tolist() == pytest.approx([4 / 6, 2.0])
    ce = train.make_loss("multiclass", weight=cw)
    assert ce(torch.zeros(2, 2), torch.tensor([0, 1])) > 0


def test_fit_learns_and_writes_checkpoints(tmp_path: Path) -> None:
    model, log = run(tmp_path / "a", epochs=6)
    assert {"best.pt", "last.pt", "log.csv"} <= {p.name for p in (tmp_path / "a").iterdir()}
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]
    assert log["auc"].max() >= 0.9
    ckpt = models.read_checkpoint(tmp_path / "a" / "best.pt")
    assert ckpt["task"] == "binary" and ckpt["metrics"]["auc"] == pytest.approx(log["auc"].max())
    assert "optimizer" not in ckpt and "optimizer" in models.read_checkpoint(tmp_path / "a" / "last.pt")


def test_fit_is_deterministic_and_resumes_exactly(tmp_path: Path) -> None:
    m1, log1 = run(tmp_path / "full", resume=False)
    m2, log2 = run(tmp_path / "again", resume=False)
    assert log1["train_loss"].tolist() == log2["train_loss"].tolist()

    calls = {"n": 0}
    base = train.make_loss("binary")

    def interrupted(logits, targets):
        calls["n"] += 1
        if calls["n"] == 15:  # 5 train batches + 1 validation call per epoch: inside epoch 3
            raise KeyboardInterrupt
        return base(logits, targets)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", loss_fn=interrupted)
    assert len(models.read_checkpoint(tmp_path / "cut" / "last.pt")["train_state"]["log"]) == 2
    m3, log3 = run(tmp_path / "cut", resume=True)
    assert log3["train_loss"].tolist() == log1["train_loss"].tolist()
    for a, b in zip(m1.state_dict().values(), m3.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_early_stopping_and_bad_monitor(tmp_path: Path) -> None:
    _, log = run(tmp_path / "es", epochs=30, patience=2, monitor="val_loss", mode="min", lr=0.0)
    assert len(log) == 3  # no learning: best at epoch 1, then 2 bad epochs
    with pytest.raises(KeyError, match="monitor"):
        run(tmp_path / "bad", epochs=1, monitor="nope")


def test_empty_data_and_diverging_loss_are_clear_errors(tmp_path: Path) -> None:
    model = small_cnn()
    empty = DataLoader(TensorDataset(torch.zeros(0, 2, 12, 12), torch.zeros(0, 1)), batch_size=4)
    cfg = train.TrainConfig(epochs=1, progress=False)
    meta = models.checkpoint_meta("small_cnn", 2, 1, "binary")
    with pytest.raises(ValueError, match="empty training set"):
        train.fit(model, empty, empty, train.make_loss("binary"), train.classification_metrics("binary"), cfg,
                  tmp_path / "e", meta)
    base = train.make_loss("binary")
    with pytest.raises(FloatingPointError, match="training loss is nan in epoch 1"):
        run(tmp_path / "nan", epochs=2, loss_fn=lambda logits, y: base(logits, y) * float("nan"))


def test_load_checkpoint_rebuilds_timm_model(tmp_path: Path) -> None:
    model = models.create_model("resnet10t", in_chans=3, num_classes=2)
    meta = models.checkpoint_meta("resnet10t", 3, 2, "multiclass", ["a", "b"], {"kind": "2d", "size": 32})
    models.save_checkpoint(tmp_path / "m.pt", model, meta, epoch=1)
    loaded, info = models.load_checkpoint(tmp_path / "m.pt")
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(model.eval()(x), loaded(x)) and info["label_names"] == ["a", "b"]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="bad.pt"):
        models.load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unknown timm model"):
        models.create_model("no_such_net")


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    """2 CPU processes (gloo): each trains on half the data, weights stay in sync, validation is gathered whole."""
    import json

    sys.path.insert(0, str(config.ROOT / "scripts"))
    import torchrun_smoke

    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                          str(config.ROOT / "scripts" / "torchrun_smoke.py"), "--out", str(tmp_path), "--epochs", "2",
                          "--n-train", "48", "--n-val", "21"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=config.ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    # both ranks print at once, so their lines can interleave: take each flat {...} after "DDP "
    reports = sorted((json.loads(m) for m in re.findall(r"DDP (\{[^{}]*\})", res.stdout)), key=lambda r: r["rank"])
    assert [(r["rank"], r["world"]) for r in reports] == [(0, 2), (1, 2)], res.stdout
    r0, r1 = reports
    assert r0["train_reads"] == r1["train_reads"] == 48  # 2 epochs x 24: each rank trained on its half
    assert r0["n_val"] == [21, 21]  # every validation sample scored once (sampler padding removed)
    assert r0["checksums"] == r1["checksums"]  # DDP kept weights and (synced) BatchNorm buffers identical
    assert r0["auc"] == r1["auc"] and r0["val_loss"] == r1["val_loss"]

    # rank 0's best.pt, scored in this single process, reproduces the distributed validation of its epoch
    model, meta = models.load_checkpoint(tmp_path / "best.pt", builder=lambda *a, **k: torchrun_smoke.tiny_cnn())
    val = DataLoader(torchrun_smoke.toy_data(21, seed=2), batch_size=8)
    logits, targets = train.predict_logits(model, val)
    best = meta["epoch"] - 1
    assert train.classification_metrics("binary")(logits, targets)["auc"] == pytest.approx(r0["auc"][best], abs=1e-5)
    assert float(train.make_loss("binary")(logits, targets)) == pytest.approx(r0["val_loss"][best], abs=1e-5)
    log = pd.read_csv(tmp_path / "log.csv")
    assert len(log) == 2 and log["best"].any()


def test_ema_weights_are_validated_saved_and_resumed(tmp_path: Path) -> None:
    model, log = run(tmp_path / "ema", epochs=4, ema_decay=0.8, resume=False)
    raw, _ = run(tmp_path / "raw", epochs=4, resume=False)
    assert log["train_loss"].tolist() == pytest.approx(
        pd.read_csv(tmp_path / "raw" / "log.csv")["train_loss"].tolist())  # EMA does not touch the optimised weights
    last = models.read_checkpoint(tmp_path / "ema" / "last.pt")
    best = models.read_checkpoint(tmp_path / "ema" / "best.pt")
    assert last["ema"] is not None and "ema" not in best
    w = "0.weight"
    assert not torch.equal(last["ema"][w], last["state_dict"][w])  # shipped (EMA) weights differ from the raw ones
    if int(best["epoch"]) == 4:
        assert torch.equal(best["state_dict"][w], last["ema"][w])
    again, log2 = run(tmp_path / "ema", epochs=6, ema_decay=0.8, extend=True)  # epochs 5-6 with the stored average
    fresh, log3 = run(tmp_path / "ema6", epochs=6, ema_decay=0.8, resume=False)
    assert log2["auc"].tolist() == pytest.approx(log3["auc"].tolist())
    with pytest.raises(ValueError, match="ema_decay"):
        train.TrainConfig(ema_decay=1.0)


def test_select_last_ships_the_last_epoch(tmp_path: Path) -> None:
    _, log = run(tmp_path / "last", epochs=5, select="last", ema_decay=0.8, resume=False)
    best = models.read_checkpoint(tmp_path / "last" / "best.pt")
    last = models.read_checkpoint(tmp_path / "last" / "last.pt")
    assert int(best["epoch"]) == 5 and best["metrics"]["auc"] == pytest.approx(log["auc"].iloc[-1])
    assert all(torch.equal(best["state_dict"][k], v) for k, v in last["ema"].items())
    _, log_best = run(tmp_path / "best", epochs=5, ema_decay=0.8, resume=False)
    assert log_best["train_loss"].tolist() == pytest.approx(log["train_loss"].tolist())  # selection only
    with pytest.raises(ValueError, match="select"):
        train.TrainConfig(select="median")


def test_validating_every_few_epochs_trains_the_same_weights(tmp_path: Path) -> None:
    """val_every only skips scoring: same losses and shipped weights, validation rows at epochs 2, 4 and the last."""
    _, every = run(tmp_path / "every", epochs=5, select="last", ema_decay=0.8, resume=False)
    _, sparse = run(tmp_path / "sparse", epochs=5, select="last", ema_decay=0.8, resume=False, val_every=2)
    assert sparse["train_loss"].tolist() == every["train_loss"].tolist()
    assert sparse["auc"].notna().tolist() == [False, True, False, True, True]
    assert sparse["auc"].dropna().tolist() == every["auc"].iloc[[1, 3, 4]].tolist()
    a, b = (models.read_checkpoint(tmp_path / d / "best.pt")["state_dict"] for d in ("every", "sparse"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for bad in ({"select": "best"}, {"select": "last", "patience": 2}, {"select": "last", "scheduler": "plateau"}):
        with pytest.raises(ValueError, match="val_every"):
            train.TrainConfig(val_every=2, **bad)


def test_slice_mil_model_pools_slices_and_round_trips(tmp_path: Path) -> None:
    model = models.create_model("mil:resnet10t", in_chans=6, num_classes=2).eval()
    x = torch.rand(3, 6, 32, 32)
    out = model(x)
    assert out.shape == (3, 2)
    perm = model(x[:, torch.randperm(6)])  # max over slices: the slice order does not matter
    assert torch.allclose(out, perm, atol=1e-5)
    meta = models.checkpoint_meta("mil:resnet10t", 6, 2, "multilabel", ["a", "b"])
    models.save_checkpoint(tmp_path / "m.pt", model, meta)
    back, _ = models.load_checkpoint(tmp_path / "m.pt")
    assert torch.allclose(back(x), out)
    with pytest.raises(ValueError, match="slice pooling"):
        models.create_model("mil:resnet10t", in_chans=4, pool="median")
