"""Study parameters for a whole pipeline run: ``-p key=value`` pairs and a study YAML, checked before any stage.

A run's parameters come from the profile files (``notebooks/profiles/<stem>.yaml``); a study overrides them
for every stage whose notebook declares the key (:data:`lib.params.TYPES`), so ``-p dataset=brain-mri`` reaches
EDA, training, k-fold and explanations at once. A study YAML holds the same keys at its top level, and may hold
per-stage tables under a notebook number or stem (``04: {epochs: 3}``, ``03_train: {lr: 0.01}``) that win over
the top level; ``-p`` pairs win over the whole file. Values are YAML scalars (``3`` is an int, ``1e-3`` a float,
``[a, b]`` a list, ``null`` None), as papermill would receive them from a profile file.

Everything is validated up front: a key no chosen notebook declares, a per-stage key its notebook does not
declare, a value of the wrong type, or a parameter the pipeline itself sets (``profile``, ``seed``,
``run_dir``) is one ``ValueError`` naming each problem.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from lib import params

#: Parameters the pipeline sets itself (``--profile``, ``--seed``, the run folder).
RESERVED = ("profile", "seed", "run_dir")
_STAGE_KEY = re.compile(r"\d\d(_\w+)?")
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class StudyError(ValueError):
    """Bad study parameters: the message lists every problem, one per line."""


def parse_value(text: str) -> Any:
    """A ``-p`` value as a YAML scalar or flow collection (``3`` -> 3, ``1e-3`` -> 0.001, ``[a, b]`` -> list)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # not YAML (e.g. an unbalanced bracket in a path): the string itself
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    return text if value is None and text.strip() not in ("null", "~", "None", "") else value


def parse_assignments(pairs: Iterable[str]) -> dict[str, Any]:
    """``["epochs=3", "dataset=brain-mri"]`` -> ``{"epochs": 3, "dataset": "brain-mri"}``; a pair without
    ``=`` or with an empty key is an error naming it."""
    out: dict[str, Any] = {}
    bad = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            bad.append(f"{pair!r}: expected key=value with a parameter name as key")
            continue
        out[key] = None if text.strip() == "None" else parse_value(text)
    if bad:
        raise StudyError("bad -p parameter(s):\n  " + "\n  ".join(bad))
    return out


def load_study(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(top-level parameters, per-stage tables keyed as written) of a study YAML file."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: study file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, Mapping):
        raise StudyError(f"{path}: expected a mapping of parameter names to values, got {type(raw).__name__}")
    common, per_stage = {}, {}
    for key, value in raw.items():
        key = str(key).zfill(2) if isinstance(key, int) else str(key)
        if _STAGE_KEY.fullmatch(key):
            if not isinstance(value, Mapping):
                raise StudyError(f"{path}: stage table {key!r} must be a mapping, got {value!r}")
            per_stage[key] = dict(value)
        else:
            common[key] = value
    return common, per_stage


def _stem_for(key: str, stems: Sequence[str]) -> str | None:
    return next((s for s in stems if s == key or s[:2] == key), None)


def _spread(values: Mapping[str, Any], chosen: Sequence[str], out: dict[str, dict]) -> list[str]:
    """Put each value into every chosen stage that declares its key; return the problems."""
    bad = []
    for key, value in values.items():
        if key in RESERVED:
            bad.append(f"{key}: set by the pipeline (use --{key.replace('_', '-')})" if key != "run_dir"
                       else "run_dir: set by the pipeline (use --run-id)")
            continue
        takers = [s for s in chosen if key in params.TYPES[s]]
        if not takers:
            elsewhere = sorted(s for s in params.TYPES if key in params.TYPES[s])
            hint = (f"declared by {', '.join(elsewhere)}, none of which runs here" if elsewhere
                    else "no notebook declares it")
            bad.append(f"{key}: unknown parameter ({hint})")
            continue
        for s in takers:
            out[s][key] = value
    return bad


def resolve(stems: Sequence[str], common: Mapping[str, Any] | None = None,
            per_stage: Mapping[str, Mapping[str, Any]] | None = None, source: str = "study",
            last: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """Per-stage overrides for the chosen notebook ``stems``: each common key goes to every stage that declares
    it, per-stage tables to their stage, then ``last`` (the ``-p`` pairs) like common keys, winning over both.
    Raises one :class:`StudyError` listing every problem."""
    common, per_stage = dict(common or {}), dict(per_stage or {})
    chosen = [s for s in stems if s in params.TYPES]
    out: dict[str, dict] = {s: {} for s in chosen}
    bad: list[str] = []
    bad += _spread(common, chosen, out)
    for key, table in per_stage.items():
        stem = _stem_for(key, chosen)
        if stem is None:
            bad.append(f"{key}: no such stage among those chosen ({', '.join(chosen)})")
            continue
        for name, value in table.items():
            if name in RESERVED:
                bad.append(f"{key}.{name}: set by the pipeline")
            elif name not in params.TYPES[stem]:
                bad.append(f"{key}.{name}: not a parameter of notebook {stem} "
                           f"(known: {', '.join(sorted(params.TYPES[stem]))})")
            else:
                out[stem][name] = value
    bad += _spread(dict(last or {}), chosen, out)
    for stem, values in out.items():
        bad += [f"{stem}: {line}" for line in params.problems(stem, values)]
    if bad:
        raise StudyError(f"{source}: bad parameters, no stage started:\n  " + "\n  ".join(bad))
    return {s: v for s, v in out.items() if v}


def study_overrides(stems: Sequence[str], config_file: str | Path | None = None,
                    assignments: Iterable[str] = ()) -> dict[str, dict]:
    """:func:`resolve` for a study file (optional) and ``-p`` pairs (which win over the file's top level)."""
    common, per_stage = load_study(config_file) if config_file else ({}, {})
    pairs = parse_assignments(assignments)
    source = " + ".join([*([str(config_file)] if config_file else []), *(["-p"] if pairs else [])]) or "study"
    return resolve(stems, common, per_stage, source, last=pairs)


#: Classification sets of 2D images (``lib.datasets``): no CT volumes, organ masks or reports.
IMAGE_SETS = ("brain-mri", "brain", "cxr", "cxr-3class")


def segments(dataset: object) -> bool:
    """True for a data set (name or alias) that the registry lists for notebook 06."""
    from lib import datasets

    try:
        return datasets.get(str(dataset)).applies_to("06_segment")
    except ValueError:
        return False


def is_image_set(dataset: object) -> bool:
    """True for a 2D classification set: a named one, or a CSV of image paths."""
    return str(dataset) in IMAGE_SETS or str(dataset).lower().endswith(".csv")


def not_applicable(stem: str, values: Mapping[str, Any], study: Mapping[str, dict] | None = None) -> str | None:
    """Why stage ``stem`` does not apply to a study (its effective parameters ``values``, and every stage's
    overrides ``study``), or None when it runs. A 2D image set has no reports to label, no CT volumes with organ
    masks to crop, and no segmentation masks (its explanations are scored by deletion only; notebook 00 describes its
    classes, image sizes and duplicates); notebook 06 runs only on a segmentation set."""
    if stem.startswith("06") and values.get("dataset") is not None and not segments(values["dataset"]):
        from lib import datasets as registry

        return (f"dataset {values.get('dataset')}: not a segmentation set (images with lesion masks); notebook 06 "
                f"segments {', '.join(registry.names('06_segment'))}")
    datasets = {v.get("dataset") for v in (study or {}).values() if "dataset" in v}
    image_set = next((d for d in datasets if is_image_set(d)), None)
    if image_set is None:
        return None
    if stem.startswith("01"):
        return f"dataset {image_set}: labels come from its class folders, there are no reports to label"
    if stem.startswith("02"):
        return f"dataset {image_set}: 2D images, no CT volumes with organ masks to crop"
    return None
