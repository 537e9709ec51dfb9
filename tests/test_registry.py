"""The shared registries: data sets by name (every name through every stage entry point that takes it), the model
factory (every family), the JSON writer, the fingerprint helper and stage-04 parameters declared once."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lib import cache, config, crop, datasets, eda, io, kfold, models, params

SEED = config.DEFAULT_SEED


# ----------------------------------------------------------------------------- data sets


def test_names_aliases_and_did_you_mean() -> None:
    assert set(datasets.names()) >= {"synthetic-ct", "ct-totalseg", "brain-mri", "cxr-3class", "trus", "ms-lesion",
                                     "ct-organs"}
    assert datasets.get("cxr").name == "cxr-3class" and datasets.get("Synthetic").name == "synthetic-ct"
    assert datasets.canonical("brain") == "brain-mri" and datasets.canonical("synthetic") == "synthetic-ct"
    with pytest.raises(ValueError, match="Did you mean 'synthetic-ct'") as err:
        datasets.get("synthtic")
    assert "Registered: synthetic-ct" in str(err.value)
    with pytest.raises(ValueError, match="Or give an existing folder or CSV file"):
        datasets.lookup("no-such-set-or-folder")
    with pytest.raises(ValueError, match=r"not used by stage 04_kfold \(it is for 06_segment\)"):
        datasets.get("trus", "04_kfold")
    with pytest.raises(ValueError, match="already registered"):
        datasets.register(datasets.get("cxr"))
    assert datasets.has_truth("synthetic") and not datasets.has_truth("cxr-3class")


def test_metadata_is_consistent() -> None:
    stems = {p.stem for p in config.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")}
    for name in datasets.names():
        info = datasets.get(name)
        assert info.kind in ("2d", "3d") and info.inputs in ("crops", "images", "volumes"), name
        assert set(info.stages) <= stems and info.stages, name
        for stage in info.stages:  # every stage a set names has a dataset parameter
            assert "dataset" in params.TYPES[stage], (name, stage)
    assert datasets.lookup(config.ROOT / "data") == config.ROOT / "data"  # a folder stays a folder
    assert datasets.lookup("data") == (config.ROOT / "data").resolve() or Path("data").exists()


def _located(name: str) -> Path:
    """The set's folder; a real set that is missing here is skipped (and fails in CI, where it exists)."""
    try:
        return datasets.locate(name, "smoke", SEED)[1]
    except io.DataError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run folder shared by the entry points (the synthetic crops are made once, by the first that needs them)."""
    return tmp_path_factory.mktemp("run")


def _eda(name: str, run: Path) -> int:
    if eda.is_image_set(name):  # 2D sets: classes, sizes and duplicate groups
        images = eda.open_image_set(name, "smoke", SEED)
        stats = eda.image_stats(images)
        assert images.name == datasets.canonical(name) and (stats[["width", "height", "channels"]] > 0).all().all()
        return len(stats)
    ds = eda.open_dataset(name, "smoke", SEED)
    assert ds.class_map and ds.name == datasets.canonical(name)
    return len(ds.cases)


def _crop(name: str, run: Path) -> int:
    cases, root = crop.open_cases(name, "smoke", SEED)
    assert root == _located(name)
    return len(cases)


def _train(name: str, run: Path) -> int:
    ds, group = datasets.build_dataset(name, run, "smoke", SEED, label_source="truth", organ="liver",
                                       kind="slab", n_slices=2, size=16)
    assert group == datasets.get(name).group_col and group in ds.table
    model = models.create_model("resnet10t", ds.in_chans, ds.num_classes)  # one training step
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = ds[0][0][None].repeat(2, 1, 1, 1), ds.y[:1].repeat(2, *([1] * (ds.y.ndim - 1)))
    loss = (torch.nn.functional.cross_entropy(model(x), y) if ds.task == "multiclass"
            else torch.nn.functional.binary_cross_entropy_with_logits(model(x), y))
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())
    return len(ds)


def _kfold(name: str, run: Path) -> int:
    p = kfold.stage_params("smoke", dataset=name, label_source="truth", image_size=16, n_slices=2)
    ds, group = kfold.build_stage_dataset(p, run, "smoke", SEED)
    assert kfold.predict_source(name, run).exists() and group in ds.table
    return len(ds)


def _explain(name: str, run: Path) -> int:
    assert datasets.get(name, "05_explain").lesion_masks  # localisation scores need lesion masks
    return 1


def _segment(name: str, run: Path) -> int:
    from lib.segmentation.data import load_dataset

    kw = {"ms-lesion": {"max_slices_per_patient": 1}, "ct-organs": {"structure": "liver"}}.get(name, {})
    return len(load_dataset(datasets.canonical(name, "06_segment"), "smoke", SEED, run_dir=run, **kw).table)


ENTRY_POINTS = {"00_eda": _eda, "02_crop_organs": _crop, "03_train": _train, "04_kfold": _kfold,
                "05_explain": _explain, "06_segment": _segment}
PAIRS = [(stage, name) for name in datasets.names() for stage in datasets.get(name).stages]


def test_every_stage_with_a_dataset_parameter_has_an_entry_point() -> None:
    assert {s for s, types in params.TYPES.items() if "dataset" in types} == set(ENTRY_POINTS)


@pytest.mark.parametrize(("stage", "name"), PAIRS, ids=[f"{s}-{n}" for s, n in PAIRS])
def test_every_registered_name_through_every_stage_that_takes_it(stage: str, name: str, run_dir: Path) -> None:
    _located(name)
    assert ENTRY_POINTS[stage](name, run_dir) > 0
    alias = next(iter(datasets.get(name).aliases), None)
    if alias and stage == "02_crop_organs":  # aliases reach the same data
        assert crop.open_cases(alias, "smoke", SEED)[1] == crop.open_cases(name, "smoke", SEED)[1]


def test_a_stage_refuses_a_set_it_does_not_use(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="not used by stage 02_crop_organs"):
        crop.open_cases("brain-mri")
    with pytest.raises(ValueError, match="Did you mean 'ct-totalseg'"):
        eda.open_dataset("ct-totalsg")


# ----------------------------------------------------------------------------- models


FAMILY_CASES = {
    "timm": ("resnet10t", 3, (2, 3, 32, 32), (2, 2)),
    "timm:": ("timm:resnet10t", 1, (2, 1, 32, 32), (2, 2)),
    "mil": ("mil:resnet10t", 4, (2, 4, 32, 32), (2, 2)),
    "monai": ("monai:resnet10", 1, (2, 1, 16, 16, 16), (2, 2)),
    "monai-2d-seg": ("monai:UNet", 1, (2, 1, 32, 32), (2, 2, 32, 32)),
    "smp": ("smp:fpn-resnet18", 1, (2, 1, 64, 64), (2, 2, 64, 64)),
}


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_every_model_family_through_create_model(case: str) -> None:
    name, chans, shape, out = FAMILY_CASES[case]
    kw = {"spatial_dims": 2} if name == "monai:UNet" else {}
    torch.manual_seed(0)
    net = models.create_model(name, chans, 2, **kw).eval()
    with torch.no_grad():
        assert tuple(net(torch.rand(*shape)).shape) == out
    assert case.rstrip(":-2dseg") in models.FAMILIES or case in ("monai-2d-seg",)


def test_registered_families_are_all_covered() -> None:
    assert set(models.FAMILIES) == {models.parse_name(n)[0] for n, *_ in FAMILY_CASES.values()}


def test_model_names_one_syntax_and_clear_errors() -> None:
    assert models.parse_name("resnet10t") == models.parse_name("timm:resnet10t") == ("timm", "resnet10t")
    assert models.parse_name("smp:unet-tu-resnet10t") == ("smp", "unet-tu-resnet10t")
    with pytest.raises(ValueError, match="write monai:UNet"):
        models.create_model("monai-unet")
    with pytest.raises(ValueError, match="write smp:fpn-<encoder>"):
        models.create_model("fpn")
    with pytest.raises(ValueError, match="unknown model family 'tv'"):
        models.create_model("tv:resnet18")
    with pytest.raises(ValueError, match="unknown segmentation-models-pytorch architecture"):
        models.create_model("smp:fpnx-resnet18")
    with pytest.raises(ValueError, match="no pretrained weights"):
        models.create_model("monai:resnet10", pretrained=True)
    with pytest.raises(ValueError, match="disagree"):
        models.create_model("smp:fpn-resnet18", encoder="resnet34")


def test_smp_encoder_keyword_and_name_agree() -> None:
    torch.manual_seed(0)
    a = models.create_model("smp:unet-resnet18", 1, 1)
    torch.manual_seed(0)
    b = models.create_model("smp:unet", 1, 1, encoder="resnet18")
    assert [k for k in a.state_dict()] == [k for k in b.state_dict()]


# ----------------------------------------------------------------------------- JSON, fingerprints, parameters


def test_write_json_is_strict_numpy_aware_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a" / "m.json"
    io.write_json(path, {"x": np.float32(0.5), "n": np.int64(3), "v": np.arange(2), "bad": float("nan"),
                         "t": (1, 2), 4: Path("p"), "s": {"b", "a"}})
    assert json.loads(path.read_text()) == {"x": 0.5, "n": 3, "v": [0, 1], "bad": None, "t": [1, 2], "4": "p",
                                            "s": ["a", "b"]}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]  # no temporary left behind
    def crash(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):  # a failed write leaves the old file whole
        io.write_json(path, {"x": 1})
    monkeypatch.undo()
    assert json.loads(path.read_text())["n"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(io.DataError, match="broken.json: class map is not valid JSON"):
        io.read_json(tmp_path / "broken.json", "class map")


def test_fingerprint_notices_parameters_inputs_and_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = tmp_path / "fp_probe_mod.py"
    mod.write_text("X = 1\n")
    data = tmp_path / "input.bin"
    data.write_bytes(b"a")
    monkeypatch.syspath_prepend(str(tmp_path))
    cache._module_digest.cache_clear()
    base = cache.fingerprint({"a": 1}, ["fp_probe_mod"], files=[data])
    assert base == cache.fingerprint({"a": 1}, ["fp_probe_mod"], files=[data])
    assert base != cache.fingerprint({"a": 2}, ["fp_probe_mod"], files=[data])
    data.write_bytes(b"b")
    assert base != cache.fingerprint({"a": 1}, ["fp_probe_mod"], files=[data])
    data.write_bytes(b"a")
    mod.write_text("X = 2\n")  # the code changed
    cache._module_digest.cache_clear()
    assert base != cache.fingerprint({"a": 1}, ["fp_probe_mod"], files=[data])
    with pytest.raises(ValueError, match="no source file"):
        cache.source_digest(["no_such_module_xyz"])
    sys.modules.pop("fp_probe_mod", None)


def test_caches_key_on_their_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """Crops and k-fold runs are keyed on the source of the modules that make them."""
    case = {"case_id": "c", "image": "", "mask": ""}
    p = crop.CropParams()
    before = crop.case_hash(case, ["liver"], p)
    assert kfold.run_params("smoke", SEED)["code"] == cache.source_digest(kfold.KFOLD_CODE)
    monkeypatch.setattr(cache, "_module_digest", lambda name: "edited" if name == "lib.crop" else name)
    assert crop.case_hash(case, ["liver"], p) != before


def test_stage04_defaults_come_from_the_notebook_and_profiles_are_checked(tmp_path: Path, monkeypatch) -> None:
    nb = params.notebook_defaults(config.NOTEBOOKS / "04_kfold.ipynb")
    assert set(nb) - set(kfold.STAGE_DEFAULTS) == set(kfold._RUN_CONTROL)
    assert all(kfold.STAGE_DEFAULTS[k] == nb[k] for k in kfold.STAGE_DEFAULTS)
    used = {*kfold._INPUT_KEYS, *kfold._RUN_KEYS, "epochs", "lr", "optimizer", "scheduler", "patience", "select"}
    assert used <= set(kfold.STAGE_DEFAULTS), "every parameter the k-fold run reads has a declared default"
    (tmp_path / "04_kfold.yaml").write_text("demo:\n  epochs: '12'\n")
    monkeypatch.setattr(config, "PROFILES", tmp_path)
    with pytest.raises(TypeError, match="epochs: expected int"):
        kfold.stage_params("demo")
