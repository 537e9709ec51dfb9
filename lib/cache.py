"""Fingerprints for cached stage outputs: parameters + inputs + the source of the code that made them.

Why: a cache keyed on parameters alone hands back stale results after the code that computes them changed
(a fixed bug keeps its old numbers). Every cache in the package (crops, report labels, k-fold runs,
segmentation) keys on :func:`fingerprint`, which hashes the source files of the modules involved too, so any
edit to them recomputes. Module sources are read from disk, not imported, so torch-free workers stay torch-free.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from lib.io import to_jsonable


@lru_cache(maxsize=64)
def _module_digest(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise ValueError(f"no source file for module {name!r}")
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()


def source_digest(modules: Iterable[str]) -> str:
    """One hash over the source files of ``modules`` (dotted names, e.g. ``lib.crop``), order-independent."""
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        h.update(f"{name}:{_module_digest(name)}\n".encode())
    return h.hexdigest()


def stamp(path: str | Path) -> list:
    """A cheap identity of a file or folder: path, size and modification time (a folder: its entries'), or
    ``None`` for a missing one. For large inputs (volumes) whose content is not worth hashing."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return [str(p), None]
    if p.is_dir():
        return [str(p), sorted((c.name, c.stat().st_size, c.stat().st_mtime_ns) for c in p.iterdir())]
    return [str(p), st.st_size, st.st_mtime_ns]


def fingerprint(params: Any = None, modules: Iterable[str] = (), files: Iterable[str | Path] = (),
                stamps: Iterable[str | Path] = ()) -> str:
    """sha256 of ``params`` (JSON, keys sorted), the source of ``modules``, the bytes of ``files`` and the
    :func:`stamp` of ``stamps``: equal fingerprint = same output."""
    h = hashlib.sha256()
    h.update(json.dumps(to_jsonable(params), sort_keys=True).encode())
    h.update(source_digest(modules).encode())
    for f in files:
        h.update(Path(f).read_bytes())
    h.update(json.dumps([stamp(p) for p in stamps]).encode())
    return h.hexdigest()
