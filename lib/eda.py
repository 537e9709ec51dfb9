"""Exploratory data analysis of a CT cohort (notebook 00): what is in the data before any model.

Works on the synthetic cohort and on real folders (the TotalSegmentator example CT) through one
case table, so the notebook changes only its ``dataset`` parameter.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd
import seaborn as sns

from lib import cluster, config, synth
from lib.crop import load_3d, open_cases
from lib.io import DataError, SkippedCases, check_same_grid, voxel_volume_ml
from lib.reports import read_labels


@dataclass
class CTDataset:
    """A CT cohort as the notebooks see it: cases with image + multilabel mask, optional reports."""

    name: str
    root: Path
    cases: pd.DataFrame  # case_id, patient_id, image, mask (absolute paths; mask: a label map or a folder)
    class_map: dict[int, str]
    reports: pd.DataFrame | None = None
    truth: pd.DataFrame | None = None  # only for EDA of the synthetic cohort; never for labelling


def open_dataset(dataset: str | Path = "synthetic-ct", profile: str = "smoke",
                 seed: int = config.DEFAULT_SEED) -> CTDataset:
    """A registered CT set (``lib.datasets``: ``synthetic-ct`` generated on demand, ``ct-totalseg`` from
    ../shared/data) or a folder in any layout notebook 02 crops (synthetic, nnU-Net v1/v2 or MSD, TotalSegmentator,
    CT + mask pairs): the same case table (``lib.crop.open_cases``) and class-map reader as the crop stage.

    Cases without a mask are left out. A folder of per-structure masks (TotalSegmentator's default output) counts
    as one label map whose values follow the structure names in sorted order; images may be DICOM series folders.
    """
    from lib import datasets  # the registry module imports torch: only when a data set is opened

    cases, root = open_cases(dataset, profile, seed, stage="00_eda")
    found = datasets.lookup(dataset, "00_eda")
    class_map: dict[int, str] = {}
    for raw in cases.loc[cases["mask_kind"] == "multilabel", "class_map"]:
        class_map.update({int(k): v for k, v in json.loads(raw or "{}").items()})
    folders = [Path(m) for m in cases.loc[cases["mask_kind"] == "folder", "mask"] if Path(m).is_dir()]
    per_structure = sorted({p.name.split(".nii")[0] for f in folders for p in f.glob("*.nii*")})
    if per_structure and not class_map:
        class_map = {i + 1: name for i, name in enumerate(per_structure)}
    cases = cases[cases["mask"] != ""]
    cases = cases[["case_id", "patient_id", "image", "mask"]].reset_index(drop=True)
    reports = pd.read_csv(root / "reports.csv") if (root / "reports.csv").exists() else None
    truth_csv = root / "ground_truth" / "labels.csv"
    truth = read_labels(truth_csv) if truth_csv.exists() else None
    name = root.name if isinstance(found, Path) else found.name
    return CTDataset(name, root, cases, dict(sorted(class_map.items())), reports, truth)


def case_statistics(ds: CTDataset, structures: list[str] | None = None, hu_sample: int = 4000,
                    seed: int = config.DEFAULT_SEED, scheduler: str | None = None,
                    workers: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame, SkippedCases]:
    """Per case geometry and per case×structure volume/HU; also a HU sample per structure for histograms.

    Returns (cases, structures_long, skipped). Bad cases are skipped and recorded, not fatal. Cases run on
    ``scheduler`` (``lib.cluster``: None is this machine's process pool of ``workers``, 1 runs in-process);
    each case draws its HU sample from its own stream, so the tables are the same wherever cases run.
    """
    wanted = structures or sorted(set(ds.class_map.values()))
    index = {v: k for k, v in ds.class_map.items()}
    labels = {name: index[name] for name in wanted if name in index}
    jobs = [(case, labels, hu_sample, seed) for case in ds.cases[["case_id", "patient_id", "image", "mask"]]
            .to_dict("records")]
    skipped = SkippedCases()
    case_rows, organ_rows = [], []
    for case_row, rows, skips in cluster.run_all(case_stats, jobs, scheduler=scheduler, workers=workers, desc="EDA",
                                             preload=("lib.eda",)):
        skipped.rows.extend(skips)
        if case_row is not None:
            case_rows.append(case_row)
            organ_rows.extend(rows)
    return pd.DataFrame(case_rows), pd.DataFrame(organ_rows), skipped


def case_stats(case: dict, labels: dict[str, int], hu_sample: int, seed: int
               ) -> tuple[dict | None, list[dict], list[dict]]:
    """One case's geometry row, its rows per structure (``labels``: name -> label value) and its skip rows.

    The HU sample comes from a stream of (seed, case id): the same values whichever process runs the case.
    """
    rng = np.random.default_rng([seed, zlib.crc32(str(case["case_id"]).encode())])
    skipped = SkippedCases()
    try:
        img = load_3d(case["image"])
        lab = _label_map(img, case["image"], Path(case["mask"]), labels)
    except DataError as exc:
        skipped.add(case["case_id"], exc, stage="eda")
        return None, [], skipped.rows
    hu = np.asarray(img.dataobj, dtype=np.float32)
    zooms = nib.affines.voxel_sizes(img.affine)
    case_row = {"case_id": case["case_id"], "patient_id": case["patient_id"], "nx": hu.shape[0],
                "ny": hu.shape[1], "slices": hu.shape[2], "spacing_xy_mm": float(zooms[0]),
                "spacing_z_mm": float(zooms[2]), "hu_min": float(hu.min()), "hu_max": float(hu.max())}
    vox_ml = voxel_volume_ml(img)
    organ_rows = []
    for name, value in labels.items():
        m = lab == value
        n = int(m.sum())
        vals = hu[m]
        sample = rng.choice(vals, size=min(hu_sample, n), replace=False) if n else np.empty(0)
        organ_rows.append({"case_id": case["case_id"], "structure": name, "voxels": n,
                           "volume_ml": n * vox_ml, "hu_mean": float(vals.mean()) if n else np.nan,
                           "hu_std": float(vals.std()) if n else np.nan, "hu_sample": sample})
    return case_row, organ_rows, skipped.rows


def _label_map(image: nib.Nifti1Image, image_path: str | Path, mask: Path, labels: dict[str, int]) -> np.ndarray:
    """The case's label map: a multilabel file as stored, or a folder of per-structure masks merged into the
    values of ``labels`` (a structure without a file stays absent); each mask checked to sit on the image grid."""
    if not mask.is_dir():
        seg = load_3d(mask)
        check_same_grid(image, seg, image_path, mask)
        return np.asarray(seg.dataobj).astype(np.int32)
    lab = np.zeros(image.shape[:3], np.int32)
    for name, value in labels.items():
        path = next(iter(sorted(mask.glob(f"{name}.nii*"))), None)
        if path is None:
            continue
        m = load_3d(path)
        check_same_grid(image, m, image_path, path)
        lab[np.asarray(m.dataobj) > 0] = value
    return lab


def hu_long(organs: pd.DataFrame, per_structure: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Explode the per-structure HU samples into a long table for seaborn.

    ``per_structure``: keep at most this many values per structure (a seeded random subset), enough for a violin's
    density; its cost grows with the points drawn, and the cohort's samples run into millions."""
    rows = [pd.DataFrame({"structure": r.structure, "HU": r.hu_sample})
            for r in organs.itertuples() if len(r.hu_sample)]
    long = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["structure", "HU"])
    if per_structure is None or long.empty:
        return long
    shuffled = long.sample(frac=1.0, random_state=seed)
    return shuffled.groupby("structure", sort=False).head(per_structure).reset_index(drop=True)


def report_stats(reports: pd.DataFrame) -> pd.DataFrame:
    """Length of each report in characters and sentences, per language."""
    seps = r"[。\n]|(?<=[.!?])\s+"
    out = reports[["study_id", "lang"]].copy()
    out["characters"] = reports.text.str.len()
    out["sentences"] = reports.text.str.split(seps, regex=True).map(lambda parts: sum(1 for p in parts if p.strip()))
    return out


def prevalence(truth: pd.DataFrame) -> pd.DataFrame:
    """Fraction of studies with each finding (ground truth of the synthetic cohort)."""
    cols = [c for c in synth.LABEL_COLUMNS if c in truth]
    prev = truth[cols].mean().rename("prevalence").reset_index().rename(columns={"index": "finding"})
    prev["organ"] = prev.finding.str.split("_").str[0]
    return prev


def savefig(fig: plt.Figure, run_dir: Path, name: str) -> Path:
    """Save a figure under ``run_dir/figures`` and return the path (figures also stay inline)."""
    path = Path(run_dir) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def middle_slice_panel(ds: CTDataset, n: int = 4, window: tuple[float, float] = (40, 400)) -> plt.Figure:
    """Axial slices through the middle of the first cases with the organ mask outlined."""
    cases = ds.cases.head(n)
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 3.4), squeeze=False)
    lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    for ax, case in zip(axes[0], cases.itertuples(), strict=False):
        img = load_3d(case.image)
        hu, lab = np.asarray(img.dataobj), _label_map(img, case.image, Path(case.mask), {v: k for k, v in
                                                                                           ds.class_map.items()})
        k = int(np.argmax((lab > 0).sum((0, 1))))
        ax.imshow(np.clip(hu[:, :, k].T, lo, hi), cmap="gray", origin="lower")
        ax.contour(lab[:, :, k].T, levels=np.arange(0.5, lab.max() + 1), linewidths=0.6, cmap="tab20",
                   origin="lower")
        ax.set_title(f"{case.case_id} z={k}", fontsize=9)
        ax.axis("off")
    sns.despine(fig)
    return fig


# ----------------------------------------------------------------------------- 2D image sets


@dataclass
class ImageSet:
    """A class-per-folder 2D image set as the training notebooks see it: one row per readable image with its
    class, split folder and duplicate group (``lib.splits.image_folder_table``)."""

    name: str
    root: Path
    table: pd.DataFrame  # path, label, split, sha1, exact_group, group
    skipped: SkippedCases


def is_image_set(dataset: str | Path) -> bool:
    """True for a 2D classification set: a registered one (``brain-mri``, ``cxr``) or a folder of class
    sub-folders (not a CT cohort in one of notebook 02's layouts)."""
    from lib import datasets
    from lib.crop import is_volume_cohort

    found = datasets.lookup(dataset)
    if isinstance(found, Path):
        return found.is_dir() and not is_volume_cohort(found)
    return found.kind == "2d" and found.task in ("binary", "multiclass")


def open_image_set(dataset: str | Path, profile: str = "smoke", seed: int = config.DEFAULT_SEED) -> ImageSet:
    """The images of a 2D set (its registered folder, or the folder given), grouped by duplicates."""
    from lib import datasets
    from lib.splits import image_folder_table

    found = datasets.lookup(dataset)
    root = found if isinstance(found, Path) else found.locate(profile, seed)
    skipped = SkippedCases()
    table = image_folder_table(root, skipped=skipped)
    return ImageSet(root.name if isinstance(found, Path) else found.name, root, table, skipped)


def image_stats(images: ImageSet) -> pd.DataFrame:
    """Per image: class, split, duplicate group and its size, width x height, channels and file size.

    Sizes come from the file header (PIL opens lazily) or, for DICOM, from ``lib.imageio``'s reader; the
    spread of sizes and colour modes is what the training input size and channel choice must cope with.
    """
    from PIL import Image

    from lib.imageio import read_image

    rows = []
    group_size = images.table.groupby("group")["path"].transform("size")
    for rec, n_group in zip(images.table.to_dict("records"), group_size, strict=True):
        path = Path(rec["path"])
        try:
            with Image.open(path) as im:
                width, height, channels = im.size[0], im.size[1], len(im.getbands())
        except Exception:  # not a PIL format (DICOM): the project's reader
            arr = read_image(path)
            height, width = arr.shape[:2]
            channels = arr.shape[2] if arr.ndim == 3 else 1
        rows.append({"path": str(path), "label": rec["label"], "split": rec.get("split", ""),
                     "group": rec["group"], "group_size": int(n_group), "width": int(width), "height": int(height),
                     "channels": int(channels), "kbytes": path.stat().st_size / 1024})
    return pd.DataFrame(rows)


def image_set_figure(stats: pd.DataFrame) -> plt.Figure:
    """Class balance (per split folder), image sizes per class, and the share of images in duplicate groups."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    sns.countplot(stats, x="label", hue="split" if stats["split"].nunique() > 1 else None, ax=axes[0])
    axes[0].set_title("images per class")
    sns.scatterplot(stats, x="width", y="height", hue="label", ax=axes[1], alpha=0.6, s=14)
    axes[1].set_title("image size (pixels)")
    dup = stats.assign(duplicated=stats["group_size"] > 1).groupby("label")["duplicated"].mean().reset_index()
    sns.barplot(dup, x="label", y="duplicated", ax=axes[2])
    axes[2].set(title="share in a duplicate group", ylabel="fraction", ylim=(0, 1))
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    return fig


def image_examples(stats: pd.DataFrame, per_class: int = 3, seed: int = config.DEFAULT_SEED) -> plt.Figure:
    """A few images of every class (as the project's reader returns them)."""
    from lib.imageio import read_image

    labels = sorted(stats["label"].unique())
    fig, axes = plt.subplots(len(labels), per_class, figsize=(2.4 * per_class, 2.4 * len(labels)), squeeze=False)
    for row, label in zip(axes, labels, strict=True):
        pick = stats[stats["label"] == label].sample(min(per_class, (stats["label"] == label).sum()),
                                                      random_state=seed % 2**32)
        for ax in row:
            ax.axis("off")
        for ax, path in zip(row, pick["path"], strict=False):
            arr = read_image(path)
            ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
            ax.set_title(f"{label}: {Path(path).name[:18]}", fontsize=8)
    fig.tight_layout()
    return fig
