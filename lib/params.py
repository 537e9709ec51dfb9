"""Declared types of every notebook's parameters, and the check that runs at the top of each notebook.

A notebook's ``parameters`` cell holds the names and smoke defaults; papermill (``-p``, ``-y``) and the profile
files ``notebooks/profiles/<stem>.yaml`` override them. A value of the wrong type would otherwise surface far
from its cause (a string margin as an ``OSError``, ``structures="liver"`` iterated letter by letter), so the
setup cell of every notebook calls :func:`check` and the pipeline calls :func:`check_profile` before a run
starts: one ``TypeError`` that names each bad parameter, the type it needs and the value it got.

Type shapes understood: classes (``int`` and ``float`` refuse ``bool``; ``float`` takes an ``int``),
``X | Y`` unions (``X | None`` takes ``None``), ``list[X]`` (a list or tuple of ``X``, never a string),
``dict[K, V]`` and ``Any``.
"""

from __future__ import annotations

import ast
import json
import numbers
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: A file or folder given as a string (papermill, YAML) or a ``Path`` (Python callers).
PathLike = str | Path

#: Parameters of every notebook (the pipeline sets them for each stage).
_COMMON: dict[str, Any] = {"profile": str, "seed": int, "run_dir": PathLike | None}

#: Declared type of each parameter, per notebook stem; names and defaults live in the notebook's parameters cell.
TYPES: dict[str, dict[str, Any]] = {
    "00_eda": {
        **_COMMON, "dataset": PathLike, "structures": list[str], "min_cases": int, "scheduler": str | None,
    },
    "01_labels_from_reports": {
        **_COMMON, "cohort": PathLike | None, "reports_csv": PathLike | None, "report_columns": dict[str, str],
        "lang": str, "vocabulary": PathLike, "compare_langs": list[str],
        "uncertain_as": int, "f1_floor": float, "precision_floor": float, "max_missed": float, "n_examples": int,
        "scheduler": str | None,
    },
    "02_crop_organs": {
        **_COMMON, "dataset": PathLike, "image_glob": str, "structures": list[str], "modes": list[str],
        "margin_mm": float, "window": str | list[float], "size": list[int], "fit": str, "k": int,
        "spacing": list[float] | None, "workers": int | None, "verify_cases": int, "n_gallery": int,
        "dicom_dir": PathLike | None, "scheduler": str | None,
    },
    "03_train": {
        **_COMMON, "dataset": PathLike, "data_root": PathLike | None, "label_source": str, "lang": str,
        "organ": str | None, "label_cols": str | list[str], "task": str, "uncertain": str, "input_kind": str,
        "n_slices": int, "image_size": int, "model_name": str, "pretrained": bool, "epochs": int, "batch_size": int,
        "lr": float, "optimizer": str, "scheduler": str, "patience": int, "augment": str, "num_workers": int,
        "threads": int, "val_fraction": float, "name": str, "min_val_score": float | None, "bn_momentum": float,
        "ema_decay": float, "loss": str, "save_every": int, "extend": bool,
    },
    "04_kfold": {
        **_COMMON, "name": str, "dataset": PathLike, "label_source": str, "lang": str, "organ": str | None,
        "label_cols": str | list[str], "input_kind": str, "n_slices": int, "image_size": int, "mask_mode": str,
        "channels": int, "model_name": str, "pretrained": bool, "n_splits": int, "test_fraction": float,
        "epochs": int, "batch_size": int, "lr": float, "optimizer": str, "scheduler": str, "patience": int,
        "augment": str, "bn_momentum": float, "ema_decay": float, "model_kwargs": dict[str, Any], "select": str,
        "val_every": int, "uncertain": str, "threshold": float, "n_boot": int, "label_noise": bool,
        "label_noise_params": dict[str, Any], "min_oof_auc": float, "min_macro_f1": float,
    },
    "05_explain": {
        **_COMMON, "dataset": str, "kfold_name": str | None, "checkpoints": list[PathLike] | None,
        "folds": list[int] | None, "label": str | None, "methods": list[str], "subset": str, "n_cases": int,
        "target_layer": str | None, "min_map_size": int, "mask_size": int, "stride": int,
        "occlusion_mode": str | float, "tolerance_px": float, "deletion_steps": int,
        "deletion_baseline": str | float, "per_fold": bool, "per_fold_deletion": bool, "threshold": float,
        "randomisation_cases": int,
        "randomisation_methods": list[str], "randomisation_steps": int, "per_group": int, "check_gains": bool,
        "gains_methods": list[str], "check_pointing": bool, "min_localised": int, "min_pointing_gain": float,
        "min_deletion_gain": float, "max_random_spearman": float, "sanity_methods": list[str] | None,
    },
    "06_segment": {
        **_COMMON, "dataset": str, "target": str | None, "structure": str, "max_slices": int, "model": str,
        "size": int, "crop_fov": bool, "denoise": str, "loss": str, "epochs": int,
        "batch_size": int, "lr": float, "augment": str, "patch_size": int, "pos_fraction": float,
        "patches_per_epoch": int, "n_splits": int, "ablation": list[str], "ablation_folds": list[int],
        "threads": int, "export": bool, "min_dice": float, "min_dice_pos": float,
        "min_dice_pos_other": float | None,
    },
    "07_export_serve": {
        **_COMMON, "kfold_name": str | None, "checkpoints": list[PathLike] | None, "n_parity": int,
        "parity_tol": float, "latency_runs": int, "min_speedup": float | None,
    },
}


def _declared(stage: str) -> dict[str, Any]:
    """The declared types of ``stage``; an unknown stem is a programming error, not a bad value."""
    try:
        return TYPES[stage]
    except KeyError:
        raise KeyError(f"no declared parameters for notebook {stage!r}; known: {sorted(TYPES)}") from None


def type_name(tp: Any) -> str:
    """How a declared type reads in messages: ``float``, ``list[str]``, ``str | Path | None``."""
    if tp is Any:
        return "Any"
    if tp is type(None):
        return "None"
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", repr(tp))


def matches(value: Any, tp: Any) -> bool:
    """True when ``value`` has the declared type ``tp`` (see the module docstring for the shapes)."""
    if tp is Any:
        return True
    if tp is type(None) or tp is None:
        return value is None
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return any(matches(value, a) for a in typing.get_args(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:  # a tuple is fine (YAML and papermill give lists, Python callers often tuples)
        item = args[0] if args else Any
        return isinstance(value, list | tuple) and all(matches(v, item) for v in value)
    if origin is dict:
        key, val = args or (Any, Any)
        return isinstance(value, Mapping) and all(matches(k, key) and matches(v, val) for k, v in value.items())
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:  # bool is an int subclass, but True as an epoch count is a mistake
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:  # ints are fine where a float is expected
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is dict:
        return isinstance(value, Mapping)
    return isinstance(value, tp)


def _problem(name: str, value: Any, tp: Any) -> str:
    return f"{name}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})"


def problems(stage: str, values: Mapping[str, Any]) -> list[str]:
    """One line per declared parameter of ``stage`` in ``values`` whose value has the wrong type."""
    return [_problem(name, values[name], tp) for name, tp in _declared(stage).items()
            if name in values and not matches(values[name], tp)]


def check(stage: str, values: Mapping[str, Any]) -> None:
    """Raise one ``TypeError`` naming every declared parameter of ``stage`` whose value in ``values`` (a
    notebook's ``globals()``) has the wrong type, so a bad ``-p`` fails at the top of the notebook."""
    bad = problems(stage, values)
    if bad:
        raise TypeError(f"notebook {stage} parameters of the wrong type:\n  " + "\n  ".join(bad))


def check_profile(stage: str, values: Mapping[str, Any], source: str | Path) -> None:
    """Raise one ``TypeError`` for the parameters of one profile (``source`` names its file) that ``stage``
    does not declare or that have the wrong type, before any notebook runs with them."""
    declared = _declared(stage)
    bad = [f"{name}: not a parameter of notebook {stage} (known: {', '.join(sorted(declared))})"
           for name in values if name not in declared]
    bad += problems(stage, values)
    if bad:
        raise TypeError(f"{source}: bad parameters for notebook {stage}:\n  " + "\n  ".join(bad))


def stage_defaults(stage: str) -> dict[str, Any]:
    """The defaults of notebook ``stage`` (its ``parameters`` cell, the one place they are written), checked
    against the declared types: code that runs a stage without its notebook starts from these."""
    from lib import config

    values = notebook_defaults(config.NOTEBOOKS / f"{stage}.ipynb")
    bad = problems(stage, values)
    if bad:
        raise TypeError(f"notebook {stage} parameters cell of the wrong type:\n  " + "\n  ".join(bad))
    return values


def notebook_defaults(path: str | Path) -> dict[str, Any]:
    """Names and default values of a notebook's ``parameters`` cell (its ``name = <literal>`` lines)."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path}: needs exactly one cell tagged 'parameters', found {len(cells)}")
    src = cells[0]["source"]
    tree = ast.parse("".join(src) if isinstance(src, list) else src)
    out: dict[str, Any] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"{path}: the parameters cell may only hold 'name = <literal>' lines, "
                             f"found {ast.unparse(node)!r}")
        out[node.targets[0].id] = ast.literal_eval(node.value)
    return out
