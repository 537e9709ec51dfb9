"""Datasets for training: organ crops joined with labels, and folders/tables of 2D images.

Why: every source is decoded, resized and stacked ONCE into an in-memory tensor (``CachedDataset``),
so an epoch costs indexing plus MONAI augmentation, and the data loader is never the bottleneck on
these small sets. The table beside the tensor (``dataset.table``) keeps case/patient/path columns
for grouped splits and prediction tables.

Input kinds for a crop ``(S, H, W)``: ``2d`` = the middle slice; ``25d`` = ``k`` neighbouring slices
as channels; ``slab`` = ``S`` evenly spaced slices over the organ as channels (the whole organ in one 2D
input: study-level labels do not say which slice holds the lesion); ``3d`` = ``(1, D, H, W)`` for 3D
networks. All go through ``lib.imageio.preprocess``, the same code the serving stage runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lib.io import DataError, SkippedCases

INPUT_KINDS = ("2d", "25d", "slab", "3d")


# ----------------------------------------------------------------------------- cached dataset


@dataclass
class CachedDataset(Dataset):
    """Inputs ``x`` (N, C, ...) and targets ``y`` held in memory, with per-sample MONAI augmentation."""

    x: Tensor
    y: Tensor
    table: pd.DataFrame
    label_names: list[str]
    task: str
    transform: Callable | None = None
    preprocessing: dict = field(default_factory=dict)
    skipped: SkippedCases = field(default_factory=SkippedCases)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.x[i]
        if self.transform is not None:
            x = torch.as_tensor(self.transform(x)).float()
        return x, self.y[i]

    @property
    def in_chans(self) -> int:
        return int(self.x.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.label_names) if self.task != "binary" else 1

    def set_random_state(self, seed: int) -> None:
        """Re-seed the augmentation (``fit`` calls this every epoch so resumed runs replay the same draws)."""
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=seed % 2**32)

    def subset(self, idx: Sequence[int] | np.ndarray, transform: Callable | None = None) -> CachedDataset:
        """Rows ``idx`` (a fold) sharing the cache, optionally with another transform (none for validation)."""
        idx = np.asarray(idx, dtype=int)
        return CachedDataset(self.x[idx], self.y[idx], self.table.iloc[idx].reset_index(drop=True), self.label_names,
                             self.task, transform, self.preprocessing, self.skipped)

    def targets_numpy(self) -> np.ndarray:
        return self.y.numpy()


def make_augment(kind: str | None = "light", spatial_dims: int = 2, seed: int = 0) -> Callable | None:
    """MONAI augmentation by name: ``none``, ``light`` (flips), ``medium`` (+ rotation, intensity), ``elastic``."""
    if kind in (None, "none", ""):
        return None
    from monai import transforms as mt

    if kind not in ("light", "medium", "elastic"):
        raise ValueError(f"augment must be none|light|medium|elastic, got {kind!r}")
    ops: list = [mt.RandFlip(prob=0.5, spatial_axis=spatial_dims - 1)]
    if kind in ("medium", "elastic"):
        ops += [mt.RandRotate(range_x=0.2, prob=0.5, padding_mode="zeros") if spatial_dims == 2
                else mt.RandRotate(range_z=0.2, prob=0.5, padding_mode="zeros"),
                mt.RandScaleIntensity(factors=0.1, prob=0.5, channel_wise=False),
                mt.RandShiftIntensity(offsets=0.05, prob=0.5)]
    if kind == "elastic" and spatial_dims == 2:
        ops.append(mt.Rand2DElastic(spacing=(16, 16), magnitude_range=(0.5, 1.5), prob=0.3, padding_mode="zeros"))
    compose = mt.Compose(ops, lazy=False)
    compose.set_random_state(seed=seed)
    return _PlainTensor(compose)


class _PlainTensor:
    """Wraps a MONAI Compose to work on plain tensors: MONAI's MetaTensor bookkeeping (affine, applied-operations
    history) is switched off while it runs -- 2.5x faster per sample here, same values -- and not collated."""

    def __init__(self, compose) -> None:
        self.compose = compose

    def __call__(self, x: Tensor) -> Tensor:
        from monai.data import get_track_meta, set_track_meta

        tracking = get_track_meta()
        set_track_meta(False)
        try:
            out = self.compose(x)
        finally:
            set_track_meta(tracking)
        return out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)

    def set_random_state(self, seed: int) -> None:
        self.compose.set_random_state(seed=seed)


# ----------------------------------------------------------------------------- labels


def load_labels(source: str = "reports", run_dir: str | Path | None = None,
                cohort_dir: str | Path | None = None) -> pd.DataFrame:
    """Study labels: ``run_dir/labels.csv`` from the report stage, or ``cohort_dir/ground_truth/labels.csv``."""
    if source == "reports":
        path = Path(run_dir or ".") / "labels.csv"
    elif source == "truth":
        path = Path(cohort_dir or ".") / "ground_truth" / "labels.csv"
    else:
        raise ValueError(f"label source must be reports|truth, got {source!r}")
    from lib.reports import read_labels

    df = read_labels(path)  # values outside 1/0/-1/blank are an error naming the file, never a new class
    if "study_id" not in df:
        raise DataError(path, f"no study_id column (columns: {list(df.columns)})")
    return df


def binary_targets(values: pd.Series, uncertain: str = "ignore") -> pd.Series:
    """1/0/-1/blank -> 1.0/0.0/NaN under the uncertain policy (NaN rows are dropped for binary tasks)."""
    v = pd.to_numeric(values, errors="coerce").astype(float)
    if uncertain == "positive":
        return v.replace(-1.0, 1.0)
    if uncertain == "negative":
        return v.replace(-1.0, 0.0)
    if uncertain == "ignore":
        return v.where(v != -1.0)
    raise ValueError(f"uncertain policy must be ignore|positive|negative, got {uncertain!r}")


# ----------------------------------------------------------------------------- crops


def crop_to_input(image: np.ndarray, mask: np.ndarray | None = None, kind: str = "slab", n_slices: int = 8,
                  size: int = 64, mask_mode: str = "none") -> np.ndarray:
    """One crop ``(S, H, W)`` in [0, 1] -> network input via the shared ``lib.imageio.preprocess`` (train == serve).

    ``2d`` = middle slice, ``25d`` = ``n_slices`` around it, ``slab`` = ``n_slices`` evenly spaced over the crop
    (crops are cut to the organ's box, so that spans the organ), ``3d`` = ``(1, n_slices, size, size)``.
    ``mask_mode='multiply'`` blanks voxels outside the organ mask first.
    """
    from lib import imageio

    if kind not in INPUT_KINDS:
        raise ValueError(f"input kind must be one of {INPUT_KINDS}, got {kind!r}")
    if mask is not None and mask_mode == "multiply":
        image = image * (mask > 0)
    return imageio.preprocess(image, crop_spec(kind, n_slices, size))


def crop_spec(kind: str = "slab", n_slices: int = 8, size: int = 64) -> dict:
    """The ``preprocess`` spec of a crop input (stored in checkpoints; crops are already windowed to [0, 1])."""
    channels = {"2d": 1, "25d": n_slices, "slab": n_slices, "3d": 1}[kind]
    return {"kind": kind, "n_slices": n_slices, "channels": channels, "size": size, "normalise": "none"}


def read_crop(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``image`` and ``mask`` of a crop ``.npz`` with clear errors for missing/corrupt/odd files."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "crop file not found")
    try:
        with np.load(path) as z:
            image = np.asarray(z["image"], dtype=np.float32)
            mask = np.asarray(z["mask"]) if "mask" in z.files else None
    except KeyError as exc:
        raise DataError(path, "crop npz has no 'image' array") from exc
    except Exception as exc:  # zipfile/pickle/EOF errors
        raise DataError(path, f"unreadable crop npz ({type(exc).__name__}: {exc})") from exc
    if image.ndim != 3 or min(image.shape) == 0:
        raise DataError(path, f"crop image must be a non-empty (S, H, W) array, got {image.shape}")
    if not np.isfinite(image).all():
        raise DataError(path, "crop image has NaN/inf values")
    if mask is not None and mask.shape != image.shape:
        raise DataError(path, f"crop mask shape {mask.shape} differs from image {image.shape}")
    return image, mask


def _label_of_row(frame: pd.DataFrame, template: str) -> pd.Series:
    """Per-row value of the column ``template.format(organ=row.organ)`` (e.g. ``{organ}_abnormal``)."""
    cols = frame["organ"].map(lambda o: template.format(organ=o))
    out = pd.Series(np.nan, index=frame.index, dtype=float)
    for col in cols.unique():
        if col in frame:
            rows = cols == col
            out[rows] = pd.to_numeric(frame.loc[rows, col], errors="coerce")
    return out


def crop_dataset(crops_dir: str | Path, labels: pd.DataFrame, label_cols: Sequence[str] | str = "{organ}_abnormal",
                 organ: str | None = None, task: str = "binary", kind: str = "slab", n_slices: int = 8,
                 size: int = 64, mask_mode: str = "none", uncertain: str = "ignore",
                 truth: pd.DataFrame | None = None, transform: Callable | None = None,
                 index: pd.DataFrame | None = None, mode: str | None = None) -> CachedDataset:
    """Crops listed in ``crops_dir/index.csv`` joined with study labels and decoded into memory.

    ``label_cols``: a template like ``"{organ}_abnormal"`` (binary: each crop gets its own organ's label, so
    ``organ=None`` trains one organ-agnostic anomaly classifier) or a list of columns (multi-label / one
    binary column). Crops without a labels row, with a blank (or, under ``ignore``, uncertain) binary label,
    or with an unreadable file are skipped and listed in ``dataset.skipped``. ``truth`` (ground-truth labels,
    synthetic cohort only) adds ``truth`` columns so models trained on report labels are scored on the truth.
    """
    crops_dir = Path(crops_dir)
    if index is None:
        index_path = crops_dir / "index.csv"
        if not index_path.exists():
            raise DataError(index_path, "crop index not found (run notebook 02 / lib.crop.ensure_crops first)")
        index = pd.read_csv(index_path)
    table = index[index["path"].astype(str).str.endswith(".npz")]
    if mode is not None:
        table = table[table["mode"] == mode]
    if organ is not None:
        table = table[table["organ"] == organ]
    if table.empty:
        raise DataError(crops_dir / "index.csv", f"no npz crops for organ {organ!r} (mode {mode!r})")
    template = label_cols if isinstance(label_cols, str) else None
    cols = list(label_cols) if template is None else sorted({template.format(organ=o) for o in table["organ"]})
    missing = [c for c in cols if c not in labels]
    if missing:
        raise DataError("labels.csv", f"label columns {missing} not found (have {list(labels.columns)})")
    lab = labels[["study_id", *cols]].drop_duplicates("study_id")
    table = table.merge(lab, left_on="case_id", right_on="study_id", how="left", indicator=True)
    skipped = SkippedCases()
    for case in table.loc[table["_merge"] == "left_only", "case_id"]:
        skipped.add(str(case), f"no labels row for study {case}", stage="dataset")
    table = table[table["_merge"] == "both"].drop(columns="_merge").reset_index(drop=True)
    if task == "binary":
        raw = _label_of_row(table, template) if template else pd.to_numeric(table[cols[0]], errors="coerce")
        table["target"] = binary_targets(raw, uncertain)
        if truth is not None:
            t = truth[["study_id", *cols]].drop_duplicates("study_id")
            t = table[["study_id", "organ"]].merge(t, on="study_id", how="left")
            table["truth"] = (_label_of_row(t, template) if template else t[cols[0]]).to_numpy(dtype=float)
        blank = table["target"].isna()
        for case, org in zip(table.loc[blank, "case_id"], table.loc[blank, "organ"], strict=True):
            skipped.add(str(case), f"{org} label blank or uncertain (policy {uncertain})", stage="dataset")
        table = table[~blank].reset_index(drop=True)
        target_cols, names = ["target"], [template.format(organ=organ or "organ") if template else cols[0]]
    else:
        if truth is not None:
            t = truth[["study_id", *cols]].drop_duplicates("study_id").rename(columns={c: f"truth_{c}" for c in cols})
            table = table.merge(t, on="study_id", how="left")
        target_cols, names = cols, cols
    xs, keep = [], []
    for i, row in enumerate(table.itertuples(index=False)):
        try:
            image, mask = read_crop(crops_dir / row.path)
            xs.append(crop_to_input(image, mask, kind, n_slices, size, mask_mode))
            keep.append(i)
        except DataError as exc:
            skipped.add(str(row.case_id), exc, stage="dataset")
    table = table.iloc[keep].reset_index(drop=True)
    if not len(table):
        raise DataError(crops_dir, f"no usable crops for organ {organ!r} and labels {cols} ({len(skipped)} skipped)")
    y = _targets(table, target_cols, task)
    prep = {"source": "crops", **crop_spec(kind, n_slices, size), "mask_mode": mask_mode, "organ": organ,
            "crop_mode": mode, "label_cols": label_cols if template else cols, "uncertain": uncertain}
    return CachedDataset(torch.from_numpy(np.stack(xs)), y, table, names, task, transform, prep, skipped)


def _targets(table: pd.DataFrame, label_cols: Sequence[str], task: str) -> Tensor:
    values = np.array(table[list(label_cols)].apply(pd.to_numeric, errors="coerce"), dtype=np.float32)
    if task == "multiclass":
        return torch.from_numpy(values[:, 0].astype(np.int64))
    return torch.from_numpy(values)


# ----------------------------------------------------------------------------- 2D images


def image_spec(channels: int = 1, size: int = 128) -> dict:
    """The ``preprocess`` spec of a 2D image input (percentile-normalised to [0, 1])."""
    return {"kind": "2d", "channels": channels, "size": size, "normalise": "percentile"}


def image_dataset(table: pd.DataFrame, classes: Sequence[str] | None = None, path_col: str = "path",
                  label_col: str = "label", channels: int = 1, size: int = 128, transform: Callable | None = None,
                  task: str | None = None) -> CachedDataset:
    """A table of image paths (``lib.splits.image_folder_table`` or a CSV) with a class column, decoded into memory.

    Multi-class by default (binary when there are two classes and ``task='binary'``); unreadable images are
    skipped and listed in ``dataset.skipped``.
    """
    if path_col not in table or label_col not in table:
        raise DataError("table", f"needs columns {path_col!r} and {label_col!r} (have {list(table.columns)})")
    classes = list(classes) if classes is not None else sorted(table[label_col].dropna().astype(str).unique())
    task = task or ("binary" if len(classes) == 2 else "multiclass")
    from lib import imageio

    spec = image_spec(channels, size)
    skipped = SkippedCases()
    xs, keep = [], []
    for i, row in enumerate(table.itertuples(index=False)):
        path, label = getattr(row, path_col), getattr(row, label_col)
        if pd.isna(label) or str(label) not in classes:
            skipped.add(str(path), f"label {label!r} missing or not in {classes}", stage="dataset", path=path)
            continue
        try:
            xs.append(imageio.load_input(path, spec))
            keep.append(i)
        except DataError as exc:
            skipped.add(str(path), exc, stage="dataset")
    out = table.iloc[keep].reset_index(drop=True).copy()
    if out.empty:
        raise DataError("table", f"no usable images ({len(skipped)} skipped)")
    out["target"] = out[label_col].astype(str).map({c: k for k, c in enumerate(classes)})
    if task == "binary":
        y = torch.from_numpy(out["target"].to_numpy(np.float32, copy=True)[:, None])
        names = [classes[1]]
    else:
        y = torch.from_numpy(out["target"].to_numpy(np.int64, copy=True))
        names = classes
    prep = {"source": "images", **spec, "classes": classes}
    return CachedDataset(torch.from_numpy(np.stack(xs)), y, out, names, task, transform, prep, skipped)


def csv_dataset(csv_path: str | Path, path_col: str = "path", label_col: str = "label", **kw) -> CachedDataset:
    """Images listed in a CSV (paths relative to the CSV's folder allowed)."""
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise DataError(csv_path, "CSV not found")
    table = pd.read_csv(csv_path)
    if path_col not in table:
        raise DataError(csv_path, f"no {path_col!r} column")
    table[path_col] = [str(p) if Path(p).is_absolute() else str(csv_path.parent / p) for p in table[path_col]]
    return image_dataset(table, path_col=path_col, label_col=label_col, **kw)


# ----------------------------------------------------------------------------- registry: data sets by name


@dataclass(frozen=True)
class DatasetInfo:
    """A named data set: where it comes from and what the stages need to know about it.

    ``locate(profile, seed)`` returns its folder (synthetic sets are generated and cached, real ones are looked
    up in ``../shared/data``: a ``DataError`` names the missing folder). ``stages`` are the notebooks whose
    ``dataset`` parameter accepts it; ``inputs`` says what the training stages read: ``crops`` (notebook 02's
    organ crops in ``run_dir/crops``), ``images`` (the 2D files themselves) or ``volumes``.
    """

    name: str
    kind: str  # "2d" | "3d"
    task: str | None  # binary | multiclass | segmentation; None: no labels (EDA and cropping only)
    group_col: str  # folds are grouped by this column (patients, or duplicate groups of 2D images)
    lesion_masks: bool  # voxel/pixel lesion masks exist (localisation scores, segmentation)
    stages: tuple[str, ...]
    locate: Callable[[str, int], Path] = field(repr=False, compare=False)
    aliases: tuple[str, ...] = ()
    inputs: str = "images"
    classes: tuple[str, ...] | None = None  # class folders in label order (None: sorted folder names)
    truth: bool = False  # labels from text come with a ground truth (the synthetic cohort)
    layout: str = "auto"  # CT volumes: the ``lib.crop.discover_cases`` layout of the folder
    image_glob: str | None = None  # CT volumes: which files are images (None: the stage's parameter)
    description: str = ""

    def applies_to(self, stage: str) -> bool:
        return stage in self.stages


def _synthetic_cohort(profile: str, seed: int) -> Path:
    from lib import synth

    return synth.ensure_cohort(profile, seed)


def _synthetic_trus(profile: str, seed: int) -> Path:
    from lib import synth_trus

    return synth_trus.ensure_trus(profile, seed)


def _shared(*parts: str) -> Callable[[str, int], Path]:
    """A locator for a folder in ``../shared/data`` that fails with the folder's name when it is absent."""

    def locate(profile: str = "", seed: int = 0) -> Path:
        from lib import config

        root = config.shared_path(*parts)
        if not root.exists():
            raise DataError(root, f"data set folder not found (expected ../shared/data/{'/'.join(parts)})")
        return root

    return locate


#: Every named data set, by canonical name. Aliases resolve through :func:`get`.
REGISTRY: dict[str, DatasetInfo] = {}


def register(info: DatasetInfo) -> DatasetInfo:
    """Add a data set; a name or alias used twice is a programming error."""
    taken = {n for d in REGISTRY.values() for n in (d.name, *d.aliases)}
    clash = {info.name, *info.aliases} & taken
    if clash:
        raise ValueError(f"data set name(s) {sorted(clash)} already registered")
    REGISTRY[info.name] = info
    return info


register(DatasetInfo("synthetic-ct", "3d", "binary", "patient_id", True,
                     ("00_eda", "02_crop_organs", "03_train", "04_kfold", "05_explain"), _synthetic_cohort,
                     aliases=("synthetic",), inputs="crops", truth=True, layout="synthetic",
                     description="generated abdominal CT cohort with reports, organ and lesion masks"))
register(DatasetInfo("ct-totalseg", "3d", None, "patient_id", False, ("00_eda", "02_crop_organs"),
                     _shared("ct-totalseg"), inputs="volumes", layout="pairs", image_glob="example_ct*.nii.gz",
                     description="TotalSegmentator example CTs with their organ segmentation"))
register(DatasetInfo("brain-mri", "2d", "binary", "group", False, ("00_eda", "03_train", "04_kfold"),
                     _shared("brain-mri-tumor"), aliases=("brain",), classes=("no", "yes"),
                     description="brain MRI slices, tumour yes/no"))
register(DatasetInfo("cxr-3class", "2d", "multiclass", "group", False, ("00_eda", "03_train", "04_kfold"),
                     _shared("cxr-covid-3class", "Covid19-dataset"), aliases=("cxr",),
                     description="chest radiographs: Covid / normal / viral pneumonia"))
register(DatasetInfo("trus", "2d", "segmentation", "patient_id", True, ("06_segment",), _synthetic_trus,
                     description="generated transrectal ultrasound images with lesion and gland masks"))
register(DatasetInfo("ms-lesion", "2d", "segmentation", "patient_id", True, ("06_segment",),
                     _shared("ms-lesion-mri", "cross_sectional", "MNI"),
                     description="MS-lesion MRI (FLAIR, T1, T2) slices with lesion masks"))
register(DatasetInfo("ct-organs", "2d", "segmentation", "patient_id", True, ("06_segment",), _synthetic_cohort,
                     inputs="crops", description="axial slices of the synthetic CT cohort's organ crops"))


def names(stage: str | None = None) -> list[str]:
    """Canonical names of the registered data sets (those ``stage`` accepts, when given)."""
    return [n for n, d in REGISTRY.items() if stage is None or d.applies_to(stage)]


def _by_name() -> dict[str, DatasetInfo]:
    return {k: d for d in REGISTRY.values() for k in (d.name, *d.aliases)}


def get(name: str, stage: str | None = None) -> DatasetInfo:
    """The registered data set ``name`` (or alias); an unknown name is a ``ValueError`` with the closest names,
    and one that ``stage`` does not use says which stages do."""
    import difflib

    known = _by_name()
    info = known.get(str(name).strip().lower())
    if info is None:
        close = difflib.get_close_matches(str(name).lower(), list(known), n=3, cutoff=0.5)
        close = list(dict.fromkeys(known[c].name for c in close))
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown data set {name!r}.{hint} Registered: {', '.join(names())} "
                         f"(aliases: {', '.join(sorted(set(known) - set(REGISTRY)))}).")
    if stage is not None and not info.applies_to(stage):
        raise ValueError(f"data set {info.name!r} is not used by stage {stage} (it is for {', '.join(info.stages)}); "
                         f"stage {stage} takes {', '.join(names(stage))}")
    return info


def lookup(dataset: str | Path, stage: str | None = None) -> DatasetInfo | Path:
    """A ``dataset`` parameter: a registered name or alias -> its ``DatasetInfo``; an existing file or folder (as
    given, or relative to the repository: papermill runs notebooks inside ``notebooks/``) -> that ``Path``.
    Anything else is :func:`get`'s error, with the names closest to what was typed."""
    from lib import config

    if str(dataset).strip().lower() in _by_name():
        return get(str(dataset), stage)
    path = config.data_path(dataset)
    if path.exists():
        return path
    try:
        return get(str(dataset), stage)
    except ValueError as exc:
        raise ValueError(f"{exc} Or give an existing folder or CSV file.") from None


def canonical(dataset: str | Path, stage: str | None = None) -> str:
    """The canonical name of a registered data set or alias (``cxr`` -> ``cxr-3class``); a folder or file as its
    path. Notebooks compare this, never the spelling a user typed."""
    found = lookup(dataset, stage)
    return str(found) if isinstance(found, Path) else found.name


def has_truth(dataset: str | Path) -> bool:
    """True for a registered set whose labels come with a ground truth (the synthetic cohort); False for folders."""
    found = lookup(dataset)
    return not isinstance(found, Path) and found.truth


def locate(dataset: str, profile: str = "smoke", seed: int | None = None, stage: str | None = None
           ) -> tuple[DatasetInfo, Path]:
    """A registered data set and its folder (generated for ``profile``/``seed`` when synthetic)."""
    from lib import config

    info = get(dataset, stage)
    return info, info.locate(profile, config.DEFAULT_SEED if seed is None else seed)


# ----------------------------------------------------------------------------- by name (notebook parameter)


def build_dataset(dataset: str = "synthetic-ct", run_dir: str | Path | None = None, profile: str = "smoke",
                  seed: int | None = None, label_source: str = "reports", lang: str = "ja",
                  organ: str | None = None, label_cols: Sequence[str] | str = "{organ}_abnormal",
                  task: str = "binary", kind: str = "slab", n_slices: int = 8, size: int = 64,
                  mask_mode: str = "none", uncertain: str = "ignore", channels: int = 1,
                  root: str | Path | None = None, stage: str = "03_train") -> tuple[CachedDataset, str]:
    """The dataset a notebook parameter names (``lookup``), plus the column folds must be grouped by.

    Registered sets whose ``inputs`` are ``crops`` (``synthetic-ct``): organ crops of the synthetic cohort
    (``lib.crop.ensure_crops``) joined with report labels (``lib.reports.label_cohort``) or the ground truth;
    both upstream steps are cached and only run when ``run_dir`` lacks their output; the ground truth rides
    along as ``truth``. Registered 2D sets (``brain-mri``, ``cxr-3class``): the class folders in
    ``../shared/data`` (or ``root``), grouped by duplicate ``group`` (``lib.splits.image_folder_table``).
    A folder of CT volumes with organ masks (``lib.crop.is_volume_cohort``: the layouts notebook 02 crops) means
    that run's crops (``run_dir/crops``) with its report labels (``run_dir/labels.csv``): :func:`own_crop_dataset`.
    Any other value is a path: a class-per-folder image tree (PNG/JPG/DICOM) or a CSV with ``path`` and
    ``label`` columns (grouped by ``patient_id`` or ``group`` when present, else by file).
    """
    from lib import config

    seed = config.DEFAULT_SEED if seed is None else seed
    info = lookup(dataset, stage)
    if isinstance(info, Path):
        from lib import crop

        if crop.is_volume_cohort(info):  # own CT cohort: notebook 02's crops + notebook 01's report labels
            return own_crop_dataset(config.resolve_run_dir(run_dir, profile), organ, label_cols, task, kind,
                                    n_slices, size, mask_mode, uncertain), "patient_id"
        if info.suffix.lower() == ".csv" and info.is_file():  # a table of image paths + a label column
            ds = csv_dataset(info, channels=channels, size=size)
            return ds, next((c for c in ("patient_id", "group") if c in ds.table), "path")
        if info.is_dir():  # <root>/[<split>/]<class>/<image>
            return _folder_dataset(info, channels, size, task=None)
        raise ValueError(f"dataset {str(dataset)!r} is neither a registered name, an image folder nor a CSV file")
    if info.inputs == "crops":
        from lib import crop, reports

        run = config.resolve_run_dir(run_dir, profile)
        cohort = info.locate(profile, seed)
        if not (run / "crops" / "index.csv").exists():
            crop.ensure_crops(run, profile, seed)
        if label_source == "reports":
            reports.label_cohort(cohort, lang, run)  # cached when labels.csv is up to date
        labels = load_labels(label_source, run, cohort)
        truth = load_labels("truth", run, cohort)
        ds = crop_dataset(run / "crops", labels, label_cols, organ, task, kind, n_slices, size, mask_mode, uncertain,
                          truth=truth, mode="bbox")
        ds.skipped.save(run / "skipped_dataset.csv")
        return ds, info.group_col
    folder = Path(root) if root else info.locate(profile, seed)
    ds, _ = _folder_dataset(folder, channels, size, list(info.classes) if info.classes else None, info.task)
    return ds, info.group_col


def own_crop_dataset(run_dir: Path, organ: str | None = None, label_cols: Sequence[str] | str = "{organ}_abnormal",
                     task: str = "binary", kind: str = "slab", n_slices: int = 8, size: int = 64,
                     mask_mode: str = "none", uncertain: str = "ignore") -> CachedDataset:
    """The organ crops of a run on the user's own CT cohort (notebook 02) joined with the labels notebook 01 read
    from its reports; crops are grouped by the reports' ``patient_id`` when it is given (else one group per case),
    so a patient's studies never span training and validation."""
    for path, stage in ((run_dir / "crops" / "index.csv", "02 (organ crops)"), (run_dir / "labels.csv",
                                                                                 "01 (report labels)")):
        if not path.exists():
            raise DataError(path, f"not found: run notebook {stage} on this cohort into the same run folder first")
    labels = load_labels("reports", run_dir)
    ds = crop_dataset(run_dir / "crops", labels, label_cols, organ, task, kind, n_slices, size, mask_mode, uncertain,
                      mode="bbox")
    if "patient_id" in labels:
        given = labels.drop_duplicates("study_id").set_index("study_id")["patient_id"].astype("string").str.strip()
        patient = ds.table["case_id"].astype(str).map(given.where(given != ""))
        ds.table["patient_id"] = patient.fillna(ds.table["patient_id"].astype(str)).astype(str)
    ds.skipped.save(run_dir / "skipped_dataset.csv")
    return ds


def _folder_dataset(root: Path, channels: int, size: int, classes: list[str] | None = None,
                    task: str | None = None) -> tuple[CachedDataset, str]:
    """Class-per-folder images grouped by duplicate ``group`` (exact copies and perceptual near-duplicates)."""
    from lib import splits

    skipped = SkippedCases()
    table = splits.image_folder_table(root, skipped=skipped)
    ds = image_dataset(table, classes, channels=channels, size=size, task=task)
    ds.skipped.extend(skipped)
    return ds, "group"


def holdout_split(ds: CachedDataset, group_col: str, val_fraction: float = 0.25, seed: int | None = None,
                  strata_col: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): one fold of a patient/duplicate-grouped, label-stratified k-fold.

    ``strata_col`` stratifies on another column (e.g. ``truth``); by default on the training targets. Raises
    ``lib.splits.LeakageError`` if a group ended up on both sides (it cannot, but the check is cheap).
    """
    from lib import config, splits

    seed = config.DEFAULT_SEED if seed is None else seed
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if strata_col is not None:
        strata = ds.table[strata_col].astype(str).to_numpy()
    elif ds.task == "multiclass":
        strata = np.asarray(ds.label_names)[ds.y.numpy()]
    else:
        y = ds.y.numpy().reshape(len(ds), -1)
        strata = np.array(["|".join("nan" if v != v else str(int(v)) for v in row) for row in y])
    frame = pd.DataFrame({"group": ds.table[group_col].astype(str).to_numpy(), "label": strata})
    folds = splits.group_kfold(frame, max(2, round(1 / val_fraction)), "group", "label", seed=seed, rare="merge")
    splits.check_leakage(folds, frame["group"])
    return np.flatnonzero(folds.to_numpy() != 0), np.flatnonzero(folds.to_numpy() == 0)
