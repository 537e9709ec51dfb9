"""The run report and the runs index, built from a small fake run folder: summary first, progress bars dropped,
nothing fetched from the network; and the page as a reader meets it, in headless Chromium."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nbformat
import pytest
from PIL import Image

from lib import report
from tests.test_serve_e2e import CHROMIUM_FLAGS, _chromium

SECRET_CODE = "answer = compute_the_answer()"


def fake_run(runs: Path, name: str = "20260101-000000-smoke", auc: float = 0.907) -> Path:
    """A finished run folder as lib.pipeline leaves it: run.json, metrics.json, one executed notebook, figures."""
    run_dir = runs / name
    (run_dir / "notebooks").mkdir(parents=True)
    info = {"profile": "smoke", "seed": 7, "commit": "abcdef1234567", "started": "2026-01-01T00:00:00",
            "status": "ok", "cores": 2, "wall_s": 12.5, "cpu_s": 20.0, "cores_used": 1.6,
            "stages": [{"notebook": "04_kfold.ipynb", "status": "ok", "attempt": 1, "cores_granted": 2,
                        "wall_s": 11.0, "cpu_s": 19.0, "cores_used": 1.73}]}
    (run_dir / "run.json").write_text(json.dumps(info))
    metrics = {"kfold/model": {"pooled": {"auc": auc, "auc_ci": [0.869, 0.943], "ap": 0.95, "ap_ci": [0.9, 0.97]},
                               "folds": {"0": {"auc": 0.5, "auc_ci": [0.1, 0.9]}}},
               "segment/unet": {"summary": [{"fold": "0", "dice": 0.5, "dice_lo": 0.4, "dice_hi": 0.6},
                                            {"fold": "all", "dice": 0.771, "dice_lo": 0.736, "dice_hi": 0.803}]},
               "export/model": {"parity_max_abs_diff": 3.6e-07}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "kfold" / "model").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(run_dir / "kfold" / "model" / "roc.png")
    Image.new("RGB", (8, 8)).save(run_dir / "kfold" / "model" / "P0001_S0_liver.png")  # one case: not listed
    with (run_dir / "skipped_dataset.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "stage", "file", "reason"])
        w.writerows([["P1", "dataset", "", "label blank"], ["P2", "dataset", "", "label blank"]])
    nb = nbformat.v4.new_notebook(metadata={"papermill": {"parameters": {"profile": "smoke", "n_splits": 5}}})
    code = nbformat.v4.new_code_cell(SECRET_CODE, outputs=[
        nbformat.v4.new_output("display_data", data={
            "application/vnd.jupyter.widget-view+json": {"model_id": "x", "version_major": 2, "version_minor": 0},
            "text/plain": "EDA:   0%|          | 0/286 [00:00<?, ?it/s]"}),
        nbformat.v4.new_output("stream", name="stderr", text="fold:  40%|####      | 2/5 [00:01<00:02]\r"
                                                               "fold: 100%|##########| 5/5 [00:03<00:00]\n"),
        nbformat.v4.new_output("stream", name="stdout", text="all checks passed\n")])
    nb.cells = [nbformat.v4.new_markdown_cell("# 04 · k-fold\n\n![remote](https://example.com/x.png)"), code]
    nbformat.write(nb, run_dir / "notebooks" / "04_kfold.ipynb")
    return run_dir


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, str]:
    run_dir = fake_run(tmp_path / "runs")
    path = report.write_report(run_dir)
    return run_dir, path.read_text(encoding="utf-8")


def test_summary_leads_with_headline_metrics_and_their_intervals(built: tuple[Path, str]) -> None:
    run_dir, page = built
    assert page.index("Headline results") < page.index("Contents") < page.index("Notebook <code>04_kfold.ipynb")
    rows = report.headline(json.loads((run_dir / "metrics.json").read_text()))
    found = {(r["folder"], r["path"]): (r["value"], r["ci"]) for r in rows}
    assert found[("kfold/model", "pooled.auc")] == (0.907, (0.869, 0.943))
    assert found[("segment/unet", "summary.dice")] == (0.771, (0.736, 0.803))  # the pooled row, not fold 0
    assert found[("export/model", "parity_max_abs_diff")] == (3.6e-07, None)
    assert "0.907" in page and "95% CI [0.869, 0.943]" in page and "3.6e-07" in page
    every = report.metrics_with_ci(json.loads((run_dir / "metrics.json").read_text()))
    assert {m["path"] for m in every} == {"pooled.auc", "pooled.ap", "summary.dice"}  # per-fold detail left out


def test_summary_has_figures_skips_timings_and_parameters(built: tuple[Path, str]) -> None:
    run_dir, page = built
    assert "data:image/png;base64," in page and "04 k-fold: out-of-fold ROC curve" in page
    assert report.skipped_counts(run_dir) == {"skipped_dataset.csv": {"count": 2, "reasons": [("label blank", 2)]}}
    assert "label blank (2)" in page
    assert "19.0" in page and "1.73" in page  # the stage's CPU seconds and cores used
    assert "n_splits = 5" in page
    assert [p.name for p in report.stage_figures(run_dir, run_dir / "notebooks" / "04_kfold.ipynb")] == ["roc.png"]


def test_progress_bars_dropped_and_results_kept(built: tuple[Path, str]) -> None:
    _, page = built
    assert "0%|" not in page and "it/s" not in page and "100%|" not in page
    assert "all checks passed" in page and "compute_the_answer" in page


def test_report_fetches_nothing(built: tuple[Path, str]) -> None:
    _, page = built
    assert report.external_references(page) == []
    assert "cdnjs" not in page and "require.js" not in page and "example.com/x.png" not in page
    assert report.external_references("<script src='https://cdn.x/y.js'></script><img src=//x/y.png>")


def test_index_compares_runs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fake_run(runs, "20260101-000000-smoke", auc=0.907)
    report.write_report(fake_run(runs, "20260102-000000-smoke", auc=0.811))
    (runs / "not-a-run").mkdir()
    page = report.write_index(runs).read_text()
    assert page.count("<tr>") == 3  # header + two runs
    assert "0.907" in page and "0.811" in page and "abcdef1234" in page
    assert "href='20260102-000000-smoke/report.html'" in page  # only the run whose report exists is linked
    assert "href='20260101-000000-smoke/report.html'" not in page
    assert report.external_references(page) == []


def test_cli_refuses_a_folder_without_run_json(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="run.json: no such run"):
        report.main([str(tmp_path)])


def test_report_in_headless_chromium(built: tuple[Path, str]) -> None:
    """The page as a reader opens it: headline visible, code hidden until the switch, no request off the machine."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    run_dir, _ = built
    browser, driver_path = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        drv.get((run_dir / "report.html").resolve().as_uri())
        cards = drv.find_elements(By.CSS_SELECTOR, ".headline-metric")
        assert cards and cards[0].is_displayed() and "0.907" in cards[0].text
        code = next(e for e in drv.find_elements(By.CSS_SELECTOR, ".code_cell .input")
                    if "compute_the_answer" in e.get_attribute("textContent"))
        assert not code.is_displayed()
        assert drv.find_element(By.CSS_SELECTOR, "img[alt*='ROC']").get_attribute("naturalWidth") == "40"
        drv.find_element(By.CSS_SELECTOR, "label[for='show-code']").click()
        assert code.is_displayed() and "compute_the_answer" in code.text
        drv.find_element(By.CSS_SELECTOR, "label[for='show-code']").click()
        assert not code.is_displayed()
        resources = drv.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        requested = [json.loads(e["message"])["message"] for e in drv.get_log("performance")]
        urls = [m["params"]["request"]["url"] for m in requested if m["method"] == "Network.requestWillBeSent"]
        assert urls, "the DevTools log saw no request at all (not even the page itself)"
        off_machine = [u for u in [*resources, *urls] if not u.startswith(("data:", "file:", "about:"))]
        assert off_machine == []
    finally:
        drv.quit()
