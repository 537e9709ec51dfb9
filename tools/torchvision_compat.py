"""Compatibility hook: let ``import torchvision`` work when its compiled ops cannot load.

Why: this machine installs the CPU wheel ``torch==2.13.0+cpu`` from local disk, but the registry's
``torchvision==0.28.0`` is a CUDA build. Its ``_C.so`` fails to load against the CPU torch, and
torchvision's ``_meta_registrations`` then registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` unconditionally, which raises ``operator torchvision::nms does not exist``.
timm imports torchvision at load time, so timm breaks too.

What: ``make env`` copies this file into the venv's site-packages with a one-line ``.pth`` file. At
interpreter start it only installs a tiny import finder (no torch import). The first time
``torchvision`` is imported, the finder tries to load torchvision's own ``_C`` library; only if that
fails does it *define* the two missing op schemas so the fake registrations succeed. On a matching
CPU/CUDA build the library loads and nothing is defined. torchvision's compiled ops (nms, image
decode) stay unavailable on the mismatched build: this project reads images with PIL, SimpleITK and
pydicom instead.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY = None  # keeps the torch.library.Library alive for the interpreter's lifetime


def _ensure_schemas(package_dirs: list[str]) -> None:
    """Load torchvision's _C if it works; otherwise define the op schemas its Python code expects."""
    global _LIBRARY
    import torch

    for folder in package_dirs:
        for name in os.listdir(folder):
            if name.startswith("_C.") and name.endswith((".so", ".pyd")):
                try:
                    torch.ops.load_library(os.path.join(folder, name))
                    return  # matching build: nothing to patch
                except (OSError, RuntimeError, ImportError):
                    break
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            _LIBRARY.define(schema)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, dirs: list[str]) -> None:
        self._inner, self._dirs = inner, dirs

    def create_module(self, spec):  # noqa: ANN001
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        _ensure_schemas(self._dirs)
        self._inner.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)  # one shot
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None and spec.submodule_search_locations:
            spec.loader = _Loader(spec.loader, list(spec.submodule_search_locations))
        return spec


def install() -> None:
    """Called from the .pth file; cheap: no torch import here."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
