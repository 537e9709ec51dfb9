"""Grouped, stratified folds; leakage checks; duplicate detection on the real 2D sets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lib import splits
from lib.io import DataError, SkippedCases
from tests.conftest import shared


def _table(n_groups: int = 60, seed: int = 0) -> pd.DataFrame:
    """Patients with 1-4 studies each; label per patient, ~1/3 positive."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        label = int(rng.random() < 0.35)
        rows += [{"patient": f"p{g:03d}", "label": label, "other": int(rng.random() < 0.5)}
                 for _ in range(rng.integers(1, 5))]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- group_kfold


def test_group_kfold_keeps_groups_together_and_balances_labels() -> None:
    df = _table()
    folds = splits.group_kfold(df, 5, "patient", "label", seed=1)
    assert folds.index.equals(df.index) and set(folds) == set(range(5))
    assert (df.assign(f=folds).groupby("patient")["f"].nunique() == 1).all()
    splits.check_leakage(folds, df["patient"])  # does not raise
    overall = df["label"].mean()
    per_fold = df.assign(f=folds).groupby("f")["label"].mean()
    assert (per_fold - overall).abs().max() < 0.15, per_fold
    table = splits.fold_table(df, folds, "label", "patient")
    assert table["rows"].sum() == len(df) and table["groups"].sum() == df["patient"].nunique()


def test_group_kfold_is_deterministic_and_seed_dependent() -> None:
    df = _table()
    a = splits.group_kfold(df, 5, "patient", "label", seed=7)
    b = splits.group_kfold(df, 5, "patient", "label", seed=7)
    c = splits.group_kfold(df, 5, "patient", "label", seed=8)
    assert a.equals(b)
    assert not a.equals(c)


def test_group_kfold_multilabel_combined_key() -> None:
    df = _table(80)
    folds = splits.group_kfold(df, 3, "patient", ["label", "other"], seed=1, rare="merge")
    splits.check_leakage(folds, df["patient"])
    assert set(folds) == {0, 1, 2}


def test_group_kfold_too_few_groups_names_class_and_counts() -> None:
    df = _table(40).astype({"label": object})
    df.loc[df["patient"].isin(["p000", "p001", "p002"]), "label"] = "rare"
    n_rows = int((df["label"] == "rare").sum())
    with pytest.raises(ValueError, match=rf"class 'rare': 3 groups \({n_rows} rows\)"):
        splits.group_kfold(df, 5, "patient", "label")


def test_group_kfold_bad_inputs() -> None:
    with pytest.raises(ValueError, match="empty dataset"):
        splits.group_kfold(pd.DataFrame(columns=["patient", "label"]), 5, "patient", "label")
    df = _table(30)
    df.loc[df.index[:2], "label"] = np.nan
    with pytest.raises(ValueError, match="missing for 2"):
        splits.group_kfold(df, 3, "patient", "label")
    with pytest.raises(ValueError, match="only 4 groups"):
        splits.group_kfold(_table(4), 5, "patient", "label")


# ----------------------------------------------------------------------------- leakage checks


def test_check_leakage_fires_on_constructed_leak() -> None:
    df = _table()
    folds = splits.group_kfold(df, 5, "patient", "label", seed=1).copy()
    multi = df.index[df["patient"].map(df["patient"].value_counts()) > 1]
    victim = df.loc[multi[0], "patient"]
    folds.loc[multi[0]] = (folds.loc[multi[0]] + 1) % 5
    with pytest.raises(splits.LeakageError, match=f"'{victim}' in folds") as info:
        splits.check_leakage(folds, df[["patient"]])
    assert ("patient", victim) in info.value.crossing


def test_check_split_disjoint() -> None:
    train = pd.DataFrame({"group": [1, 2, 3]})
    splits.check_split_disjoint(train, pd.DataFrame({"group": [4, 5]}), "group")
    with pytest.raises(splits.LeakageError, match="1 group group.* in both train and val: 3"):
        splits.check_split_disjoint(train, pd.DataFrame({"group": [3, 4]}), "group")


def test_combine_groups_connected_components() -> None:
    patient = pd.Series(["a", "a", "b", "c", "d", None])
    dup = pd.Series([0, 1, 1, 2, 3, 3])  # row 1 (patient a) duplicates row 2 (patient b); d ~ row 5
    groups = splits.combine_groups(patient, dup)
    assert groups.tolist() == [0, 0, 0, 1, 2, 2]


# ----------------------------------------------------------------------------- duplicate detection


def _save(arr: np.ndarray, path, fmt: str | None = None) -> None:
    Image.fromarray(arr).save(path, format=fmt)


def test_near_duplicates_synthetic(tmp_path) -> None:
    rng = np.random.default_rng(0)
    base = (rng.random((64, 64)) * 255).astype(np.uint8)
    other = (rng.random((64, 64)) * 255).astype(np.uint8)
    _save(base, tmp_path / "a.png")
    _save(base, tmp_path / "a_copy.jpg", "PNG")  # PNG bytes under a .jpg name
    big = np.asarray(Image.fromarray(base).resize((128, 128)))
    _save(big, tmp_path / "a_resized.jpg", "JPEG")
    _save(other, tmp_path / "b.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths = sorted(tmp_path.iterdir())
    skipped = SkippedCases()
    groups = splits.near_duplicate_groups(pd.Series(map(str, paths)), skipped=skipped)
    by_name = dict(zip([p.name for p in paths], groups, strict=True))
    assert by_name["a.png"] == by_name["a_copy.jpg"] == by_name["a_resized.jpg"]
    assert len({by_name["a.png"], by_name["b.png"], by_name["broken.jpg"]}) == 3
    assert len(skipped) == 1 and "broken.jpg" in skipped.rows[0]["file"]
    with pytest.raises(DataError, match="broken.jpg"):
        splits.hash_images([tmp_path / "broken.jpg"])


@pytest.fixture(scope="module")
def brain() -> pd.DataFrame:
    return splits.image_folder_table(shared("brain-mri-tumor"))


@pytest.fixture(scope="module")
def cxr() -> pd.DataFrame:
    return splits.image_folder_table(shared("cxr-covid-3class", "Covid19-dataset"))


def test_brain_duplicates(brain: pd.DataFrame) -> None:
    assert len(brain) == 253 and set(brain["label"]) == {"yes", "no"}
    assert splits.n_duplicate_groups(brain["exact_group"]) == 22  # the md5 groups of SOURCE.txt
    assert brain["exact_group"].nunique() == 228
    # every exact group sits inside one near-duplicate group, and near-duplicates add resized copies
    assert (brain.groupby("exact_group")["group"].nunique() == 1).all()
    assert splits.n_duplicate_groups(brain["group"]) >= 22
    assert (brain.groupby("group")["label"].nunique() == 1).all()  # no copy across classes
    # the perceptual hash joins a resized copy the byte hash cannot see (checked by eye)
    row = brain.set_index(brain["path"].map(lambda p: p.rsplit("/", 1)[-1]))
    assert row.loc["Y163.JPG", "group"] == row.loc["Y49.JPG", "group"]
    assert row.loc["Y163.JPG", "exact_group"] != row.loc["Y49.JPG", "exact_group"]


def test_cxr_train_val_overlap(cxr: pd.DataFrame) -> None:
    assert len(cxr) == 317 and set(cxr["split"]) == {"train", "val"}
    assert splits.n_duplicate_groups(cxr["exact_group"]) == 10
    train, val = cxr[cxr["split"] == "train"], cxr[cxr["split"] == "val"]
    with pytest.raises(splits.LeakageError) as info:
        splits.check_split_disjoint(train, val, "exact_group")
    assert len(info.value.crossing) == 6  # SOURCE.txt: 6 Covid images in both train and val
    crossing = set(train["group"]) & set(val["group"])
    assert len(crossing) >= 6
    assert set(cxr.loc[cxr["group"].isin(crossing), "label"]) == {"Covid"}
    # a re-encoded copy with other contrast: train/Covid/090.jpeg ~ val/Covid/0112.jpg (not byte-equal)
    a = cxr[cxr["path"].str.endswith("train/Covid/090.jpeg")].iloc[0]
    b = cxr[cxr["path"].str.endswith("val/Covid/0112.jpg")].iloc[0]
    assert a["group"] == b["group"] and a["exact_group"] != b["exact_group"]
    # look-alike films of different patients stay apart: groups are small and never mix classes
    assert cxr["group"].value_counts().max() <= 4 and (cxr.groupby("group")["label"].nunique() == 1).all()


def test_grouped_split_has_no_leak_naive_split_does(brain: pd.DataFrame) -> None:
    from sklearn.model_selection import StratifiedKFold

    naive = np.zeros(len(brain), dtype=int)
    for k, (_, test) in enumerate(StratifiedKFold(5, shuffle=True, random_state=0).split(brain, brain["label"])):
        naive[test] = k
    with pytest.raises(splits.LeakageError):
        splits.check_leakage(pd.Series(naive), brain["group"])
    folds = splits.group_kfold(brain, 5, "group", "label", seed=0)
    splits.check_leakage(folds, brain[["group", "exact_group"]])


def test_crossing_groups_counts_naive_leak_and_grouped_split_has_none() -> None:
    df = _table(n_groups=40, seed=3)
    naive = splits.naive_folds(df["label"], 4, seed=1)
    assert len(naive) == len(df) and set(naive) == {0, 1, 2, 3}
    grouped = splits.group_kfold(df, 4, "patient", "label", seed=1)
    assert splits.crossing_groups(grouped, df["patient"]) == 0
    per_patient = pd.Series(naive.to_numpy()).groupby(df["patient"].to_numpy()).nunique()
    assert splits.crossing_groups(naive, df["patient"]) == int((per_patient > 1).sum()) > 0
