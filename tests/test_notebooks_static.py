"""Notebook hygiene: named NN_topic, one `parameters` cell, no function/class definitions, no stored
outputs, at least one assertion cell, a profile file for every notebook, and the standard opening."""

from __future__ import annotations

import re

import nbformat
import pytest
import yaml

from lib import config, pipeline

NOTEBOOKS = pipeline.notebooks()


def test_there_are_notebooks():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "00_eda.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_hygiene(path):
    assert re.match(r"^\d\d_[a-z0-9_]+\.ipynb$", path.name)
    nb = nbformat.read(path, as_version=4)
    cells = nb.cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith(f"# {path.name[:2]}"), \
        "opens with a '# NN · title' markdown cell"
    params = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    assert all(c.cell_type == "markdown" for c in cells[:params[0]]), "only narrative before the parameters"
    code = [c for c in cells if c.cell_type == "code"]
    for c in code:
        assert not re.search(r"^\s*(async\s+)?(def|class)\s", c.source, re.M), f"definition in: {c.source[:80]}"
        assert not c.get("outputs") and c.get("execution_count") is None, "outputs must be stripped"
    assert any(re.search(r"^\s*assert\s", c.source, re.M) for c in code), "no assertion cell"
    src = cells[params[0]].source
    for name in ("profile", "seed", "run_dir"):
        assert re.search(rf"^{name}\s*=", src, re.M), f"parameter {name} missing"
    assert re.search(r'^profile\s*=\s*"smoke"', src, re.M), "defaults are the smoke profile (what nbval runs)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_profiles_exist(path):
    prof = config.PROFILES / f"{path.stem}.yaml"
    assert prof.exists(), f"{prof} missing"
    table = yaml.safe_load(prof.read_text()) or {}
    assert {"smoke", "demo", "full"} <= set(table), f"{prof}: needs smoke, demo and full"
