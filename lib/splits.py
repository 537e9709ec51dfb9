"""Patient- and duplicate-grouped, label-stratified folds, and the checks that keep them honest.

Why: a model evaluated on an image it (or its copy, or another study of the same patient) was trained on
reports an optimistic score. The public 2D sets here hold exact copies (brain MRI: 22 groups) and the
same chest X-ray in both ``train/`` and ``val/``. So every split goes through groups: patient ids,
exact-byte hashes and perceptual hashes, merged into connected components, then sklearn's
``StratifiedGroupKFold``; ``check_leakage`` fails the run if any group still crosses folds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from lib import config
from lib.io import DataError, SkippedCases

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
# Near-duplicate rule (see ``near_duplicate_groups``): 16x16 = 256-bit hashes, both within 48 bits (3/16).
HASH_SIZE = 16
THRESHOLD = 48


class LeakageError(ValueError):
    """A group (patient, duplicate image) sits in more than one fold or in both train and validation."""

    def __init__(self, message: str, crossing: dict | None = None) -> None:
        self.crossing = crossing or {}
        super().__init__(message)


# ----------------------------------------------------------------------------- grouped, stratified folds


def stratification_key(df: pd.DataFrame, label_col: str | Sequence[str]) -> pd.Series:
    """The label to stratify on: one column, or several combined into one key (multi-label: ``"1|0|1"``)."""
    cols = [label_col] if isinstance(label_col, str) else list(label_col)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise KeyError(f"label column(s) {missing} not in table (have {list(df.columns)})")
    bad = df[cols].isna().any(axis=1)
    if bad.any():
        rows = list(df.index[bad][:5])
        raise ValueError(f"label column(s) {cols} missing for {int(bad.sum())} of {len(df)} rows (first: {rows}); "
                         "drop or fill them before splitting")
    if len(cols) == 1:
        return df[cols[0]].astype(str).rename("stratum")
    return df[cols].astype(str).agg("|".join, axis=1).rename("stratum")


def group_kfold(df: pd.DataFrame, n_splits: int = 5, group_col: str = "group",
                label_col: str | Sequence[str] = "label", seed: int = config.DEFAULT_SEED,
                rare: str = "error") -> pd.Series:
    """Fold index (0..n_splits-1) per row: groups never split, label proportions roughly equal per fold.

    ``label_col`` may name several columns (multi-label): their values are joined into one stratum key.
    A stratum present in fewer groups than folds cannot appear in every fold; ``rare="error"`` (default)
    raises naming it, ``rare="merge"`` pools such strata into one ``"<rare>"`` stratum first (useful for
    combined multi-label keys). Deterministic for a given ``seed`` and row order.
    """
    if df is None or len(df) == 0:
        raise ValueError("empty dataset: no rows to split (did filtering remove everything?)")
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}")
    if group_col not in df.columns:
        raise KeyError(f"group column {group_col!r} not in table (have {list(df.columns)})")
    groups = df[group_col]
    if groups.isna().any():
        raise ValueError(f"group column {group_col!r} missing for {int(groups.isna().sum())} rows "
                         f"(first: {list(df.index[groups.isna()][:5])})")
    strata = stratification_key(df, label_col)
    n_groups = groups.nunique()
    if n_groups < n_splits:
        raise ValueError(f"only {n_groups} groups in {len(df)} rows for {n_splits} folds: lower n_splits")
    if rare not in ("error", "merge"):
        raise ValueError(f"rare must be 'error' or 'merge', got {rare!r}")
    strata = _merge_rare(strata, groups, n_splits) if rare == "merge" else strata
    _check_enough_groups(strata, groups, n_splits, label_col)
    y = pd.factorize(strata, sort=True)[0]
    g = pd.factorize(groups)[0]
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed % 2**32)
    fold = np.full(len(df), -1, dtype=int)
    for k, (_, test_idx) in enumerate(cv.split(np.zeros(len(df)), y, g)):
        fold[test_idx] = k
    out = pd.Series(fold, index=df.index, name="fold")
    check_leakage(out, groups)
    return out


def _groups_per_stratum(strata: pd.Series, groups: pd.Series) -> pd.DataFrame:
    frame = pd.DataFrame({"stratum": strata.to_numpy(), "group": groups.to_numpy()})
    return frame.groupby("stratum").agg(groups=("group", "nunique"), rows=("group", "size"))


def _merge_rare(strata: pd.Series, groups: pd.Series, n_splits: int) -> pd.Series:
    counts = _groups_per_stratum(strata, groups)
    rare = counts.index[counts["groups"] < n_splits]
    return strata.where(~strata.isin(rare), "<rare>")


def _check_enough_groups(strata: pd.Series, groups: pd.Series, n_splits: int,
                         label_col: str | Sequence[str]) -> None:
    """Every class must be in at least ``n_splits`` groups, or some fold has none of it (AUC undefined)."""
    counts = _groups_per_stratum(strata, groups)
    few = counts[counts["groups"] < n_splits]
    if len(few):
        detail = "; ".join(f"class {s!r}: {r.groups} groups ({r.rows} rows)" for s, r in few.iterrows())
        raise ValueError(f"too few samples of {label_col!r} for {n_splits} folds (each class needs >= {n_splits} "
                         f"groups): {detail}. Lower n_splits, merge or drop the class.")


def fold_table(df: pd.DataFrame, folds: pd.Series, label_col: str = "label",
               group_col: str | None = "group") -> pd.DataFrame:
    """Rows per fold x class (plus groups per fold): the table a notebook shows to prove the balance."""
    frame = df.assign(fold=folds.to_numpy())
    table = pd.crosstab(frame["fold"], frame[label_col].astype(str))
    table["rows"] = table.sum(axis=1)
    if group_col:
        table["groups"] = frame.groupby("fold")[group_col].nunique()
    return table


# ----------------------------------------------------------------------------- leakage checks


def check_leakage(folds: pd.Series, groups: pd.Series | pd.DataFrame, max_listed: int = 10) -> None:
    """Raise ``LeakageError`` naming each group that appears in more than one fold.

    ``folds`` and ``groups`` are matched by position (same row order). ``groups`` may be a DataFrame of
    several group columns (patient, duplicate group): each is checked.
    """
    folds = pd.Series(np.asarray(folds), name="fold")
    frame = groups.to_frame() if isinstance(groups, pd.Series) else groups
    if len(frame) != len(folds):
        raise ValueError(f"folds ({len(folds)}) and groups ({len(frame)}) have different lengths")
    crossing: dict = {}
    for col in frame.columns:
        g = pd.Series(frame[col].to_numpy(), name="group")
        per_group = folds.groupby(g, dropna=True).unique()
        for group, fs in per_group.items():
            if len(fs) > 1:
                crossing[(col, group)] = sorted(int(f) if isinstance(f, np.integer | int) else f for f in fs)
    if crossing:
        listed = "; ".join(f"{col} {g!r} in folds {fs}" for (col, g), fs in list(crossing.items())[:max_listed])
        more = f" (+{len(crossing) - max_listed} more)" if len(crossing) > max_listed else ""
        raise LeakageError(f"{len(crossing)} group(s) cross folds: {listed}{more}", crossing)


def crossing_groups(folds: pd.Series | np.ndarray, groups: pd.Series | pd.DataFrame) -> int:
    """How many groups sit in more than one fold (0 = no leak); ``check_leakage`` without the exception."""
    try:
        check_leakage(pd.Series(np.asarray(folds)), groups)
    except LeakageError as exc:
        return len(exc.crossing)
    return 0


def naive_folds(labels: pd.Series | np.ndarray, n_splits: int = 5, seed: int = config.DEFAULT_SEED) -> pd.Series:
    """Row-level ``StratifiedKFold`` (what a tutorial does, ignoring groups): the baseline that leaks copies."""
    from sklearn.model_selection import StratifiedKFold

    y = pd.Series(np.asarray(labels)).astype(str).to_numpy()
    fold = np.zeros(len(y), dtype=int)
    cv = StratifiedKFold(n_splits, shuffle=True, random_state=seed % 2**32)
    for k, (_, test) in enumerate(cv.split(np.zeros(len(y)), y)):
        fold[test] = k
    return pd.Series(fold, name="fold")


def check_split_disjoint(train_df: pd.DataFrame, val_df: pd.DataFrame, group_col: str = "group",
                         max_listed: int = 10) -> None:
    """Raise ``LeakageError`` if any group has rows in both the training and the validation table."""
    for name, frame in (("train", train_df), ("val", val_df)):
        if group_col not in frame.columns:
            raise KeyError(f"group column {group_col!r} not in {name} table")
    shared = sorted(set(train_df[group_col].dropna()) & set(val_df[group_col].dropna()), key=str)
    if shared:
        listed = ", ".join(repr(g) for g in shared[:max_listed])
        more = f" (+{len(shared) - max_listed} more)" if len(shared) > max_listed else ""
        raise LeakageError(f"{len(shared)} {group_col} group(s) in both train and val: {listed}{more}",
                           {(group_col, g): ["train", "val"] for g in shared})


# ----------------------------------------------------------------------------- groups


def combine_groups(*group_series: pd.Series | Sequence) -> pd.Series:
    """Connected components over several groupings: rows sharing a value in ANY series end up together.

    E.g. ``combine_groups(df.patient_id, df.dup_group)``: two patients who share a duplicated image
    become one group. Missing values link nothing. Ids are 0.. in order of first appearance.
    """
    if not group_series:
        raise ValueError("combine_groups needs at least one group series")
    n = len(group_series[0])
    if any(len(s) != n for s in group_series):
        raise ValueError(f"group series have different lengths: {[len(s) for s in group_series]}")
    index = group_series[0].index if isinstance(group_series[0], pd.Series) else pd.RangeIndex(n)
    rows, cols = [np.arange(n)], [np.arange(n)]
    for s in group_series:
        codes = pd.factorize(pd.Series(np.asarray(s, dtype=object)), use_na_sentinel=True)[0]
        ok = codes >= 0
        first = pd.Series(np.arange(n)[ok]).groupby(codes[ok]).transform("min").to_numpy()
        rows.append(np.arange(n)[ok])
        cols.append(first)
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return pd.Series(pd.factorize(labels)[0], index=index, name="group")


def n_duplicate_groups(groups: pd.Series) -> int:
    """Number of groups holding more than one row."""
    return int((groups.value_counts() > 1).sum())


def _read_gray(path: Path) -> Image.Image:
    """Decode by content (some '.jpg' files are PNG); DICOM via pydicom. Grayscale for hashing."""
    from lib.imageio import check_image_size

    try:
        with Image.open(path) as im:
            check_image_size(im, path)  # declared size first: a 90-kB PNG can declare 10^10 pixels
            if im.format == "JPEG":  # decode at 1/2..1/8 scale: 2x faster, hashes look at 64 px anyway
                im.draft("L", (256, 256))
            im.load()
            if im.mode in ("I", "I;16", "F"):  # 16-bit/float: scale to 8 bit before hashing
                arr = np.asarray(im, dtype=np.float32)
                return Image.fromarray(_to_uint8(arr))
            return im.convert("L")
    except UnidentifiedImageError:
        pass  # maybe DICOM, tried below
    except Image.DecompressionBombError as exc:
        raise DataError(path, f"image declares too many pixels to decode ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # truncated JPEG/PNG raise OSError
        raise DataError(path, f"unreadable image ({type(exc).__name__}: {exc})") from exc
    try:
        import pydicom

        arr = pydicom.dcmread(path).pixel_array.astype(np.float32)
    except Exception as exc:  # pydicom raises many types for non-DICOM or broken files
        raise DataError(path, f"not a readable image or DICOM ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        arr = arr[len(arr) // 2]  # multi-frame: middle frame
    if arr.ndim == 3:
        arr = arr[..., :3].mean(-1)
    return Image.fromarray(_to_uint8(arr))


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(arr)), float(np.max(arr))
    return np.clip((arr - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)


def hash_images(paths: Sequence[str | Path], hash_size: int = HASH_SIZE,
                skipped: SkippedCases | None = None) -> pd.DataFrame:
    """Per image: SHA-1 of the bytes, perceptual hash (phash) and difference hash (dhash) as hex.

    Unreadable images keep their byte hash (copies still group) with empty perceptual hashes, and are
    recorded in ``skipped``. A missing file raises ``DataError``.
    """
    rows = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(p, "image not found")
        row = {"path": str(p), "sha1": hashlib.sha1(p.read_bytes()).hexdigest(), "phash": None, "dhash": None}
        try:
            gray = _read_gray(p)
            if min(gray.size) < 8:
                raise DataError(p, f"image too small to hash ({gray.size[0]}x{gray.size[1]})")
            row["phash"] = str(imagehash.phash(gray, hash_size=hash_size))
            row["dhash"] = str(imagehash.dhash(gray, hash_size=hash_size))
        except DataError as exc:
            if skipped is None:
                raise
            skipped.add(p.name, exc, stage="hash")
        rows.append(row)
    return pd.DataFrame(rows, columns=["path", "sha1", "phash", "dhash"])


def _bits(hex_hashes: Sequence[str]) -> np.ndarray:
    return np.stack([imagehash.hex_to_hash(h).hash.ravel() for h in hex_hashes]).astype(np.float32)


def _hamming_pairs(bits: np.ndarray, max_distance: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with i < j and Hamming distance <= max_distance, in row chunks so memory stays O(chunk * n)."""
    inv = 1.0 - bits
    out_i, out_j = [], []
    for start in range(0, len(bits), chunk):
        block = bits[start:start + chunk]
        dist = block @ inv.T + (1.0 - block) @ bits.T
        i, j = np.nonzero(dist <= max_distance + 0.5)
        i = i + start
        keep = i < j
        out_i.append(i[keep])
        out_j.append(j[keep])
    return np.concatenate(out_i), np.concatenate(out_j)


def duplicate_pairs(hashes: pd.DataFrame, threshold: int = THRESHOLD) -> pd.DataFrame:
    """Pairs of rows whose phash AND dhash differ in at most ``threshold`` bits, plus exact-byte copies.

    Columns ``i, j`` (row positions), ``phash_dist``, ``dhash_dist`` (-1 when not hashable), ``exact``.
    """
    ok = hashes["phash"].notna().to_numpy()
    pos = np.flatnonzero(ok)
    pairs = []
    if len(pos) > 1:
        pb, db = _bits(hashes["phash"].to_numpy()[ok]), _bits(hashes["dhash"].to_numpy()[ok])
        i, j = _hamming_pairs(pb, threshold)
        d_p = np.abs(pb[i] - pb[j]).sum(1)
        d_d = np.abs(db[i] - db[j]).sum(1)
        near = d_d <= threshold
        pairs.append(pd.DataFrame({"i": pos[i[near]], "j": pos[j[near]], "phash_dist": d_p[near].astype(int),
                                   "dhash_dist": d_d[near].astype(int)}))
    sha = hashes["sha1"].to_numpy()
    first = pd.Series(np.arange(len(sha))).groupby(sha).transform("min").to_numpy()
    copy = first != np.arange(len(sha))
    pairs.append(pd.DataFrame({"i": first[copy], "j": np.flatnonzero(copy), "phash_dist": -1, "dhash_dist": -1}))
    out = pd.concat(pairs, ignore_index=True)
    out["exact"] = sha[out["i"]] == sha[out["j"]]
    out = out.sort_values(["i", "j", "phash_dist"], ascending=[True, True, False])
    return out.drop_duplicates(["i", "j"]).reset_index(drop=True)


def near_duplicate_groups(paths: Sequence[str | Path] | pd.Series, threshold: int = THRESHOLD,
                          hash_size: int = HASH_SIZE, skipped: SkippedCases | None = None,
                          hashes: pd.DataFrame | None = None) -> pd.Series:
    """Group id per image: exact-byte copies and perceptual near-duplicates share a group.

    Two images are near-duplicates when BOTH their phash and dhash (``hash_size``² bits each) differ in
    at most ``threshold`` bits; requiring two independent hashes to agree keeps look-alike chest films
    of different patients apart. Groups are connected components of that pair graph (A~B, B~C -> one
    group). Default 48 of 256 bits, measured on the shared sets (max of the two distances): CXR true
    copies <= 24, distinct films >= 58; brain resized/annotated copies of one slice 26-46 (two at 52
    and 56 are missed), the nearest distinct images (adjacent slices of one patient) 58. Returned
    Series keeps ``paths``' index (so ``df["group"] = near_duplicate_groups(df.path)`` aligns).
    An unreadable image raises ``DataError`` unless ``skipped`` is given: then it is recorded there and
    grouped by its byte hash only.
    """
    index = paths.index if isinstance(paths, pd.Series) else pd.RangeIndex(len(paths))
    paths = list(paths)
    if not paths:
        raise ValueError("near_duplicate_groups: no images given")
    hashes = hash_images(paths, hash_size, skipped) if hashes is None else hashes
    pairs = duplicate_pairs(hashes, threshold)
    n = len(paths)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs["i"], pairs["j"])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return pd.Series(pd.factorize(labels)[0], index=index, name="dup_group")


def exact_duplicate_groups(hashes: pd.DataFrame) -> pd.Series:
    """Group id per row from the byte hash alone (the md5/sha groups the data's SOURCE files count)."""
    return pd.Series(pd.factorize(hashes["sha1"])[0], index=hashes.index, name="exact_group")


# ----------------------------------------------------------------------------- 2D image folders


def scan_images(root: str | Path) -> pd.DataFrame:
    """``path, label, split`` for ``root/[split/]<class>/<image>`` (class = parent folder name)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "image folder not found")
    rows = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and len(rel.parts) >= 2 \
                and not any(part.startswith(".") for part in rel.parts):
            rows.append({"path": str(p), "label": rel.parts[-2],
                         "split": "/".join(rel.parts[:-2])})
    if not rows:
        raise DataError(root, "no images found (expected <root>/[<split>/]<class>/<image>)")
    return pd.DataFrame(rows, columns=["path", "label", "split"])


def image_folder_table(root: str | Path, threshold: int = THRESHOLD, hash_size: int = HASH_SIZE,
                       skipped: SkippedCases | None = None) -> pd.DataFrame:
    """Image table for a class-per-folder 2D set, grouped by duplicate: ``path, label, split, sha1,
    exact_group, group`` (``group`` = exact copies and near-duplicates, what folds must respect).

    Unreadable images are dropped and listed in ``skipped`` (their byte copies too are dropped).
    """
    skipped = SkippedCases() if skipped is None else skipped
    table = scan_images(root)
    n_before = len(skipped)
    hashes = hash_images(table["path"], hash_size, skipped)
    table["sha1"] = hashes["sha1"]
    table["exact_group"] = exact_duplicate_groups(hashes)
    table["group"] = near_duplicate_groups(table["path"], threshold, hash_size, hashes=hashes)
    bad = hashes["phash"].isna().to_numpy()
    if bad.any():
        table = table[~bad]
    if table.empty:
        raise DataError(root, f"no readable images ({len(skipped) - n_before} unreadable)")
    return table.reset_index(drop=True)


def duplicate_report(table: pd.DataFrame, group_col: str = "group") -> pd.DataFrame:
    """One row per group with >1 image: size, classes, splits and file names (for review and the README)."""
    dup = table[table.groupby(group_col)[group_col].transform("size") > 1]
    cols = {"n": ("path", "size"), "labels": ("label", lambda s: sorted(set(s))),
            "files": ("path", lambda s: [Path(p).name for p in s])}
    if "split" in table.columns:
        cols["splits"] = ("split", lambda s: sorted(set(s)))
    return dup.groupby(group_col).agg(**cols).reset_index()
