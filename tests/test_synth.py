"""The synthetic cohort: deterministic, in the documented layout, and realistic enough to be useful."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pandas as pd

from lib import synth


def _digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_cohort(tmp_path):
    spec = synth.PROFILES["smoke"]
    small = synth.CohortSpec(**{**spec.__dict__, "n_patients": 3})
    a = synth.generate_cohort(small, tmp_path / "a", workers=1)
    b = synth.generate_cohort(small, tmp_path / "b", workers=2)
    assert _digest(a) == _digest(b), "the number of worker processes must not change a byte"
    c = synth.generate_cohort(synth.CohortSpec(**{**small.__dict__, "seed": small.seed + 1}), tmp_path / "c")
    assert _digest(a)["ct/P0000_S0.nii.gz"] != _digest(c).get("ct/P0000_S0.nii.gz")


def test_layout_and_tables(smoke_cohort):
    studies = pd.read_csv(smoke_cohort / "studies.csv")
    truth = pd.read_csv(smoke_cohort / "ground_truth" / "labels.csv")
    reports = pd.read_csv(smoke_cohort / "reports.csv")
    assert set(truth.columns) >= set(synth.LABEL_COLUMNS + synth.ABNORMAL_COLUMNS)
    assert studies.patient_id.nunique() < len(studies), "some patients need several studies"
    assert sorted(reports.lang.unique()) == ["en", "ja"] and len(reports) == 2 * len(studies)
    assert "liver_cyst" not in reports.columns, "ground truth must stay out of the reports table"
    class_map = json.loads((smoke_cohort / "class_map.json").read_text())
    assert class_map["5"] == "liver" and class_map["1"] == "spleen"  # TotalSegmentator 'total' indices


def test_volumes_are_ct_like_with_matching_masks(smoke_cohort):
    st = pd.read_csv(smoke_cohort / "studies.csv").iloc[0]
    ct = nib.load(smoke_cohort / st.ct_path)
    seg = nib.load(smoke_cohort / st.seg_path)
    les = nib.load(smoke_cohort / st.lesion_path)
    assert ct.shape == seg.shape == les.shape
    assert np.allclose(ct.affine, seg.affine) and ct.header.get_xyzt_units()[0] == "mm"
    hu = np.asarray(ct.dataobj)
    lab = np.asarray(seg.dataobj)
    assert hu.dtype == np.int16 and hu.min() <= -900 and hu.max() >= 300  # air and bone present
    liver_hu = hu[lab == 5].mean()
    assert 0 < liver_hu < 110
    for idx in (1, 2, 3, 4, 5, 7):
        assert (lab == idx).sum() > 0, f"label {idx} missing"


def test_lesions_match_ground_truth(smoke_cohort):
    truth = pd.read_csv(smoke_cohort / "ground_truth" / "labels.csv").set_index("study_id")
    lesions = pd.read_csv(smoke_cohort / "ground_truth" / "lesions.csv")
    for row in lesions.itertuples():
        col = f"{row.organ.split('_')[0]}_{row.finding}"
        assert truth.loc[row.study_id, col] == 1, f"lesion {row} without its finding"
    cysts = truth.index[truth.liver_cyst == 1]
    assert set(cysts) <= set(lesions.loc[(lesions.organ == "liver") & (lesions.finding == "cyst"), "study_id"])


def test_reports_carry_negation_and_uncertainty(tmp_path):
    spec = synth.CohortSpec(**{**synth.PROFILES["smoke"].__dict__, "n_patients": 25})
    studies = synth.draw_patients(spec)
    from lib.synth_text import report_text

    texts = {lang: " ".join(report_text(st, pd.DataFrame(columns=["organ", "finding", "diameter_mm"]), None,
                                        lang, spec) for _, st in studies.iterrows()) for lang in ("en", "ja")}
    assert "No " in texts["en"] and any(w in texts["en"] for w in ("Possible", "cannot be excluded", "Cannot rule"))
    assert any(w in texts["ja"] for w in ("認めない", "指摘できない"))
    assert any(w in texts["ja"] for w in ("疑", "否定できない"))
    assert "IMPRESSION" in texts["en"] and "【所見】" in texts["ja"]


def test_prevalence_is_realistic():
    spec = synth.CohortSpec(n_patients=400)
    df = synth.draw_patients(spec)
    for col, p in synth.PREVALENCE.items():
        assert abs(df[col].mean() - p) < 0.08, col
    assert 0.3 < df.liver_abnormal.mean() < 0.7


def test_reading_errors_contradict_truth_and_are_listed(tmp_path):
    from lib.synth_text import reporting_errors

    spec = synth.CohortSpec(n_patients=300, miss_rate=0.2, overcall_rate=0.02)
    studies = synth.draw_patients(spec)
    errs = [(st.study_id, c, e) for _, st in studies.iterrows() for c, e in reporting_errors(st, spec).items()]
    truth = studies.set_index("study_id")
    assert errs and all(truth.loc[s, c] == (e == "missed") for s, c, e in errs)
    missed = sum(e == "missed" for _, _, e in errs) / truth[synth.LABEL_COLUMNS].to_numpy().sum()
    assert 0.15 < missed < 0.25
    none = synth.CohortSpec(n_patients=50, miss_rate=0.0, overcall_rate=0.0)
    assert not any(reporting_errors(st, none) for _, st in synth.draw_patients(none).iterrows())
