"""Explanations of a 2D image set: cases from class folders, no lesion masks, deletion scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lib import explain, kfold
from tests.test_serve import _sample_png, build_export


def test_image_cases_score_deletion_without_masks(tmp_path: Path) -> None:
    build_export(tmp_path / "run")
    images = tmp_path / "images"
    for label in ("no", "yes"):
        (images / label).mkdir(parents=True)
        for i in range(3):
            _sample_png(images / label / f"{label}{i}.png")
    (images / "yes" / "broken.png").write_bytes(b"not a png")
    paths = kfold.fold_checkpoints(tmp_path / "run" / "kfold" / "m")
    models, meta = explain.load_ensemble(paths)
    explainers = [explain.Explainer(m, meta["task"], explain.class_index(meta)) for m in models]
    cases = explain.score_cases(explain.image_cases(images, meta, explainers[0].class_idx), explainers)
    assert len(cases.table) == 6 and cases.lesions == [None] * 6  # the unreadable file is left out
    assert cases.table["truth"].tolist() == [0, 0, 0, 1, 1, 1] and cases.x.shape == (6, 1, 48, 48)
    assert np.allclose(cases.table["prob"], explain.ensemble_prob(explainers)(cases.x))
    table, _ = explain.explain_batch(explainers, cases.x[:2], cases.lesions[:2], cases.table["sample_id"][:2].tolist(),
                                     methods=["gradcam"], n_steps=4, per_fold=False)
    assert table["deletion_auc"].between(0, 1).all() and table["pointing"].isna().all()
