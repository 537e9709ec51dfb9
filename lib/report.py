"""A run's ``report.html`` that leads with the answer, and ``outputs/runs/index.html`` comparing every run.

    python -m lib.report outputs/runs/<run-id>     # rebuild one run's report.html (and the runs index)
    python -m lib.report --index                   # rebuild outputs/runs/index.html only

``report.html`` is built from a finished run folder alone (``run.json``, ``metrics.json``,
``notebooks/*.ipynb``, ``skipped_*.csv`` and the figures the notebooks wrote), in this order:

1. a summary: headline metrics with their confidence intervals (:data:`HEADLINE`), key figures
   (:data:`KEY_FIGURES`), skipped-case counts, per-stage timings and every notebook's parameters;
2. a table of contents;
3. every executed notebook, code cells hidden until the "show code" switch is ticked (pure CSS).

The page works offline and never asks the network for anything: notebooks are rendered with nbconvert's
``basic`` template (cells only, none of the ``lab`` template's require.js/MathJax/mermaid CDN scripts), the page's
CSS is inline, figures are ``data:`` URIs, and any external image, script or stylesheet a notebook output carries
is removed (:func:`offline`). Progress bars (tqdm widgets and their text fragments such as ``EDA: 0%|``) are
dropped from the outputs: they record how long a loop took, not a result.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lib import config

#: The answer first: (label, short label for the runs index, metrics.json folder as a regex, path inside it). The
#: value's confidence interval is the sibling ``<key>_ci`` pair or ``<key>_lo``/``<key>_hi``; in a list of rows
#: the ``fold == "all"`` row is used.
HEADLINE: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("Out-of-fold AUC, trained on report labels, scored against truth", "OOF AUC (report labels)", r"kfold/model",
     ("pooled", "auc")),
    ("Out-of-fold AUC, trained on ground truth", "OOF AUC (true labels)", r"kfold/model/label_noise/truth",
     ("pooled", "auc")),
    ("Grad-CAM pointing-game gain over random maps", "Grad-CAM pointing gain", r"explain/model",
     ("vs_random", "gradcam", "pointing_gain")),
    ("Occlusion pointing-game gain over random maps", "occlusion pointing gain", r"explain/model",
     ("vs_random", "occlusion", "pointing_gain")),
    ("TRUS segmentation out-of-fold Dice", "TRUS Dice", r"segment/[^/]+", ("summary", "dice")),
    ("ONNX Runtime vs torch, max |difference|", "ONNX max |diff|", r"export/model", ("parity_max_abs_diff",)),
]

#: Figures shown on the summary page: (glob below the run folder, caption). Missing ones are left out.
KEY_FIGURES: list[tuple[str, str]] = [
    ("kfold/model/roc.png", "04 k-fold: out-of-fold ROC curve"),
    ("kfold/model/label_noise/label_noise.png", "04 k-fold: report labels vs ground-truth labels for training"),
    ("labels/evaluation.png", "01 labels: report labeller against ground truth"),
    ("explain/model/gallery_gradcam.png", "05 explanations: Grad-CAM maps on held-out studies"),
    ("segment/*/overlays.png", "06 segmentation: predicted vs reference prostate outlines"),
    ("export/model/parity.png", "07 export: ONNX Runtime vs torch outputs"),
]

#: Where each notebook writes its figures (below the run folder): shown after the notebook, because notebooks run
#: by the pipeline save their figures to files rather than keeping them inline.
STAGE_FOLDERS: dict[str, tuple[str, ...]] = {
    "00": ("eda",), "01": ("labels",), "02": ("crops",), "03": ("train",), "04": ("kfold",), "05": ("explain",),
    "06": ("segment",), "07": ("export",),
}

#: Figures of one case (``P0003_S1_liver.png``) or of a demonstration input folder: not shown per notebook.
CASE_FIGURE_RE = re.compile(r"(^|/)([A-Z]+\d+_S?\d+[^/]*|infer_demo/.*)$")

#: Metrics.json keys whose contents are per-fold detail, not results of the run as a whole.
PER_FOLD_KEYS = frozenset({"folds", "fold_mean", "fold_sd"})

#: Output text that is a progress bar: ``label:  37%|###   | 3/8 [...]``.
PROGRESS_RE = re.compile(r"^.*\d+%\|.*$\n?", re.MULTILINE)

_EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;background:#fff}
main,header,nav#toc{max-width:1100px;margin:0 auto;padding:0 24px}
header{padding-top:20px}h1{font-size:1.7em;margin:.2em 0}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em}
.status-ok{color:#1a7f37}.status-failed,.status-killed{color:#cf222e}.muted{color:#59636e}
.headline{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:12px;margin:12px 0}
.card{border:1px solid #d0d7de;border-radius:8px;padding:10px 14px;background:#f6f8fa}
.card .value{font-size:1.6em;font-weight:600}.card .ci{color:#59636e}.card .where{font-size:.8em;color:#59636e}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f6f8fa}
.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:14px}
figure{margin:0}figure img{max-width:100%;border:1px solid #d0d7de}figcaption{font-size:.9em;color:#59636e}
#show-code{position:absolute;opacity:0;width:1px;height:1px}
.switch{position:sticky;top:0;display:block;max-width:1100px;margin:0 auto;padding:6px 24px;z-index:2;
background:#fffe;border-bottom:1px solid #d0d7de;cursor:pointer;user-select:none;color:#0969da}
.switch::before{content:"▸ Show the code of every notebook"}
#show-code:checked+.switch::before{content:"▾ Hide the code"}
#show-code:focus-visible+.switch{outline:2px solid #0969da}
#show-code:not(:checked)~main .code_cell>.input{display:none}
#show-code:not(:checked)~main .prompt{display:none}
.notebook{border-top:3px solid #57606a;margin-top:28px}
.notebook img{max-width:100%}.notebook pre{white-space:pre-wrap;overflow-x:auto}
.input_area,.output_text pre,.output_stderr{background:#f6f8fa;padding:4px 8px;border-radius:4px}
.output_stderr{background:#fff5f5}.prompt{font-size:.8em;color:#59636e}.output_html{overflow-x:auto}
.anchor-link{display:none}.rendered_html table{font-size:.9em}
details.stage-figures{margin:10px 0}details.stage-figures summary{cursor:pointer;color:#0969da}
"""


# ------------------------------------------------------------------------------------------------ reading a run

def _json_object(path: Path) -> dict:
    """A JSON object from a run folder, or ``{}`` when it is missing or not an object (the page says so)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _interval(parent: dict, key: str) -> tuple[float, float] | None:
    ci = parent.get(f"{key}_ci")
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(_is_number(x) for x in ci):
        return float(ci[0]), float(ci[1])
    lo, hi = parent.get(f"{key}_lo"), parent.get(f"{key}_hi")
    if _is_number(lo) and _is_number(hi):
        return float(lo), float(hi)
    return None


def _step(obj: Any, key: str) -> Any:
    """One step down a metrics path; in a list of per-fold rows, the pooled ``fold == "all"`` row."""
    if isinstance(obj, list):
        rows = [r for r in obj if isinstance(r, dict) and str(r.get("fold", "all")) == "all"]
        obj = rows[0] if rows else None
    return obj.get(key) if isinstance(obj, dict) else None


def lookup(entry: dict, path: tuple[str, ...]) -> tuple[float, tuple[float, float] | None, str] | None:
    """The value at ``path`` in one metrics.json folder entry, its confidence interval (or None) and the label it
    scores (the ``label`` beside it, else the entry's ``label_names``; empty when neither is recorded)."""
    parent: Any = entry
    for key in path[:-1]:
        parent = _step(parent, key)
    if isinstance(parent, list):
        rows = [r for r in parent if isinstance(r, dict) and str(r.get("fold", "all")) == "all"]
        parent = rows[0] if rows else None
    value = parent.get(path[-1]) if isinstance(parent, dict) else None
    if not _is_number(value):
        return None
    label = parent.get("label") or ", ".join(map(str, entry.get("label_names") or []))
    return float(value), _interval(parent, path[-1]), str(label)


def headline(metrics: dict) -> list[dict]:
    """The :data:`HEADLINE` figures this run has: label, short label, folder, path, value, ci (or None)."""
    rows = []
    for label, short, folder_re, path in HEADLINE:
        for folder in sorted(metrics):
            if re.fullmatch(folder_re, folder) and isinstance(metrics[folder], dict):
                found = lookup(metrics[folder], path)
                if found:
                    rows.append({"label": label, "short": short, "folder": folder, "path": ".".join(path),
                                 "value": found[0], "ci": found[1], "scores": found[2]})
    return rows


def _walk_ci(obj: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str, float, tuple[float, float]]]:
    if isinstance(obj, list):
        rows = [r for r in obj if isinstance(r, dict) and str(r.get("fold", "")) == "all"]
        for row in rows[:1]:
            yield from _walk_ci(row, path)
        return
    if not isinstance(obj, dict):
        return
    for key, value in obj.items():
        if key in PER_FOLD_KEYS:
            continue
        if isinstance(value, dict | list):
            yield from _walk_ci(value, (*path, key))
        elif _is_number(value) and (ci := _interval(obj, key)):
            yield path, key, float(value), ci


def metrics_with_ci(metrics: dict) -> list[dict]:
    """Every pooled metric of the run that carries a confidence interval (per-fold detail left out)."""
    return [{"folder": folder, "path": ".".join((*path, key)), "value": value, "ci": ci}
            for folder in sorted(metrics) for path, key, value, ci in _walk_ci(metrics[folder], ())]


def skipped_counts(run_dir: Path) -> dict[str, dict]:
    """Per ``skipped_<stage>.csv``: how many cases were skipped and the most common reasons."""
    out = {}
    for path in sorted(run_dir.glob("skipped_*.csv")):
        try:
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            out[path.name] = {"count": None, "reasons": [], "error": f"{type(exc).__name__}: {exc}"}
            continue
        reasons = Counter(r.get("reason") or "" for r in rows).most_common(3)
        out[path.name] = {"count": len(rows), "reasons": reasons}
    return out


def notebook_parameters(nb: Any) -> dict:
    """The parameters papermill ran a notebook with (recorded in its metadata)."""
    return dict(((nb.get("metadata") or {}).get("papermill") or {}).get("parameters") or {})


def _strip_progress(text: str) -> str:
    return PROGRESS_RE.sub("", text.split("\r")[-1] if "\n" not in text else
                           "\n".join(line.split("\r")[-1] for line in text.split("\n")))


def clean_outputs(nb: Any) -> Any:
    """Drop progress bars from a notebook's outputs: tqdm widgets and ``NN%|`` lines in text outputs."""
    for cell in nb.cells:
        kept = []
        for out in cell.get("outputs", []):
            data = out.get("data") or {}
            if "application/vnd.jupyter.widget-view+json" in data:
                continue
            if out.get("output_type") == "stream":
                out["text"] = _strip_progress(out.get("text", ""))
                if not out["text"].strip():
                    continue
            elif "text/plain" in data and len(data) == 1:
                data["text/plain"] = _strip_progress(data["text/plain"])
                if not data["text/plain"].strip():
                    continue
            kept.append(out)
        if cell.get("cell_type") == "code":
            cell["outputs"] = kept
    return nb


def offline(page: str) -> str:
    """Remove anything that would make a browser fetch from the network (external img/script/link/iframe)."""
    page = re.sub(r"<script\b[^>]*\bsrc\s*=\s*[\"']?\s*(?:https?:)?//[^>]*>\s*</script>", "", page, flags=re.I)
    page = re.sub(r"<(?:link|iframe|source|embed)\b[^>]*\b(?:href|src)\s*=\s*[\"']?\s*(?:https?:)?//[^>]*>", "",
                  page, flags=re.I)
    page = re.sub(r"<img\b[^>]*\bsrc\s*=\s*[\"']?\s*(?:https?:)?//[^>]*>", "[external image removed]", page,
                  flags=re.I)
    return re.sub(r"url\(\s*[\"']?\s*(?:https?:)?//[^)]*\)", "none", page, flags=re.I)


def external_references(page: str) -> list[str]:
    """Tags or CSS in ``page`` that would fetch from the network (links a reader clicks are not fetched)."""
    found = re.findall(r"<(?:script|link|img|iframe|source|embed)\b[^>]*>", page, flags=re.I)
    found = [tag for tag in found if _EXTERNAL.search(tag)]
    return found + re.findall(r"url\(\s*[\"']?\s*(?:https?:)?//[^)]*\)", page, flags=re.I)


# ---------------------------------------------------------------------------------------------------- rendering

def _fmt(value: Any, spec: str = ".3g") -> str:
    if not _is_number(value):
        return "" if value is None else html.escape(str(value))
    return format(value, "d") if isinstance(value, int) else format(value, spec)


def _shown(value: float) -> str:
    return format(value, ".1e") if value and abs(value) < 1e-3 else format(value, ".3f")


def _ci(ci: tuple[float, float] | None) -> str:
    return f"95% CI [{_shown(ci[0])}, {_shown(ci[1])}]" if ci else "no interval"


def _data_uri(path: Path) -> str:
    kind = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
    mime = kind.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def key_figures(run_dir: Path) -> list[tuple[Path, str]]:
    """The :data:`KEY_FIGURES` this run wrote, in that order."""
    return [(path, caption) for pattern, caption in KEY_FIGURES for path in sorted(run_dir.glob(pattern))[:1]]


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='num'>{c}</td>" if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _timings(info: dict) -> str:
    rows = [[html.escape(s.get("notebook", "")),
             html.escape(str(s.get("status", "")) + (f": {s['reason']}" if s.get("reason") else "")),
             _fmt(s.get("attempt", 1)),
             _fmt(s.get("wall_s", s.get("seconds")), ".1f"), _fmt(s.get("cpu_s"), ".1f"),
             _fmt(s.get("cores_granted")), _fmt(s.get("cores_used"), ".2f")] for s in info.get("stages", [])]
    rows.append(["<b>run</b>", html.escape(str(info.get("status", ""))), "", _fmt(info.get("wall_s"), ".1f"),
                 _fmt(info.get("cpu_s"), ".1f"), _fmt(info.get("cores")), _fmt(info.get("cores_used"), ".2f")])
    return _table(["notebook", "status", "try", "wall s", "CPU s", "cores granted", "cores used"], rows,
                  {2, 3, 4, 5, 6})


def _assignments(params: dict) -> str:
    return "<br>".join(f"<code>{html.escape(k)} = {html.escape(json.dumps(v, default=str))}</code>"
                       for k, v in sorted(params.items()))


def _parameters(params: dict[str, dict]) -> str:
    """Parameters every notebook shares once, then each notebook's own (profile values; the rest are defaults)."""
    shared = {k: v for k, v in next(iter(params.values()), {}).items()
              if all(k in p and p[k] == v for p in params.values())}
    rows = [[html.escape(name), _assignments({k: v for k, v in p.items() if k not in shared}) or "only the shared"]
            for name, p in params.items()]
    return (f"<p>Every notebook: {_assignments(shared) or 'none shared'}</p>" +
            _table(["notebook", "its own parameters (profile values; every other parameter has its default)"],
                   rows))


def _skipped(counts: dict[str, dict]) -> str:
    if not counts:
        return "<p class='muted'>No skipped-case lists in this run.</p>"
    rows = [[html.escape(name), _fmt(c["count"]) if c["count"] is not None else html.escape(c.get("error", "")),
             "; ".join(f"{html.escape(r) or 'no reason given'} ({n})" for r, n in c["reasons"])]
            for name, c in counts.items()]
    return _table(["list", "cases skipped", "most common reasons"], rows, {1})


def summary_html(run_dir: Path, info: dict, metrics: dict, params: dict[str, dict]) -> str:
    """The summary section: headline cards, key figures, skipped cases, timings, parameters, all CI metrics."""
    status = html.escape(str(info.get("status", "unknown")))
    facts = (f"profile <b>{html.escape(str(info.get('profile')))}</b> · seed {_fmt(info.get('seed'))} · "
             f"commit <code>{html.escape(str(info.get('commit', ''))[:10])}</code> · "
             f"started {html.escape(str(info.get('started', '')).replace('T', ' '))} · "
             f"wall {_fmt(info.get('wall_s'), '.0f')} s on {_fmt(info.get('cores'))} core(s) · "
             f"status <b class='status-{status}'>{status}</b>")
    cards = "".join(
        f"<div class='card headline-metric'><div>{html.escape(h['label'])}</div>"
        f"<div class='value'>{_shown(h['value'])}</div><div class='ci'>{_ci(h['ci'])}</div>"
        f"<div class='where'>{html.escape(h['folder'])}: {html.escape(h['path'])}"
        f"{' · ' + html.escape(h['scores']) if h['scores'] else ''}</div></div>"
        for h in headline(metrics))
    if not cards:
        cards = "<p class='muted'>No headline metric in this run's metrics.json (did its stages finish?).</p>"
    figures = "".join(f"<figure><img alt='{html.escape(caption)}' src='{_data_uri(path)}'>"
                      f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                      for path, caption in key_figures(run_dir))
    all_ci = _table(["metrics folder", "metric", "value", "95% CI"],
                    [[html.escape(m["folder"]), html.escape(m["path"]), _shown(m["value"]),
                      f"[{_shown(m['ci'][0])}, {_shown(m['ci'][1])}]"] for m in metrics_with_ci(metrics)], {2})
    return (f"<section id='summary'><p class='muted'>{facts}</p>"
            f"<h2>Headline results</h2><div class='headline'>{cards}</div>"
            f"<h2 id='figures'>Key figures</h2><div class='figures'>{figures or 'none in this run'}</div>"
            f"<h2 id='skipped'>Skipped cases</h2>{_skipped(skipped_counts(run_dir))}"
            f"<h2 id='timings'>Stages and timings</h2>{_timings(info)}"
            f"<h2 id='parameters'>Parameters</h2>{_parameters(params)}"
            f"<h2 id='all-metrics'>Every metric with a confidence interval</h2>{all_ci}</section>")


def _notebook_html(nb: Any) -> str:
    with warnings.catch_warnings():  # jupyter path/deprecation notices are not for the console
        warnings.simplefilter("ignore")
        from nbconvert import HTMLExporter
        body, _ = HTMLExporter(template_name="basic").from_notebook_node(clean_outputs(nb))
    return body


def stage_figures(run_dir: Path, notebook: Path) -> list[Path]:
    """The figures a notebook's stage wrote (:data:`STAGE_FOLDERS`), per-case images left out."""
    found = []
    for folder in STAGE_FOLDERS.get(notebook.name[:2], ()):
        for path in sorted((run_dir / folder).rglob("*.png")):
            if not CASE_FIGURE_RE.search(path.relative_to(run_dir).as_posix()):
                found.append(path)
    return found


def _figures_html(run_dir: Path, notebook: Path) -> str:
    paths = stage_figures(run_dir, notebook)
    if not paths:
        return ""
    figures = "".join(f"<figure><img alt='{html.escape(p.name)}' src='{_data_uri(p)}'><figcaption>"
                      f"{html.escape(p.relative_to(run_dir).as_posix())}</figcaption></figure>" for p in paths)
    return (f"<details class='stage-figures' open><summary>Figures this notebook wrote ({len(paths)})</summary>"
            f"<div class='figures'>{figures}</div></details>")


def _pygments_css() -> str:
    from pygments.formatters import HtmlFormatter
    return HtmlFormatter(style="default").get_style_defs(".highlight")


def render(run_dir: Path, notebooks: list[Path] | None = None) -> str:
    """The whole report page of a run folder (summary, contents, notebooks), as one offline HTML string."""
    import nbformat

    info = _json_object(run_dir / "run.json")
    metrics = _json_object(run_dir / "metrics.json")
    paths = sorted((run_dir / "notebooks").glob("*.ipynb")) if notebooks is None else notebooks
    paths = [p for p in paths if ".failed" not in p.name]
    nbs = [(p, nbformat.read(p, as_version=4)) for p in paths]
    params = {p.name: notebook_parameters(nb) for p, nb in nbs}
    toc = "".join(f"<li><a href='#nb-{html.escape(p.stem)}'>{html.escape(p.stem)}</a></li>" for p, _ in nbs)
    sections = "".join(f"<section class='notebook' id='nb-{html.escape(p.stem)}'><h2>Notebook "
                       f"<code>{html.escape(p.name)}</code></h2>{_notebook_html(nb)}{_figures_html(run_dir, p)}"
                       f"</section>" for p, nb in nbs)
    title = f"Run {html.escape(run_dir.name)}"
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<style>{CSS}{_pygments_css()}</style></head><body>"
            f"<header><h1>{title}</h1></header>"
            f"<input type='checkbox' id='show-code'><label for='show-code' class='switch' title='code cells are "
            f"hidden; tick to show them'></label>"
            f"<main>{summary_html(run_dir, info, metrics, params)}"
            f"<nav id='toc'><h2>Contents</h2><ol><li><a href='#summary'>Summary</a></li>"
            f"<li><a href='#figures'>Key figures</a></li><li><a href='#skipped'>Skipped cases</a></li>"
            f"<li><a href='#timings'>Stages and timings</a></li><li><a href='#parameters'>Parameters</a></li>"
            f"<li><a href='#all-metrics'>Every metric</a></li>{toc}</ol></nav>{sections}</main></body></html>")
    return offline(page)


def write_report(run_dir: Path, notebooks: list[Path] | None = None) -> Path:
    """Write ``<run_dir>/report.html`` (see the module docstring); ``notebooks`` default: every executed one."""
    out = run_dir / "report.html"
    out.write_text(render(run_dir, notebooks), encoding="utf-8")
    return out


# -------------------------------------------------------------------------------------------------- runs index

def run_row(run_dir: Path) -> dict:
    """One run as the index compares it: facts from run.json and its headline metrics."""
    info = _json_object(run_dir / "run.json")
    metrics = _json_object(run_dir / "metrics.json")
    return {"id": run_dir.name, "profile": info.get("profile"), "seed": info.get("seed"),
            "commit": str(info.get("commit") or "")[:10], "started": info.get("started"),
            "status": info.get("status"), "wall_s": info.get("wall_s"),
            "report": (run_dir / "report.html").exists(),
            "headline": {h["short"]: (h["value"], h["ci"]) for h in headline(metrics)}}


def render_index(runs_dir: Path) -> str:
    """``index.html``: one row per run folder with a ``run.json``, newest first, headline metrics as columns."""
    rows = sorted((run_row(p.parent) for p in runs_dir.glob("*/run.json")),
                  key=lambda r: str(r["started"] or ""), reverse=True)
    labels = list(dict.fromkeys(short for _, short, _, _ in HEADLINE if any(short in r["headline"] for r in rows)))
    header = ["run", "profile", "seed", "commit", "started", "status", "wall s", *labels]
    body = []
    for r in rows:
        name = html.escape(r["id"])
        link = f"<a href='{name}/report.html'>{name}</a>" if r["report"] else name
        cells = [link, _fmt(r["profile"]), _fmt(r["seed"]), f"<code>{html.escape(r['commit'])}</code>",
                 _fmt(str(r["started"] or "").replace("T", " ")),
                 f"<span class='status-{_fmt(r['status'])}'>{_fmt(r['status'])}</span>",
                 _fmt(r["wall_s"], ".0f")]
        for label in labels:
            value, ci = r["headline"].get(label, (None, None))
            cells.append("" if value is None else _shown(value) + (
                f" <span class='muted'>[{_shown(ci[0])}, {_shown(ci[1])}]</span>" if ci else ""))
        body.append(cells)
    table = _table(header, body, set(range(6, len(header))))
    return offline(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Runs</title>"
                   f"<style>{CSS}main,header{{max-width:none}}td{{white-space:nowrap}}</style></head><body>"
                   f"<header><h1>Runs</h1>"
                   f"<p class='muted'>{len(rows)} run(s) in this folder, newest first; headline metrics with "
                   f"95% confidence intervals.</p></header><main>{table}</main></body></html>")


def write_index(runs_dir: Path = config.RUNS) -> Path:
    """Write ``<runs_dir>/index.html`` (regenerated after every pipeline run)."""
    out = runs_dir / "index.html"
    out.write_text(render_index(runs_dir), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="*", type=Path, help="run folders whose report.html to rebuild")
    ap.add_argument("--index", action="store_true", help="rebuild outputs/runs/index.html only")
    args = ap.parse_args(argv)
    if not args.run_dirs and not args.index:
        ap.error("give run folders, or --index")
    for run_dir in args.run_dirs:
        if not (run_dir / "run.json").exists():
            raise SystemExit(f"{run_dir / 'run.json'}: no such run (expected a folder under outputs/runs/)")
        print(write_report(run_dir))
    print(write_index(args.run_dirs[0].parent if args.run_dirs else config.RUNS))


if __name__ == "__main__":
    main()
