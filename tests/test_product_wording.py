"""Product files speak of the product only: no development history in README, docs, notebooks, profiles, the
Makefile or ``lib`` (comments and docstrings). A hit names the file, the line and the phrase.

Dates are allowed only where they are data: the measured-results sources ``docs/results/*.json`` and the
``docs/results.md`` generated from them.
"""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Files excluded while they are being rewritten. Drop an entry once its file passes.
EXCLUDED_WHILE_REWRITTEN: frozenset[str] = frozenset()

#: Wording that tells how the software was developed rather than what it does.
HISTORY = [re.compile(p, re.IGNORECASE) for p in (
    r"\bsince (we|the|it|last|commit|session)\b",
    r"\buntil (we|the next)\b",
    r"\bwe tried\b",
    r"\bpreviously\b",
    r"(?<!\bis )(?<!\bare )(?<!\bbe )\bused to\b",  # "X used to do Y", not "X is used to compute Y"
    r"\bissue #?\d+",
    r"\b20\d\d-[01]\d-[0-3]\d\b",
    r"\bthis machine's disk\b",
    r"\b(on|lies on) this machine\b",
    r"/work/",
    r"\bmeasured before this run\b",
    r"\bre-?measured\b",
    r"\b(the )?shared \d+-core machine\b",
    r"\bload average\b",
    r"\bother jobs ran\b",
    r"\bthis session\b",
    r"\brun [a-z]*\d+[-\w]*-(demo|smoke|full)\b",
)]

#: Where dates and run ids are data, not prose.
DATA_FILES = ("docs/results/*.json", "docs/results.md")


def _python_prose(text: str) -> list[tuple[int, str]]:
    """Comments and docstrings of a Python file, with their first line numbers (code itself is not prose)."""
    lines = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(text).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines += [(first.lineno + i, line) for i, line in enumerate(first.value.value.splitlines())]
    return lines


def _notebook_prose(text: str) -> list[tuple[int, str]]:
    """Every markdown and code line of a notebook, numbered ``cell * 1000 + line``."""
    cells = json.loads(text)["cells"]
    return [(c * 1000 + i + 1, line) for c, cell in enumerate(cells)
            for i, line in enumerate("".join(cell.get("source", "")).splitlines())]


def product_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").rglob("*")),
             *sorted((ROOT / "notebooks").glob("*.ipynb")), *sorted((ROOT / "notebooks" / "profiles").glob("*.yaml")),
             *sorted((ROOT / "lib").rglob("*.py"))]
    return [p for p in files if p.is_file() and "__pycache__" not in p.parts]


def history_hits(path: Path, rel: str) -> list[str]:
    """``file:line: phrase`` for every history phrase in a product file's prose."""
    text = path.read_text(encoding="utf-8")
    prose = (_python_prose(text) if path.suffix == ".py" else _notebook_prose(text) if path.suffix == ".ipynb"
             else list(enumerate(text.splitlines(), 1)))
    data = any(Path(rel).match(pattern) for pattern in DATA_FILES)
    hits = []
    for lineno, line in prose:
        for pattern in HISTORY:
            if data and pattern.pattern.startswith((r"\b20", r"\brun ")):
                continue
            if m := pattern.search(line):
                hits.append(f"{rel}:{lineno}: {m.group(0)!r} in {line.strip()[:100]!r}")
    return hits


@pytest.mark.parametrize("path", product_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_development_history(path: Path) -> None:
    rel = path.relative_to(ROOT).as_posix()
    if rel in EXCLUDED_WHILE_REWRITTEN:
        pytest.skip(f"{rel} is excluded while it is rewritten (EXCLUDED_WHILE_REWRITTEN)")
    hits = history_hits(path, rel)
    assert not hits, "development history in a product file:\n" + "\n".join(hits)


@pytest.mark.parametrize("text, expected", [
    ("Since the last commit the floor is 0.9.", True),
    ("measured before this run on 2026-11-23", True),
    ("issue 5's floor", True),
    ("torch lies on this machine's disk", True),
    ("data under /work/shared", True),
    ("Previously the crop was 64 px.", True),
    ("the coarse map (mean 0.65, run s12-demo)", True),
    ("Measured on the shared 2-core machine", True),
    ("The median is used to fill the patch.", False),
    ("The code used to crop at 64 px.", True),
    ("One thread per process keeps 2-core machines fast.", False),
])
def test_patterns_catch_history_and_spare_product_prose(text: str, expected: bool) -> None:
    assert any(p.search(text) for p in HISTORY) is expected


def test_dates_allowed_in_results_sources_only(tmp_path: Path) -> None:
    note = tmp_path / "x.md"
    note.write_text("figures of 2026-12-03\n")
    assert history_hits(note, "docs/guide.md") and not history_hits(note, "docs/results.md")
    assert not history_hits(note, "docs/results/make-run-demo.json")
