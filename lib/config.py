"""One place for paths, seeds and run-time choices (cookiecutter-data-science's ``config.py``).

Every module and notebook asks this file where things live, so a user who points the notebooks
at their own data changes one parameter, not twenty paths.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
OUTPUTS = ROOT / "outputs"
RUNS = OUTPUTS / "runs"
NOTEBOOKS = ROOT / "notebooks"
PROFILES = NOTEBOOKS / "profiles"
# Real public sets live beside the repository, never inside it.
SHARED_DATA = Path(os.environ.get("MEDNB_SHARED_DATA", ROOT.parent / "shared" / "data"))

DEFAULT_SEED = 20261123

# Offline by default (runs and CI need no model hub); unset HF_HUB_OFFLINE and pass pretrained=True to download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared_path(*parts: str) -> Path:
    """Path inside ../shared/data (may not exist: callers check and skip with a message)."""
    return SHARED_DATA.joinpath(*parts)


def data_path(path: str | Path) -> Path:
    """A user path as given, or relative to the repository when it does not exist from the current folder.

    Why: papermill and nbval run notebooks inside ``notebooks/``, users write paths from the repository root.
    """
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (ROOT / p).exists():
        return (ROOT / p).resolve()
    return p


def resolve_run_dir(run_dir: str | Path | None, profile: str = "smoke") -> Path:
    """A notebook's ``run_dir`` parameter: the given folder, or ``outputs/scratch/<profile>``.

    Pipeline runs (papermill) always pass a fresh ``outputs/runs/<run-id>``; the scratch folder is
    what notebooks opened by hand or by nbval share, so 03 finds what 01 and 02 wrote. Scratch is
    meant to be overwritten; runs are never overwritten.
    """
    path = Path(run_dir) if run_dir else OUTPUTS / "scratch" / profile
    path.mkdir(parents=True, exist_ok=True)
    return path


def seed_everything(seed: int = DEFAULT_SEED) -> None:
    """Seed Python, NumPy and torch (if imported) so the same seed gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:  # torch-free stages (reports, synth) still seed the rest
        return
    torch.manual_seed(seed)
    if "torch._inductor" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:  # the public call imports Inductor (~2 s of CPU per process) only to set Inductor's own flag
        torch._C._set_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.benchmark = False


def device(prefer: str = "auto") -> torch.device:  # noqa: F821
    """CUDA when present (and not overridden), else CPU: the same notebooks run on both."""
    import torch

    if prefer == "auto":
        prefer = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(prefer)
