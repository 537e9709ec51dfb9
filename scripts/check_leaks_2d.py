"""Duplicate groups in the shared 2D sets, and proof that a naive split leaks while the grouped one does not.

Usage: ``.venv/bin/python scripts/check_leaks_2d.py [--threshold 48] [--folds 5] [--seed N] [--show]``
(``--show`` lists every duplicate group). Exit code 1 if the grouped split leaks (it must not).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import config, datasets, splits  # noqa: E402
from lib.io import DataError, SkippedCases  # noqa: E402


def check(name: str, threshold: int, n_splits: int, seed: int, show: bool) -> bool:
    try:
        _, root = datasets.locate(name)
    except DataError as exc:
        print(f"{name}: {exc} (skipped)")
        return True
    skipped = SkippedCases()
    table = splits.image_folder_table(root, threshold=threshold, skipped=skipped)
    n_exact = splits.n_duplicate_groups(table["exact_group"])
    n_near = splits.n_duplicate_groups(table["group"])
    print(f"\n== {name}: {len(table)} images, {table['label'].value_counts().to_dict()}, {len(skipped)} unreadable")
    print(f"exact-byte duplicate groups: {n_exact} ({table['exact_group'].nunique()} unique files)")
    print(f"near-duplicate groups (phash & dhash within {threshold}/256 bits, incl. exact): {n_near} "
          f"({table['group'].nunique()} independent images)")
    mixed = (table.groupby("group")["label"].nunique() > 1).sum()
    print(f"groups with more than one class: {mixed}")
    if table["split"].nunique() > 1:
        by_split = table.groupby("group")["split"].nunique()
        print(f"groups present in more than one original split folder ({sorted(table['split'].unique())}): "
              f"exact {int((table.groupby('exact_group')['split'].nunique() > 1).sum())}, "
              f"near {int((by_split > 1).sum())}")
    if show:
        print(splits.duplicate_report(table).to_string(index=False, max_colwidth=100))
    naive = splits.naive_folds(table["label"], n_splits, seed)
    grouped = splits.group_kfold(table, n_splits, "group", "label", seed)
    n_naive, n_grouped = splits.crossing_groups(naive, table["group"]), splits.crossing_groups(grouped, table["group"])
    print(f"naive StratifiedKFold({n_splits}): {n_naive} duplicate groups cross folds "
          f"({splits.crossing_groups(naive, table['exact_group'])} exact) -> LEAKS")
    print(f"grouped StratifiedGroupKFold({n_splits}): {n_grouped} groups cross folds -> "
          f"{'no leak' if n_grouped == 0 else 'LEAKS'}")
    print(splits.fold_table(table, grouped, "label", "group").to_string())
    return n_grouped == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threshold", type=int, default=splits.THRESHOLD)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    ap.add_argument("--show", action="store_true", help="list every duplicate group")
    args = ap.parse_args(argv)
    sets = [n for n in datasets.names() if datasets.get(n).kind == "2d" and datasets.get(n).group_col == "group"]
    ok = all([check(name, args.threshold, args.folds, args.seed, args.show) for name in sets])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
