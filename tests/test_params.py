"""Notebook parameters: every parameter of every notebook has one declared type, the defaults and the profile
files satisfy them, and a wrong-typed value fails with a message naming the parameter, the type and the value."""

from __future__ import annotations

import re

import nbformat
import pytest
import yaml

from lib import config, params, pipeline

NOTEBOOKS = pipeline.notebooks()


def test_every_notebook_is_declared():
    assert {p.stem for p in NOTEBOOKS} == set(params.TYPES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_declared_names_are_the_parameters_cell(path):
    defaults = params.notebook_defaults(path)
    declared = params.TYPES[path.stem]
    assert not set(defaults) - set(declared), f"undeclared: {sorted(set(defaults) - set(declared))}"
    assert not set(declared) - set(defaults), f"stale: {sorted(set(declared) - set(defaults))}"
    params.check(path.stem, defaults)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_profiles_pass(path):
    source = config.PROFILES / f"{path.stem}.yaml"
    for name, values in (yaml.safe_load(source.read_text()) or {}).items():
        params.check_profile(path.stem, values or {}, f"{source} ({name})")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_cell_checks_the_parameters(path):
    """The first code cell after the parameters imports lib.params and checks this notebook's stem."""
    cells = nbformat.read(path, as_version=4).cells
    first = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    setup = next(c for c in cells[first + 1:] if c.cell_type == "code").source
    assert re.search(r"^from lib import .*\bparams\b", setup, re.M)
    assert re.search(rf'^params\.check\("{path.stem}", globals\(\)\)', setup, re.M)


@pytest.mark.parametrize(("name", "value", "expected", "shown"), [
    ("margin_mm", "abc", "float", "'abc' (str)"),
    ("structures", "liver", "list[str]", "'liver' (str)"),
    ("size", 64, "list[int]", "64 (int)"),
])
def test_known_bad_inputs_name_parameter_type_and_value(name, value, expected, shown):
    defaults = params.notebook_defaults(config.NOTEBOOKS / "02_crop_organs.ipynb")
    with pytest.raises(TypeError) as err:
        params.check("02_crop_organs", {**defaults, name: value})
    assert f"{name}: expected {expected}, got {shown}" in str(err.value)


def test_one_error_lists_every_bad_parameter():
    with pytest.raises(TypeError) as err:
        params.check("02_crop_organs", {"margin_mm": "abc", "structures": "liver", "size": 64, "k": 3})
    lines = str(err.value).splitlines()
    assert [ln.split(":")[0].strip() for ln in lines[1:]] == ["structures", "margin_mm", "size"]


@pytest.mark.parametrize(("stage", "values"), [
    ("02_crop_organs", {"workers": None, "spacing": None, "run_dir": None}),  # X | None takes None
    ("02_crop_organs", {"margin_mm": 5, "window": [40, 400], "size": (8, 32, 32)}),  # int for float, tuple for list
    ("02_crop_organs", {"window": "liver", "spacing": [1, 1.5, 2.0], "workers": 2}),
    ("05_explain", {"occlusion_mode": 0.0, "deletion_baseline": "blur", "checkpoints": ["a/best.pt"]}),
    ("03_train", {"label_cols": ["liver_fatty"], "run_dir": config.ROOT, "min_val_score": 0.8}),
    ("04_kfold", {"model_kwargs": {}, "label_noise_params": {"epochs": 3}, "organ": None}),
])
def test_accepted_values(stage, values):
    params.check(stage, values)


@pytest.mark.parametrize(("stage", "name", "value"), [
    ("03_train", "epochs", True),  # bool is not an int
    ("03_train", "lr", False),  # ... nor a float
    ("03_train", "pretrained", 1),  # and an int is not a bool
    ("03_train", "epochs", 6.0),  # a float is not an int
    ("02_crop_organs", "workers", "2"),
    ("02_crop_organs", "size", [16, "64", 64]),
    ("05_explain", "folds", 0),
    ("04_kfold", "model_kwargs", [1, 2]),
    ("00_eda", "min_cases", None),
])
def test_rejected_values(stage, name, value):
    with pytest.raises(TypeError, match=rf"{name}: expected .*, got {re.escape(repr(value))}"):
        params.check(stage, {name: value})


def test_undeclared_globals_are_ignored():
    params.check("00_eda", {"np": object(), "_": "x", "profile": "smoke"})


def test_unknown_stage():
    with pytest.raises(KeyError, match="99_nope"):
        params.check("99_nope", {})


def test_profile_with_unknown_key_or_wrong_type_names_the_file():
    with pytest.raises(TypeError) as err:
        params.check_profile("04_kfold", {"epoch": 3, "n_splits": "5"}, "profiles/04_kfold.yaml (demo)")
    msg = str(err.value)
    assert msg.startswith("profiles/04_kfold.yaml (demo)")
    assert "epoch: not a parameter of notebook 04_kfold" in msg
    assert "n_splits: expected int, got '5' (str)" in msg


def test_pipeline_refuses_a_bad_profile_before_any_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(config, "PROFILES", tmp_path)
    (tmp_path / "00_eda.yaml").write_text("smoke: {min_cases: many}\n")
    with pytest.raises(TypeError, match=r"00_eda\.yaml \(smoke profile\).*\n.*min_cases: expected int"):
        pipeline.run("smoke", only=["00"], run_id="bad")
    assert not (tmp_path / "runs").exists()


def test_type_names():
    assert params.type_name(params.TYPES["05_explain"]["checkpoints"]) == "list[str | Path] | None"
    assert params.type_name(params.TYPES["04_kfold"]["model_kwargs"]) == "dict[str, Any]"


def test_notebook_03_takes_every_training_knob_of_mednb_train():
    """What ``mednb train`` can set on ``TrainConfig`` is a notebook 03 parameter too, declared and passed on to
    ``TrainConfig`` in the training cell (so ``mednb run -p loss=focal`` trains with the focal loss)."""
    from dataclasses import fields

    from lib import cli, train

    knobs = {f.name for f in fields(train.TrainConfig)} & {p.name for p in cli.train.params}
    assert {"loss", "save_every", "extend", "lr", "optimizer"} <= knobs
    path = config.NOTEBOOKS / "03_train.ipynb"
    assert knobs <= set(params.TYPES["03_train"]), sorted(knobs - set(params.TYPES["03_train"]))
    code = "".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    call = code[code.index("train.TrainConfig("):]
    call = call[:call.index(")\n")]
    missing = [k for k in knobs if not re.search(rf"\b{k}={k}\b", call)]
    assert not missing, f"notebook 03 does not pass {missing} to TrainConfig"
