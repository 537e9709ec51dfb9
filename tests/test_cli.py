"""The ``mednb`` command: every subcommand's help, real small invocations, clear errors, study parameters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from lib import cli, config, overrides

COMMANDS = [["label"], ["crop"], ["train"], ["kfold"], ["kfold", "train"], ["kfold", "predict"], ["kfold", "merge"],
            ["evaluate"], ["explain"], ["export"], ["serve"], ["segment"], ["segment", "predict"],
            ["segment", "export"], ["run"], ["results"]]


def invoke(*args: str) -> tuple[int, str]:
    """Exit code and output (stdout + stderr) of ``mednb args`` through ``lib.cli.main``."""
    runner = CliRunner()
    result = runner.invoke(cli.cli, list(args), prog_name="mednb", catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_subcommand_has_help(command):
    code, out = invoke(*command, "--help")
    assert code == 0, out
    assert f"Usage: mednb {' '.join(command)}" in out and "--help" in out


def test_module_entry_points_print_help():
    env = {**os.environ, "PYTHONPATH": str(config.ROOT)}
    for module, words in (("lib", "Commands:"), ("lib.crop", "--imagedir"), ("lib.train", "--epochs"),
                          ("lib.export", "--run-dir"), ("lib.evaluate", "--weights")):
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env,
                              cwd=config.ROOT, timeout=120)
        assert done.returncode == 0 and words in done.stdout, (module, done.stdout, done.stderr)


def test_console_script_declared():
    text = (config.ROOT / "pyproject.toml").read_text()
    assert 'mednb = "lib.cli:main"' in text


# ------------------------------------------------------------------------------------------------------ crop

def test_crop_input_layout_discovered(smoke_cohort, tmp_path):
    out = tmp_path / "crops"
    code, text = invoke("crop", "--input", str(smoke_cohort), "--out", str(out), "--organ", "liver",
                        "--organ", "spleen", "--mode", "bbox", "--mode", "25d", "--workers", "1",
                        "--size", "8", "32", "32")
    assert code == 0, text
    index = pd.read_csv(out / "index.csv")
    n_cases = len(pd.read_csv(smoke_cohort / "studies.csv"))
    assert set(index["structure"]) == {"liver", "spleen"} and set(index["mode"]) == {"bbox", "25d"}
    assert len(index) == 2 * 2 * n_cases
    assert f"{len(index)} crops of {n_cases} cases" in text


def test_crop_imagedir_maskdir(smoke_cohort, tmp_path):
    images, masks = tmp_path / "ct", tmp_path / "seg"
    shutil.copytree(smoke_cohort / "ct", images)
    shutil.copytree(smoke_cohort / "seg", masks)
    shutil.copy(smoke_cohort / "class_map.json", masks / "class_map.json")
    first = sorted(masks.glob("*.nii.gz"))[0]
    first.unlink()  # a case without a mask is reported, the others cropped
    out = tmp_path / "crops"
    code, text = invoke("crop", "--imagedir", str(images), "--maskdir", str(masks), "--out", str(out),
                        "--organ", "liver", "--workers", "1", "--size", "8", "32", "32")
    assert code == 0, text
    index = pd.read_csv(out / "index.csv")
    skipped = pd.read_csv(out / "skipped_crop.csv")
    n = len(list(images.glob("*.nii.gz")))
    assert len(index) == n - 1 and set(index["structure"]) == {"liver"}
    assert skipped["case"].tolist() == [first.name.removesuffix(".nii.gz")]


def test_crop_usage_errors(tmp_path):
    code, text = invoke("crop", "--out", str(tmp_path))
    assert code == 2 and "give either --input DIR or --imagedir DIR --maskdir DIR" in text
    code, text = invoke("crop", "--imagedir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "--imagedir and --maskdir go together" in text
    code, text = invoke("crop", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 1 and "not a folder" in text and "Traceback" not in text
    code, text = invoke("crop", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--mode", "cube")
    assert code == 2 and "'cube' is not one of" in text


# ----------------------------------------------------------------------------------------------------- label

def test_label_writes_labels(smoke_cohort, tmp_path):
    code, text = invoke("label", "--cohort", str(smoke_cohort), "--out", str(tmp_path), "--lang", "en")
    assert code == 0, text
    labels = pd.read_csv(tmp_path / "labels.csv")
    assert len(labels) == len(pd.read_csv(smoke_cohort / "studies.csv"))
    code, text = invoke("label", "--cohort", str(tmp_path / "missing"), "--out", str(tmp_path))
    assert code == 1 and "reports.csv" in text


# -------------------------------------------------------------------------------- train, predict, evaluate

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Two classes of 32-px PNGs a small CNN separates (bright square vs none), in class folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("no", "yes"):
        (root / label).mkdir()
        for i in range(14):
            img = rng.integers(0, 60, (32, 32)).astype(np.uint8)
            if label == "yes":
                r, c = rng.integers(4, 20, 2)
                img[r:r + 10, c:c + 10] = 230
            Image.fromarray(img).save(root / label / f"{label}{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    code, text = invoke("train", "--dataset", str(image_folder), "--out", str(run_dir), "--input-kind", "2d",
                        "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--augment", "none")
    assert code == 0, text
    assert "best auc" in text
    return run_dir / "train" / "model" / "best.pt"


def test_train_writes_checkpoint(trained):
    assert trained.exists() and (trained.parent / "log.csv").exists()


def test_train_rerun_with_changed_settings_is_refused(trained, image_folder):
    run_dir = trained.parents[2]
    code, text = invoke("train", "--dataset", str(image_folder), "--out", str(run_dir), "--input-kind", "2d",
                        "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--augment", "none",
                        "--optimizer", "SGD", "--lr", "0.01")
    assert code == 1 and "ConfigChangedError" in text and "lr: 0.002 -> 0.01" in text and "optimizer" in text
    code, text = invoke("train", "--dataset", str(image_folder), "--out", str(run_dir), "--name", "flags",
                        "--input-kind", "2d", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
                        "--augment", "flip+invert", "--loss", "focal", "--optimizer", "RMSprop", "--save-every", "1")
    assert code == 0, text
    assert (run_dir / "train" / "flags" / "epoch001.pt").exists()


def test_kfold_predict_and_merge(trained, image_folder, tmp_path):
    code, text = invoke("kfold", "predict", "--ckpt", str(trained), "--input", str(image_folder), "--out",
                        str(tmp_path / "p.csv"))
    assert code == 0, text
    pred = pd.read_csv(tmp_path / "p.csv")
    assert len(pred) == 28 and "prob_yes" in pred
    code, text = invoke("kfold", "merge", str(tmp_path / "p.csv"), str(tmp_path / "p.csv"), "--out",
                        str(tmp_path / "m.csv"))
    assert code == 0, text
    assert np.allclose(pd.read_csv(tmp_path / "m.csv")["prob_yes"], pred["prob_yes"])


def test_evaluate_weights(trained, image_folder, tmp_path):
    code, text = invoke("evaluate", "--weights", str(trained), "--weights", str(trained), "--data",
                        str(image_folder), "--out", str(tmp_path), "--n-boot", "20")
    assert code == 0, text
    for name in ("metrics.json", "roc.png", "pr.png", "confusion.png", "predictions.csv"):
        assert (tmp_path / name).exists(), name
    scores = json.loads((tmp_path / "metrics.json").read_text())
    assert set(scores["models"]) == {"0", "1", "ensemble"} and scores["models"]["0"]["n"] == 28
    pred = pd.read_csv(tmp_path / "predictions.csv")
    part = pred[pred["model"] == "0"]
    from sklearn.metrics import roc_auc_score

    assert scores["models"]["0"]["auc"] == pytest.approx(roc_auc_score(part["true_yes"], part["prob_yes"]))


def test_evaluate_kfold_run(tmp_path):
    """Per-fold and pooled metrics and figures from a k-fold run's out-of-fold table."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    p = np.clip(0.3 * y + rng.random(60) * 0.7, 0, 1)
    kdir = tmp_path / "kfold" / "model"
    kdir.mkdir(parents=True)
    pd.DataFrame({"fold": np.repeat([0, 1, 2], 20), "row": range(60), "true_yes": y, "prob_yes": p}).to_csv(
        kdir / "oof.csv", index=False)
    (kdir / "metrics.json").write_text(json.dumps({"task": "binary", "label_names": ["no", "yes"]}))
    code, text = invoke("evaluate", "--kfold", str(kdir), "--n-boot", "20")
    assert code == 0, text
    out = kdir / "evaluate"
    scores = json.loads((out / "metrics.json").read_text())
    assert set(scores["folds"]) == {"0", "1", "2"} and scores["pooled"]["n"] == 60
    from sklearn.metrics import roc_auc_score

    assert scores["pooled"]["auc"] == pytest.approx(roc_auc_score(y, p))
    assert scores["folds"]["1"]["auc"] == pytest.approx(roc_auc_score(y[20:40], p[20:40]))
    assert all((out / f).exists() for f in ("roc.png", "pr.png", "confusion.png"))


def test_evaluate_errors(tmp_path):
    code, text = invoke("evaluate", "--out", str(tmp_path))
    assert code == 2 and "give either --kfold DIR or --weights FILE --data DIR" in text
    code, text = invoke("evaluate", "--kfold", str(tmp_path))
    assert code == 1 and "no metrics.json" in text and "Traceback" not in text


# --------------------------------------------------------------------------------------------------- scheduler

SCHEDULED = [["label"], ["crop"], ["kfold", "predict"], ["evaluate"]]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", SCHEDULED, ids=" ".join)
@pytest.mark.parametrize("value", ["http://host:8786", "tcp://", "cluster-7", str(Path("missing", "sched.json"))])
def test_scheduler_option_refuses_bad_values_before_any_work(command, value, tmp_path):
    code, text = invoke(*command, "--scheduler", value)
    assert code == 2, text
    assert "Invalid value for '--scheduler'" in text and "Traceback" not in text
    assert ("expected" in text or "not found" in text) and value.split("://")[0] in text
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", SCHEDULED, ids=" ".join)
def test_scheduler_option_is_documented(command):
    code, out = invoke(*command, "--help")
    assert code == 0 and "--scheduler" in out and "tcp://HOST:PORT" in out


def test_evaluate_kfold_refuses_a_scheduler(tmp_path):
    code, text = invoke("evaluate", "--kfold", str(tmp_path), "--scheduler", "local")
    assert code == 2 and "--scheduler decodes the images of --weights" in text


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_scheduler_local_gives_the_same_bytes_as_the_default(smoke_cohort, trained, image_folder, tmp_path):
    """Each command with ``--scheduler local`` (a Dask LocalCluster) writes exactly the files of the default run."""
    from lib import kfold

    runs = {
        "label": ["label", "--cohort", str(smoke_cohort), "--lang", "en", "--out"],
        "crop": ["crop", "--input", str(smoke_cohort), "--organ", "liver", "--size", "8", "32", "32", "--out"],
        "predict": ["kfold", "predict", "--ckpt", str(trained), "--input", str(image_folder), "--out"],
        "evaluate": ["evaluate", "--weights", str(trained), "--weights", str(trained), "--data", str(image_folder),
                     "--n-boot", "20", "--out"],
    }
    for name, args in runs.items():
        trees = {}
        for scheduler in ("none", "local"):
            kfold._PREDICT_CACHE.clear()  # predictions are cached per input folder: decode again on the cluster
            out = tmp_path / name / scheduler
            target = out / "p.csv" if name == "predict" else out
            code, text = invoke(*args, str(target), "--scheduler", scheduler)
            assert code == 0, (name, scheduler, text)
            trees[scheduler] = _tree_bytes(out)
        assert trees["none"] and trees["none"].keys() == trees["local"].keys(), name
        assert [k for k in trees["none"] if trees["none"][k] != trees["local"][k]] == [], name


def test_serve_and_segment_errors(tmp_path):
    code, text = invoke("segment", "predict", "--model", str(tmp_path / "none.pt"), "--input", str(tmp_path),
                        "--out", str(tmp_path / "o"))
    assert code == 2 and "does not exist" in text
    code, text = invoke("export", "--run-dir", str(tmp_path), "--ckpt", str(tmp_path / "x.pt"))
    assert code == 2 and "does not exist" in text


# ------------------------------------------------------------------------------------------- study parameters

def test_parse_values_as_yaml():
    got = overrides.parse_assignments(["epochs=3", "lr=1e-3", "dataset=brain-mri", "folds=[0, 1]", "label=null",
                                       "pretrained=true", "organ=None", "name=a=b"])
    assert got == {"epochs": 3, "lr": 1e-3, "dataset": "brain-mri", "folds": [0, 1], "label": None,
                   "pretrained": True, "organ": None, "name": "a=b"}
    with pytest.raises(overrides.StudyError, match="expected key=value"):
        overrides.parse_assignments(["epochs"])


def test_resolve_spreads_and_validates():
    stems = ["00_eda", "03_train", "04_kfold", "07_export_serve"]
    got = overrides.resolve(stems, {"dataset": "brain-mri"}, {"04": {"epochs": 2}}, last={"epochs": 3})
    assert got == {"00_eda": {"dataset": "brain-mri"}, "03_train": {"dataset": "brain-mri", "epochs": 3},
                   "04_kfold": {"dataset": "brain-mri", "epochs": 3}}
    assert overrides.resolve(stems, {}, {"04_kfold": {"epochs": 2}}) == {"04_kfold": {"epochs": 2}}
    with pytest.raises(overrides.StudyError) as err:
        overrides.resolve(stems, {"epochs": "three", "bogus": 1, "seed": 3, "n_cases": 2}, {"03": {"mask_mode": "x"}})
    text = str(err.value)
    assert "03_train: epochs: expected int, got 'three'" in text and "04_kfold: epochs: expected int" in text
    assert "bogus: unknown parameter (no notebook declares it)" in text
    assert "seed: set by the pipeline (use --seed)" in text
    assert "n_cases: unknown parameter (declared by 05_explain, none of which runs here)" in text
    assert "03.mask_mode: not a parameter of notebook 03_train" in text


def test_study_file(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("dataset: brain-mri\n04:\n  epochs: 2\n03_train:\n  lr: 0.01\n")
    got = overrides.study_overrides(["03_train", "04_kfold"], study, ["epochs=4"])
    assert got == {"03_train": {"dataset": "brain-mri", "lr": 0.01, "epochs": 4},
                   "04_kfold": {"dataset": "brain-mri", "epochs": 4}}
    study.write_text("- a list\n")
    with pytest.raises(overrides.StudyError, match="expected a mapping"):
        overrides.study_overrides(["03_train"], study)


def test_run_refuses_bad_parameters_before_any_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "RUNS", tmp_path / "runs")
    code, text = invoke("run", "--profile", "smoke", "--only", "00", "-p", "min_cases=lots", "-p", "nope=1",
                        "--run-id", "bad")
    assert code == 1 and "min_cases: expected int, got 'lots'" in text and "nope: unknown parameter" in text
    assert not (tmp_path / "runs" / "bad").exists()
    code, text = invoke("run", "--only", "99")
    assert code == 2 and "no such notebook numbers" in text


def test_run_injects_and_records_parameters(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "RUNS", tmp_path / "runs")
    code, text = invoke("run", "--profile", "smoke", "--only", "00", "-p", "min_cases=2", "--run-id", "p1")
    assert code == 0, text
    run_dir = tmp_path / "runs" / "p1"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["overrides"] == {"00_eda": {"min_cases": 2}} and info["status"] == "ok"
    assert info["stages"][0]["overrides"] == {"min_cases": 2}
    nb = json.loads((run_dir / "notebooks" / "00_eda.ipynb").read_text())
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and "min_cases = 2" in "".join(injected[0]["source"])
    code, text = invoke("run", "--profile", "smoke", "--only", "00", "-p", "min_cases=3", "--run-id", "p1",
                        "--resume")
    assert code == 1 and "would mix two runs" in text


def test_stages_that_do_not_apply_are_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "RUNS", tmp_path / "runs")
    code, text = invoke("run", "--profile", "smoke", "--only", "01", "--only", "02", "--only", "06", "-p",
                        "dataset=brain-mri", "--run-id", "s1")
    assert code == 0, text
    info = json.loads((tmp_path / "runs" / "s1" / "run.json").read_text())
    status = {s["notebook"]: (s["status"], s.get("reason", "")) for s in info["stages"]}
    assert set(status) == {"01_labels_from_reports.ipynb", "02_crop_organs.ipynb", "06_segment.ipynb"}
    assert all(st == "skipped" and "brain-mri" in why for st, why in status.values())
    assert "no reports to label" in status["01_labels_from_reports.ipynb"][1]
    assert info["status"] == "ok" and "skipped" in text
    assert overrides.not_applicable("03_train", {"dataset": "brain-mri"}, {"03_train": {"dataset": "brain-mri"}}) \
        is None
    assert overrides.not_applicable("02_crop_organs", {}, {"04_kfold": {"dataset": "synthetic-ct"}}) is None
    assert overrides.not_applicable("00_eda", {"dataset": "cxr"}, {"00_eda": {"dataset": "cxr"}}) is None  # 2D EDA
    assert "not a segmentation set" in overrides.not_applicable("06_segment", {"dataset": "/data/ct"},
                                                                {"06_segment": {"dataset": "/data/ct"}})
    assert overrides.not_applicable("06_segment", {"dataset": "trus"}) is None
    report = (tmp_path / "runs" / "s1" / "report.html").read_text()
    assert "skipped: dataset brain-mri: labels come from its class folders" in report


@pytest.mark.parametrize(("dataset", "folder"), [("brain-mri", "brain-mri-tumor"), ("cxr", "cxr-covid-3class")])
def test_eda_runs_on_2d_sets_and_the_ct_stages_are_skipped(tmp_path, monkeypatch, dataset, folder):
    """Notebook 00 describes a 2D set (classes, sizes, duplicate groups); reports, crops and segmentation are
    recorded as skipped with their reason."""
    from tests.conftest import shared

    shared(folder)
    monkeypatch.setattr(config, "RUNS", tmp_path / "runs")
    code, text = invoke("run", "--profile", "smoke", "--only", "00", "--only", "01", "--only", "02", "--only", "06",
                        "-p", f"dataset={dataset}", "--run-id", "e")
    info = json.loads((tmp_path / "runs" / "e" / "run.json").read_text())
    status = {s["notebook"][:2]: s["status"] for s in info["stages"]}
    assert code == 0 and status == {"00": "ok", "01": "skipped", "02": "skipped", "06": "skipped"}, (status, text)
    images = pd.read_csv(tmp_path / "runs" / "e" / "eda" / "images.csv")
    assert images["label"].nunique() == (2 if dataset == "brain-mri" else 3)
    assert len(images) > 200 and (images[["width", "height"]] > 0).all().all()
    assert (images.groupby("group")["label"].nunique() == 1).all()  # duplicates never span classes in these sets
    assert (tmp_path / "runs" / "e" / "eda" / "figures" / "image_set.png").exists()


def test_predict_source_takes_aliases_and_paths(tmp_path):
    from lib import kfold

    assert kfold.predict_source("cxr", tmp_path) == kfold.predict_source("cxr-3class", tmp_path)
    assert kfold.predict_source(str(tmp_path), tmp_path / "run") == tmp_path
    assert kfold.predict_source("synthetic-ct", tmp_path) == tmp_path / "crops"
