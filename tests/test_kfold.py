"""k-fold stage: grouped folds with a held-out test part, the leakage check failing a run, OOF table and
metrics consistent with sklearn, fold ensembles, predict/merge (functions and CLI), and ensure_kfold caching."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from lib import config, kfold, metrics, models, splits, train
from lib.datasets import CachedDataset, image_spec
from lib.io import DataError
from tests.conftest import shared

SEED = 7
MODEL = "test_resnet"  # timm's tiny test network: same code path as resnet10t, a fraction of the time


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared CPU, OpenMP threads spinning against other processes cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _dataset(n_patients: int = 24, seed: int = 0, size: int = 16) -> CachedDataset:
    """Patients with 1-3 images each; a positive image has a bright square (learnable in an epoch or two)."""
    rng = np.random.default_rng(seed)
    xs, rows = [], []
    for p in range(n_patients):
        label = p % 3 == 0
        for s in range(int(rng.integers(1, 4))):
            img = rng.normal(0.3, 0.05, (1, size, size)).astype(np.float32)
            if label:
                img[0, 4:10, 4:10] += 0.6
            xs.append(img)
            rows.append({"case_id": f"P{p:02d}_S{s}", "patient_id": f"P{p:02d}", "structure": "liver",
                         "organ": "liver", "target": float(label), "truth": float(label)})
    table = pd.DataFrame(rows)
    y = torch.tensor(table["target"].to_numpy(np.float32))[:, None]
    return CachedDataset(torch.from_numpy(np.stack(xs)), y, table, ["liver_abnormal"], "binary",
                         preprocessing=image_spec(1, size))


def _cfg(epochs: int = 1, lr: float = 3e-3) -> train.TrainConfig:
    return train.TrainConfig(epochs=epochs, lr=lr, seed=SEED, progress=False)


# ----------------------------------------------------------------------------- folds


def test_assign_folds_groups_patients_and_holds_out_test() -> None:
    ds = _dataset()
    folds = kfold.assign_folds(ds, "patient_id", n_splits=3, test_fraction=0.25, seed=SEED, eval_col="truth")
    assert set(folds) == {-1, 0, 1, 2}
    per_patient = pd.Series(folds.to_numpy()).groupby(ds.table["patient_id"]).nunique()
    assert (per_patient == 1).all(), "a patient's studies must stay in one fold"
    for k in range(3):  # stratified: every development fold has both classes
        assert set(ds.table.loc[folds.to_numpy() == k, "truth"]) == {0.0, 1.0}
    again = kfold.assign_folds(ds, "patient_id", n_splits=3, test_fraction=0.25, seed=SEED, eval_col="truth")
    assert (folds == again).all()


def test_too_few_samples_of_a_class_names_it_with_counts() -> None:
    ds = _dataset(n_patients=7)  # positives: patients 0, 3, 6 -> 3 groups
    with pytest.raises(ValueError, match=r"class '1'.*3 groups") as err:
        kfold.assign_folds(ds, "patient_id", n_splits=5, test_fraction=0, seed=SEED, eval_col="truth")
    assert "5 folds" in str(err.value)
    with pytest.raises(ValueError, match="held-out test part"):
        kfold.assign_folds(ds, "patient_id", n_splits=2, test_fraction=0.2, seed=SEED, eval_col="truth")


def test_run_kfold_fails_when_a_group_crosses_folds(tmp_path: Path) -> None:
    ds = _dataset()
    folds = kfold.assign_folds(ds, "patient_id", n_splits=3, test_fraction=0, seed=SEED).to_numpy().copy()
    multi = ds.table.groupby("patient_id").size()
    patient = multi[multi > 1].index[0]
    rows = np.flatnonzero(ds.table["patient_id"] == patient)
    folds[rows[0]] = (folds[rows[1]] + 1) % 3  # split one patient's studies over two folds
    with pytest.raises(splits.LeakageError, match=patient):
        kfold.run_kfold(ds, tmp_path / "kf", _cfg(), MODEL, n_splits=3, folds=folds)
    assert not list(tmp_path.glob("kf/fold*/best.pt")), "nothing may be trained on a leaking split"


# ----------------------------------------------------------------------------- a tiny run end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[CachedDataset, kfold.KFoldResult]:
    ds = _dataset(n_patients=30)
    out = tmp_path_factory.mktemp("kfold") / "model"
    res = kfold.run_kfold(ds, out, _cfg(), MODEL, n_splits=3, test_fraction=0.2, eval_col="truth", n_boot=100,
                          batch_size=16)
    return ds, res


def test_oof_table_and_metrics_are_consistent(tiny_run) -> None:
    ds, res = tiny_run
    oof = res.oof
    folds = pd.read_csv(res.out_dir / "folds.csv")
    dev_rows = np.flatnonzero(folds["fold"].to_numpy() >= 0)
    assert sorted(oof["row"]) == sorted(dev_rows), "every development row scored exactly once"
    assert (oof["fold"].to_numpy() == folds["fold"].to_numpy()[oof["row"]]).all()
    assert set(res.test["row"]) == set(np.flatnonzero(folds["fold"].to_numpy() == -1))
    saved = json.loads((res.out_dir / "metrics.json").read_text())
    y, p = oof["true_liver_abnormal"], oof["prob_liver_abnormal"]
    assert saved["pooled"]["auc"] == pytest.approx(roc_auc_score(y, p))
    for k, frame in oof.groupby("fold"):
        if frame["true_liver_abnormal"].nunique() == 2:
            assert saved["folds"][str(k)]["auc"] == pytest.approx(roc_auc_score(frame["true_liver_abnormal"],
                                                                                frame["prob_liver_abnormal"]))
    lo, hi = saved["pooled"]["auc_ci"]
    assert lo <= saved["pooled"]["auc"] <= hi
    assert saved["scored_against"] == "truth" and "pooled_vs_train_labels" in saved
    for name in ("oof.csv", "folds.csv", "test_predictions.csv", "ensembles.csv", "logs.csv"):
        assert (res.out_dir / name).exists()
    assert all((res.out_dir / f"fold{k}" / "best.pt").exists() for k in range(3))


def test_ensembles_are_mean_and_vote_of_the_fold_models(tiny_run) -> None:
    ds, res = tiny_run
    fold_p = np.stack([res.test[f"fold{k}_p0"].to_numpy() for k in range(3)])
    np.testing.assert_allclose(res.test["prob_liver_abnormal"], fold_p.mean(0), rtol=1e-6)
    votes = (fold_p >= 0.5).astype(int)
    np.testing.assert_array_equal(res.test["vote"], (votes.sum(0) >= 2).astype(int))
    assert list(res.comparison["model"]) == ["fold0", "fold1", "fold2", "ensemble_mean", "ensemble_vote"]
    y = res.test["true_liver_abnormal"]
    mean_auc = res.comparison.set_index("model").loc["ensemble_mean", "auc"]
    assert mean_auc == pytest.approx(roc_auc_score(y, fold_p.mean(0)))


def test_figures_and_reload(tiny_run) -> None:
    ds, res = tiny_run
    paths = kfold.figures(res, ds.task, ds.label_names)
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths.values())
    back = kfold.load_result(res.out_dir)
    pd.testing.assert_frame_equal(back.oof, pd.read_csv(res.out_dir / "oof.csv"))
    assert [p.parent.name for p in back.checkpoints] == ["fold0", "fold1", "fold2"]


def test_label_noise_study_same_rows_and_folds_both_sources(tiny_run, tmp_path: Path) -> None:
    ds, res = tiny_run
    wrong = np.flatnonzero(ds.table["patient_id"] == "P03")  # a positive patient reported as negative
    blank = np.flatnonzero(ds.table["patient_id"] == "P06")  # a patient the reports say nothing about
    keep = np.setdiff1d(np.arange(len(ds)), blank)
    reports = ds.subset(keep)
    flip = np.flatnonzero(reports.table["patient_id"] == "P03")
    reports.table.loc[flip, "target"] = 0.0
    reports.y[flip] = 0.0
    table, results = kfold.label_noise_study(reports, ds, tmp_path / "noise", _cfg(), model_name=MODEL, n_splits=3,
                                             test_fraction=0.2, n_boot=50, batch_size=16)
    assert list(table["train_labels"]) == ["reports", "truth"]
    assert table["n_wrong_labels"].tolist() == [len(wrong), 0]
    assert table["n_missing_labels"].tolist() == [len(blank), 0]
    assert table["n_report_labels"].tolist() == [len(ds) - len(blank), len(ds)]
    for r in results.values():  # both arms: every truth row, scored on the truth, same folds
        assert (r.oof["true_liver_abnormal"].to_numpy() == ds.table["truth"].to_numpy()[r.oof["row"]]).all()
    a, b = results["reports"].oof, results["truth"].oof
    assert (a["row"].to_numpy() == b["row"].to_numpy()).all() and (a["fold"] == b["fold"]).all()
    scored = set(a["row"]) | set(results["reports"].test["row"])
    assert scored == set(range(len(ds))) and set(blank) <= scored, "rows without a report label are still scored"
    assert table.loc[1, "auc_cost_vs_truth"] == 0.0
    assert kfold.plot_label_noise(table) is not None


def test_folds_trained_in_worker_processes_match_one_process(tmp_path: Path) -> None:
    ds = _dataset(n_patients=18)
    kw = {"n_splits": 3, "test_fraction": 0.2, "eval_col": "truth", "n_boot": 20, "batch_size": 16}
    one = kfold.run_kfold(ds, tmp_path / "one", _cfg(epochs=2), MODEL, workers=1, **kw)
    two = kfold.run_kfold(ds, tmp_path / "two", _cfg(epochs=2), MODEL, workers=2, **kw)
    pd.testing.assert_frame_equal(one.oof, two.oof)
    pd.testing.assert_frame_equal(one.test, two.test)
    assert one.summary["pooled"] == two.summary["pooled"]


def test_label_noise_study_reuses_the_stage_run_as_its_report_arm(tmp_path: Path, monkeypatch) -> None:
    ds = _dataset(n_patients=15)
    blank = np.flatnonzero(ds.table["patient_id"] == "P03")
    reports = ds.subset(np.setdiff1d(np.arange(len(ds)), blank))
    builds = []

    def fake_build(params, run_dir, profile, seed, label_source=None):
        builds.append(label_source)
        return (ds if label_source == "truth" else reports), "patient_id"

    monkeypatch.setattr(kfold, "build_stage_dataset", fake_build)
    kw = {"n_splits": 2, "test_fraction": 0, "epochs": 1, "n_boot": 20, "batch_size": 16, "model_name": MODEL}
    out = kfold.ensure_kfold(tmp_path, "smoke", SEED, **kw)
    main = kfold.load_result(out)
    assert len(main.oof) == len(ds), "every crop with a ground truth is scored, also those the reports leave blank"
    table, results = kfold.ensure_label_noise(tmp_path, "smoke", SEED, **kw)
    assert not (out / "label_noise" / "reports").exists(), "the report arm is the stage run, not trained again"
    pd.testing.assert_frame_equal(results["reports"].oof, main.oof)
    assert (results["truth"].oof["fold"].to_numpy() == main.oof["fold"].to_numpy()).all()
    assert table["n_missing_labels"].tolist() == [len(blank), 0]
    again, _ = kfold.ensure_label_noise(tmp_path, "smoke", SEED, **kw)
    pd.testing.assert_frame_equal(again, table)
    # both arms in one worker pool (what notebook 04 does): the same numbers as one after the other
    joint = tmp_path / "joint"
    kfold.ensure_kfold(joint, "smoke", SEED, label_noise=True, **kw)
    assert (joint / "kfold" / "model" / "label_noise" / "label_noise.csv").exists()
    cached, joint_results = kfold.ensure_label_noise(joint, "smoke", SEED, **kw)
    pd.testing.assert_frame_equal(cached, table)
    pd.testing.assert_frame_equal(joint_results["truth"].oof, results["truth"].oof)


# ----------------------------------------------------------------------------- predict / merge


@pytest.fixture(scope="module")
def image_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    folder = root / "images"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(folder / cls / f"{i}.png")
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ckpts = []
    for k in range(3):
        torch.manual_seed(k)
        net = models.create_model(MODEL, 1, 3)
        meta = models.checkpoint_meta(MODEL, 1, 3, "multiclass", ["x", "y", "z"],
                                      {"source": "images", **image_spec(1, 16)})
        ckpts.append(models.save_checkpoint(root / "kf" / f"fold{k}" / "best.pt", net, meta))
    return ckpts, folder


def test_predict_folder_mean_and_mode(image_models, tmp_path: Path) -> None:
    ckpts, folder = image_models
    singles = [kfold.predict([c], folder) for c in ckpts]
    mean = kfold.predict(ckpts, folder, tmp_path / "mean.csv", how="mean")
    mode = kfold.predict(ckpts, folder, tmp_path / "mode.csv", how="mode")
    assert len(mean) == 6 and (mean["n_models"] == 3).all()
    skipped = pd.read_csv(tmp_path / "skipped_predict.csv")
    assert list(skipped["case"]) == ["broken.png"]
    cols = ["prob_x", "prob_y", "prob_z"]
    np.testing.assert_allclose(mean[cols], np.mean([s[cols].to_numpy() for s in singles], axis=0), rtol=1e-5)
    np.testing.assert_array_equal(mean["pred"], mean[cols].to_numpy().argmax(1))
    votes = np.stack([s["pred"].to_numpy() for s in singles])
    np.testing.assert_array_equal(mode["pred"], metrics.ensemble_vote(list(votes)))
    assert set(mean["pred_label"]) <= {"x", "y", "z"}
    kfold._PREDICT_CACHE.clear()  # decoded once and reused across calls: the same numbers as a fresh decode
    pd.testing.assert_frame_equal(kfold.predict(ckpts, folder, how="mean"), mean)
    (folder / "b" / "extra.png").write_bytes((folder / "b" / "0.png").read_bytes())
    assert len(kfold.predict(ckpts, folder)) == 7, "a changed folder is decoded again"
    (folder / "b" / "extra.png").unlink()


def test_predict_streams_inputs_in_chunks_with_the_same_result(image_models, tmp_path: Path, monkeypatch) -> None:
    ckpts, folder = image_models
    seen = []
    real = kfold.predict_probs

    def one_by_one(model, x, task, batch_size=64):  # batches of one in both runs: the network sees the same batches
        seen.append(len(x))
        return real(model, x, task, batch_size=1)

    monkeypatch.setattr(kfold, "predict_probs", one_by_one)
    kfold._PREDICT_CACHE.clear()
    whole = kfold.predict(ckpts, folder, tmp_path / "whole" / "p.csv")
    assert seen == [6] * len(ckpts)
    seen.clear()
    kfold._PREDICT_CACHE.clear()
    chunked = kfold.predict(ckpts, folder, tmp_path / "chunked" / "p.csv", chunk=2)
    assert seen and max(seen) <= 2, f"inputs scored {seen} at a time, not at most 2"
    assert sum(seen) == 6 * len(ckpts), "every kept input scored once per model"
    pd.testing.assert_frame_equal(whole, chunked, check_exact=True)
    assert (tmp_path / "whole" / "p.csv").read_bytes() == (tmp_path / "chunked" / "p.csv").read_bytes()
    assert ((tmp_path / "whole" / "skipped_predict.csv").read_bytes()
            == (tmp_path / "chunked" / "skipped_predict.csv").read_bytes())
    seen.clear()
    kfold.predict(ckpts[:1], folder, chunk=2)
    assert not seen, "probabilities of a checkpoint already scored on unchanged inputs are reused"
    assert kfold.PREDICT_CHUNK % 64 == 0, "default chunks hold whole batches of predict_probs: the same batches"


def test_merge_by_mean_and_mode_and_cli(image_models, tmp_path: Path) -> None:
    ckpts, folder = image_models
    csvs = [kfold.predict([c], folder, tmp_path / f"p{k}.csv") for k, c in enumerate(ckpts)]
    merged = kfold.merge([tmp_path / f"p{k}.csv" for k in range(3)], how="mean")
    cols = ["prob_x", "prob_y", "prob_z"]
    expected = np.mean([c.set_index("path").loc[merged["path"], cols].to_numpy() for c in csvs], axis=0)
    np.testing.assert_allclose(merged[cols], expected, rtol=1e-6)
    voted = kfold.merge(csvs, how="mode")
    hard = np.stack([c.set_index("path").loc[voted["path"], "pred"].to_numpy() for c in csvs])
    np.testing.assert_array_equal(voted["pred"], metrics.ensemble_vote(list(hard)))
    with pytest.raises(DataError, match="not in every CSV"):
        kfold.merge([csvs[0], csvs[1].iloc[1:]])
    with pytest.raises(ValueError, match="mean|mode"):
        kfold.merge(csvs, how="median")
    kfold.main(["merge", *map(str, [tmp_path / f"p{k}.csv" for k in range(3)]), "--how", "mode",
                "--out", str(tmp_path / "cli.csv")])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cli.csv"), voted.reset_index(drop=True),
                                  check_dtype=False)
    kfold.main(["predict", "--ckpt", *map(str, ckpts), "--input", str(folder), "--out", str(tmp_path / "c.csv")])
    assert len(pd.read_csv(tmp_path / "c.csv")) == 6


def test_predict_errors(image_models, tmp_path: Path) -> None:
    ckpts, _ = image_models
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="no usable inputs"):
        kfold.predict(ckpts, empty)
    with pytest.raises(ValueError, match="mean|mode"):
        kfold.predict(ckpts, empty, how="max")


# ----------------------------------------------------------------------------- the stage entry point


def test_ensure_kfold_is_idempotent_and_retrains_on_new_parameters(tmp_path: Path, monkeypatch, capsys) -> None:
    calls = []

    def fake_build(params, run_dir, profile, seed, label_source=None):
        if label_source != "truth":  # the truth dataset rides along on the synthetic cohort
            calls.append(params["lr"])
        return _dataset(n_patients=12), "patient_id"

    monkeypatch.setattr(kfold, "build_stage_dataset", fake_build)
    kw = {"n_splits": 2, "test_fraction": 0, "epochs": 1, "n_boot": 20, "batch_size": 16, "model_name": MODEL}
    out = kfold.ensure_kfold(tmp_path, "smoke", SEED, **kw)
    assert out == tmp_path / "kfold" / "model"
    assert kfold.is_complete(out) and (out / "roc.png").exists()
    stamp = (out / "fold0" / "best.pt").stat().st_mtime_ns
    assert kfold.ensure_kfold(tmp_path, "smoke", SEED, **kw) == out
    assert len(calls) == 1, "a finished run with the same parameters is reused, not retrained"
    assert (out / "fold0" / "best.pt").stat().st_mtime_ns == stamp
    kfold.ensure_kfold(tmp_path, "smoke", SEED, **{**kw, "lr": 1e-3})
    assert "replacing a finished run (changed: ['lr'])" in capsys.readouterr().out
    assert len(calls) == 2 and json.loads((out / "params.json").read_text())["lr"] == 1e-3
    log = pd.read_csv(out / "fold0" / "log.csv")
    assert log["lr"].iloc[0] == pytest.approx(1e-3), "retrained with the new parameters, not resumed from stale state"
    with pytest.raises(TypeError, match="unknown k-fold parameter"):
        kfold.ensure_kfold(tmp_path, "smoke", SEED, n_folds=3)


def test_oof_by_finding_scores_each_finding_against_normal_organs() -> None:
    import sys

    sys.path.insert(0, str(config.ROOT / "scripts"))
    from oof_by_finding import by_finding

    oof = pd.DataFrame({"case_id": ["a", "b", "c", "d"], "prob_liver_abnormal": [0.9, 0.2, 0.1, 0.4]})
    truth = pd.DataFrame({"study_id": ["a", "b", "c", "d"], "liver_abnormal": [1, 1, 0, 0],
                          "liver_cyst": [1, 0, 0, 0], "liver_mass": [0, 1, 0, 0], "liver_fatty": [0, 0, 0, 0],
                          "liver_hepatomegaly": [0, 0, 0, 0]})
    table = by_finding(oof, truth, "liver").set_index("finding")
    assert table.loc["cyst", "auc"] == 1.0 and table.loc["mass", "auc"] == 0.5  # 0.2 ranks between 0.1 and 0.4
    assert table.loc["fatty", "positives"] == 0 and np.isnan(table.loc["fatty", "auc"])


def _fake_run(out: Path, n_folds: int, finished: bool = True) -> Path:
    """The files that make a k-fold run finished (``is_complete``), with dummy checkpoints."""
    for k in range(n_folds):
        (out / f"fold{k}").mkdir(parents=True, exist_ok=True)
        (out / f"fold{k}" / "best.pt").write_bytes(b"x")
    (out / "params.json").write_text(json.dumps({"n_splits": n_folds}))
    if finished:
        (out / "metrics.json").write_text("{}")
    return out


def test_find_run_uses_finished_runs_in_fold_order_and_selects_folds(tmp_path: Path, monkeypatch) -> None:
    """One reader for explanation and export: finished = params.json + every fold's best.pt + metrics.json."""
    monkeypatch.setattr(kfold, "ensure_kfold", lambda *a, **kw: pytest.fail("a finished run is never retrained"))
    _fake_run(tmp_path / "kfold" / "model", 11)
    paths, name = kfold.find_run(tmp_path)
    assert name == "model" and [p.parent.name for p in paths] == [f"fold{k}" for k in range(11)]  # numeric order
    paths, _ = kfold.find_run(tmp_path, folds=[10, 2])
    assert [p.parent.name for p in paths] == ["fold2", "fold10"]
    with pytest.raises(DataError, match="no fold checkpoints"):
        kfold.find_run(tmp_path, folds=[70])
    explicit = [tmp_path / "x" / "fold0" / "best.pt"]
    assert kfold.find_run(tmp_path, checkpoints=explicit) == (explicit, "x")


def test_find_run_trains_only_unfinished_runs_with_the_default_seed(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_ensure(run_dir, profile, seed, name=kfold.STAGE_NAME, **kw):
        calls.append((profile, seed, name))
        return _fake_run(Path(run_dir) / "kfold" / name, 2)

    monkeypatch.setattr(kfold, "ensure_kfold", fake_ensure)
    _fake_run(tmp_path / "kfold" / "model", 2, finished=False)  # interrupted: no metrics.json
    _fake_run(tmp_path / "kfold" / "other", 3, finished=False)
    (tmp_path / "kfold" / "other" / "fold2" / "best.pt").unlink()  # a fold missing
    assert kfold.finished_runs(tmp_path) == []
    paths, name = kfold.find_run(tmp_path, profile="demo")
    assert name == "model" and len(paths) == 2 and calls == [("demo", config.DEFAULT_SEED, "model")]
    kfold.find_run(tmp_path, profile="demo")
    assert len(calls) == 1, "finished now: stage 04 is not asked again"
    assert kfold.finished_runs(tmp_path) == ["model"]


def test_predict_source_takes_every_registered_name_and_alias(tmp_path: Path) -> None:
    from lib import datasets

    assert kfold.predict_source("synthetic", tmp_path) == kfold.predict_source("synthetic-ct", tmp_path) \
        == tmp_path / "crops"
    assert kfold.predict_source("cxr", tmp_path) == shared("cxr-covid-3class", "Covid19-dataset")
    assert kfold.predict_source("brain", tmp_path) == shared("brain-mri-tumor") == datasets.locate("brain")[1]
    with pytest.raises(ValueError, match="Did you mean 'cxr-3class'"):
        kfold.predict_source("cxr-3clas", tmp_path)
    with pytest.raises(ValueError, match="not used by stage 04_kfold"):
        kfold.predict_source("trus", tmp_path)
