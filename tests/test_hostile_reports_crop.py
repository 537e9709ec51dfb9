"""Hostile input for the report labeller and case discovery: each case names its clear error or its skip record.

Why a table: every entry is one kind of bad input seen in real exports (encodings, invisible characters,
run-on text, stray label values, broken or ambiguous NIfTI files, broken class maps); a new one is a row.
Memory and time of 1 MB reports are measured in a child process under RLIMIT_AS, so a regression fails the
test instead of taking the test run down.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from lib import crop, reports
from lib.io import DataError, SkippedCases

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
SHAPE = (12, 10, 6)
CMAP = {"1": "spleen", "5": "liver"}


# ----------------------------------------------------------------------------- report text


def _labels(text: str, lang: str = "en") -> tuple[pd.Series, pd.DataFrame, list]:
    lab, ev = reports.label_reports_with_evidence([text], "abdominal-ct", lang)
    return lab.iloc[0], ev, lab.attrs["unusable"]


def _offsets_index_raw(text: str, ev: pd.DataFrame) -> None:
    """Evidence offsets index the text as given (not its normalised form)."""
    for r in ev.itertuples():
        assert text[r.start:r.end] == r.phrase and text[r.sentence_start:r.sentence_end] == r.sentence


def case_zero_width_inside_finding() -> None:
    text = "Simple re\u200bnal cy\u200bst. No gall\u200dstone."
    r, ev, bad = _labels(text)
    assert r.kidney_cyst == 1 and r.gallbladder_gallstone == 0 and not bad
    _offsets_index_raw(text, ev)
    assert ev.set_index("label").loc["kidney_cyst", "phrase"] == "Simple re\u200bnal cy\u200bst"


def case_bom_and_word_joiner() -> None:
    text = "\ufeffNo hepatic ste\u2060atosis. The sple\ufeffen is enlarged."
    r, ev, _ = _labels(text)
    assert r.liver_fatty == 0 and r.spleen_splenomegaly == 1
    _offsets_index_raw(text, ev)


def case_full_width_english() -> None:
    text = "ＲＥＮＡＬ\u3000ＣＹＳＴ。ＮＯ ＧＡＬＬＳＴＯＮＥ。"
    r, ev, _ = _labels(text)
    assert r.kidney_cyst == 1 and r.gallbladder_gallstone == 0
    _offsets_index_raw(text, ev)


def case_half_width_katakana_with_voiced_mark() -> None:
    text = "右腎にｻﾝｺﾞ状結石を認める。肝ＳＯＬなし。"  # ｺﾞ is two characters that NFKC joins into ゴ
    r, ev, _ = _labels(text, "ja")
    assert r.kidney_stone == 1 and r.liver_mass == 0
    _offsets_index_raw(text, ev)
    assert "ｻﾝｺﾞ状結石" in set(ev.phrase)


def case_only_zero_width_is_unusable() -> None:
    r, _, bad = _labels("\u200b\u200c\u200d")
    assert r.isna().all() and "empty text" in bad[0]["reason"]


def case_normalisation_expansion_is_refused() -> None:
    text = "\ufdfa" * 60_000  # 60k characters that NFKC turns into 1.08 million
    r, _, bad = _labels(text)
    assert r.isna().all() and "too long after normalisation" in bad[0]["reason"]


def case_unusable_attrs_concatenate() -> None:
    a = reports.label_reports(["No renal stone.", None], "abdominal-ct")
    b = reports.label_reports(["肝嚢胞を認める。", ""], "abdominal-ct", "ja")
    both = pd.concat([a, b], ignore_index=True)  # attrs differ: must not raise
    assert len(both) == 4 and isinstance(a.attrs["unusable"], list)


def _cohort(tmp: Path, raw: bytes) -> Path:
    d = tmp / "cohort"
    d.mkdir(exist_ok=True)
    (d / "reports.csv").write_bytes(raw)
    return d


JA_CSV = "study_id,patient_id,lang,text\nS1,P1,ja,肝嚢胞を認める。腎結石なし。\nS2,P2,ja,脾腫の疑い。\n"


def case_cp932_reports_csv(tmp: Path) -> None:
    lab = reports.label_cohort(_cohort(tmp, JA_CSV.encode("cp932")), "ja", tmp / "run")
    assert lab.loc[0, "liver_cyst"] == 1 and lab.loc[0, "kidney_stone"] == 0
    assert lab.loc[1, "spleen_splenomegaly"] == -1
    assert json.loads((tmp / "run" / "labels.json").read_text())["encoding"] == "cp932"
    (tmp / "u").mkdir()
    utf8 = reports.label_cohort(_cohort(tmp / "u", JA_CSV.encode("utf-8-sig")), "ja", tmp / "run_u")
    pd.testing.assert_frame_equal(lab, utf8)  # same labels whichever encoding the export used


def case_neither_utf8_nor_cp932(tmp: Path) -> None:
    raw = "study_id,text\nS1,Kidney: déjà vu \x81\n".encode("latin-1")
    with pytest.raises(DataError, match=r"reports.csv: neither UTF-8 .*nor Shift-JIS/CP932"):
        reports.label_cohort(_cohort(tmp, raw), "en", tmp / "run")


def case_corrupt_utf8_is_not_read_as_cp932(tmp: Path) -> None:
    raw = "study_id,patient_id,lang,text\nS1,P1,ja,肝嚢胞を認める。\n".encode()
    i = raw.index("。".encode()) + 1
    raw = raw[:i] + b"\xe0" + raw[i + 1:]  # one broken byte in valid UTF-8 Japanese ...
    assert "閧" in raw.decode("cp932")  # ... that CP932 would happily read as mojibake
    with pytest.raises(DataError, match=r"reports.csv: not valid UTF-8 \(\d+ undecodable byte\(s\), first byte 0xe3"):
        reports.label_cohort(_cohort(tmp, raw), "ja", tmp / "run")


def case_auto_language_mixed_cohort(tmp: Path) -> None:
    csv = ("study_id,patient_id,text\nE1,P1,Simple renal cyst.\nJ1,P2,肝嚢胞を認める。\nE2,P3,No gallstone.\n"
           "J2,P4,腎結石なし。\n")
    lab = reports.label_cohort(_cohort(tmp, csv.encode()), "auto", tmp / "run").set_index("study_id")
    assert lab.lang.to_dict() == {"E1": "en", "J1": "ja", "E2": "en", "J2": "ja"}
    assert lab.loc["E1", "kidney_cyst"] == 1 and lab.loc["J1", "liver_cyst"] == 1
    assert lab.loc["E2", "gallbladder_gallstone"] == 0 and lab.loc["J2", "kidney_stone"] == 0


def case_cached_labels_with_bad_value(tmp: Path) -> None:
    cohort = _cohort(tmp, JA_CSV.encode())
    reports.label_cohort(cohort, "ja", tmp / "run")
    path = tmp / "run" / "labels.csv"
    df = pd.read_csv(path, dtype=str)
    df.loc[0, "liver_cyst"] = "2"
    df.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"labels.csv: column 'liver_cyst': 1 value\(s\) not in 1/0/-1/blank.*'2'"):
        reports.label_cohort(cohort, "ja", tmp / "run")


def case_read_labels_text_value(tmp: Path) -> None:
    path = tmp / "labels.csv"
    path.write_text("study_id,liver_cyst,kidney_stone\nS1,1,yes\nS2,-1,\nS3,0,0.5\n")
    with pytest.raises(DataError, match=r"labels.csv: column 'kidney_stone': 2 value\(s\).*\['0.5', 'yes'\]"):
        reports.read_labels(path)


def case_truth_with_value_2(tmp: Path) -> None:
    path = tmp / "truth.csv"
    path.write_text("study_id,liver_cyst\nS1,1\nS2,2\n")
    truth = pd.read_csv(path)
    truth.attrs["source"] = str(path)
    labels = pd.DataFrame({"study_id": ["S1", "S2"], "liver_cyst": [1.0, 0.0]})
    with pytest.raises(DataError, match=r"truth.csv: column 'liver_cyst'.*not in 1/0/blank.*'2'"):
        reports.evaluate_against(truth, labels)


def case_truth_blank() -> None:
    truth = pd.DataFrame({"study_id": ["S1", "S2"], "liver_cyst": [1, None]})
    labels = pd.DataFrame({"study_id": ["S1", "S2"], "liver_cyst": [1.0, 0.0]})
    with pytest.raises(DataError, match=r"truth_df: blank truth values in column\(s\) \['liver_cyst'\]"):
        reports.evaluate_against(truth, labels)


def case_labels_with_fraction() -> None:
    truth = pd.DataFrame({"study_id": ["S1", "S2"], "liver_cyst": [1, 0]})
    labels = pd.DataFrame({"study_id": ["S1", "S2"], "liver_cyst": [0.5, 0.0]})
    with pytest.raises(DataError, match=r"labels_df: column 'liver_cyst'.*\['0.5'\]"):
        reports.evaluate_against(truth, labels)
    with pytest.raises(DataError, match="liver_cyst"):
        reports.label_summary(labels)


REPORT_CASES: dict[str, Callable[..., None]] = {
    name.removeprefix("case_"): fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(REPORT_CASES))
def test_hostile_reports(name: str, tmp_path: Path) -> None:
    fn = REPORT_CASES[name]
    fn(tmp_path) if fn.__code__.co_argcount else fn()


# ----------------------------------------------------------------------------- 1 MB reports in a child process

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    sys.path.insert(0, {root!r})
    from lib import reports
    reports.load_vocabulary("abdominal-ct")
    def status(key):
        return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key)) * 1024
    base_vm, base_rss = status("VmSize"), status("VmRSS")
    resource.setrlimit(resource.RLIMIT_AS, (base_vm + {limit_mb} * 2**20,) * 2)
    unit = {unit!r}
    text = (unit * (999_999 // len(unit) + 1))[:999_999]{tail}
    t0, c0 = time.perf_counter(), time.process_time()
    lab, ev = reports.label_reports_with_evidence([text], "abdominal-ct", {lang!r})
    out = {{"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "evidence": len(ev),
           "unusable": len(lab.attrs["unusable"]), "labelled": int(lab.notna().sum(axis=1)[0]),
           "peak_rss_mb": (status("VmHWM") - base_rss) / 2**20, "peak_vm_mb": (status("VmPeak") - base_vm) / 2**20}}
    print(json.dumps(out))
""")

ONE_MB = {
    # a report exported without sentence ends: one 1 MB sentence full of findings, organs and normal statements
    "en_run_on": ("en", "renal cyst and no gallstone, the liver is unremarkable and possible splenomegaly and "
                        "history of pancreatic mass versus normal pancreas and ", ""),
    "ja_run_on": ("ja", "肝嚢胞を認めるが、腎結石は認めない、脾腫の疑いあり、", ""),
    # a run of periods: the sentence splitter must not retry it from each character
    "dots": ("en", ".", '[:-12] + " renal cyst."'),
}


@pytest.mark.parametrize("name", sorted(ONE_MB))
def test_one_megabyte_report_is_linear(name: str) -> None:
    """A report just under MAX_CHARS labels in seconds within 300 MB above the interpreter's footprint."""
    lang, unit, tail = ONE_MB[name]
    code = CHILD.format(root=str(ROOT), limit_mb=300, unit=unit, tail=tail, lang=lang)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(name, got)
    assert got["unusable"] == 0 and got["labelled"] > 0
    assert got["cpu_s"] < 30 and got["peak_rss_mb"] < 300
    assert got["evidence"] < 1_000_000 // 4  # at most a few rows per mention: linear, not pairs of mentions


# ----------------------------------------------------------------------------- case discovery


def _save(arr: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def _ct() -> np.ndarray:
    """HU noise: compresses poorly, so a file cut in half keeps its header."""
    return np.random.default_rng(0).integers(-1000, 1000, SHAPE).astype(np.int16)


def _seg() -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    m[2:6, 2:6, 1:4] = 5
    m[7:10, 6:9, 2:5] = 1
    return m


def _pairs(tmp: Path) -> Path:
    """A TotalSegmentator --ml style folder: two CTs with their masks and a class map."""
    root = tmp / "pairs"
    _save(_ct(), root / "a_ct.nii.gz")
    _save(_seg(), root / "a_seg.nii.gz")
    other = AFFINE.copy()
    other[0, 3] = 50.0
    _save(_ct(), root / "b_ct.nii.gz", other)
    _save(_seg(), root / "b_seg.nii.gz", other)
    (root / "class_map.json").write_text(json.dumps(CMAP))
    return root


def _tree(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _discover_skips(root: Path, **kw: object) -> tuple[pd.DataFrame, pd.DataFrame]:
    before = _tree(root)
    found = SkippedCases()
    cases = crop.discover_cases(root, skipped=found, **kw)
    assert _tree(root) == before  # discovery never writes into the input folder
    assert cases.attrs["skipped"] == found.rows
    return cases, found.to_frame()


def disc_zero_byte_image(tmp: Path) -> None:
    root = _pairs(tmp)
    (root / "c_ct.nii.gz").write_bytes(b"")
    cases, skips = _discover_skips(root)
    assert sorted(cases.case_id) == ["a_ct", "b_ct"]
    assert skips.case.tolist() == ["c_ct"] and "empty file (0 bytes)" in skips.reason[0]
    assert skips.stage[0] == "discover" and skips.file[0].endswith("c_ct.nii.gz")


def disc_text_file_named_nifti(tmp: Path) -> None:
    root = _pairs(tmp)
    (root / "notes.nii.gz").write_text("exported by hand, not a volume\n")
    cases, skips = _discover_skips(root)
    assert sorted(cases.case_id) == ["a_ct", "b_ct"]
    assert skips.case.tolist() == ["notes"] and "not a readable NIfTI header" in skips.reason[0]


def disc_broken_mask_candidate(tmp: Path) -> None:
    root = _pairs(tmp)
    (root / "z_seg_old.nii.gz").write_bytes(b"")
    cases, skips = _discover_skips(root)
    assert cases.set_index("case_id")["mask"]["a_ct"].endswith("a_seg.nii.gz")
    assert skips.case.tolist() == ["z_seg_old"] and "empty file" in skips.reason[0]


def disc_two_masks_same_grid(tmp: Path) -> None:
    root = _pairs(tmp)
    _save(_seg(), root / "a_seg_v2.nii.gz")
    cases, skips = _discover_skips(root)
    assert cases.case_id.tolist() == ["b_ct"]
    row = skips.set_index("case").loc["a_ct"]
    assert "ambiguous mask" in row.reason and "a_seg.nii.gz" in row.reason and "a_seg_v2.nii.gz" in row.reason


def disc_truncated_ct_copy_named_as_mask(tmp: Path) -> None:
    root = _pairs(tmp)
    full = gzip.compress(nib.Nifti1Image(_ct(), AFFINE).to_bytes())
    (root / "a_ct_segcopy.nii.gz").write_bytes(full[:-64])  # header intact, data cut
    cases, skips = _discover_skips(root)
    assert cases.case_id.tolist() == ["b_ct"]
    reason = skips.set_index("case").loc["a_ct", "reason"]
    assert "ambiguous mask" in reason and "a_ct_segcopy.nii.gz" in reason and "a_seg.nii.gz" in reason


def disc_truncated_copy_as_only_candidate(tmp: Path) -> None:
    root = _pairs(tmp)
    (root / "a_seg.nii.gz").unlink()
    full = gzip.compress(nib.Nifti1Image(_ct(), AFFINE).to_bytes())
    (root / "a_seg.nii.gz").write_bytes(full[:-64])  # signed data must be read to tell: it is cut short
    cases, skips = _discover_skips(root)
    assert cases.case_id.tolist() == ["b_ct"]
    row = skips.set_index("case").loc["a_ct"]
    assert "truncated" in row.reason and row.file.endswith("a_seg.nii.gz")


def disc_hu_copy_as_only_candidate(tmp: Path) -> None:
    root = _pairs(tmp)
    (root / "a_seg.nii.gz").unlink()
    _save(_ct().astype(np.float32), root / "a_mask.nii.gz")  # an image where the mask should be
    cases, skips = _discover_skips(root)
    assert cases.case_id.tolist() == ["b_ct"]
    row = skips.set_index("case").loc["a_ct"]
    assert "a_mask.nii.gz" in row.reason and "negative values" in row.reason and row.file.endswith("a_ct.nii.gz")


def disc_int16_hu_copy_as_only_candidate(tmp: Path) -> None:
    root = _pairs(tmp)
    (root / "a_seg.nii.gz").unlink()
    _save(_ct(), root / "a_label.nii.gz")
    _, skips = _discover_skips(root)
    assert "not an integer label map" in skips.set_index("case").loc["a_ct", "reason"]


def disc_non_integer_float_candidate(tmp: Path) -> None:
    root = _pairs(tmp)
    (root / "a_seg.nii.gz").unlink()
    _save(_seg().astype(np.float32) / 3, root / "a_seg_prob.nii.gz")  # probabilities, not labels
    _, skips = _discover_skips(root)
    assert "non-integer values" in skips.set_index("case").loc["a_ct", "reason"]


def disc_float_mask_with_integer_values_is_paired(tmp: Path) -> None:
    root = _pairs(tmp)
    (root / "a_seg.nii.gz").unlink()
    _save(_seg().astype(np.float32), root / "a_seg.nii.gz")
    cases, skips = _discover_skips(root)
    assert skips.empty and cases.set_index("case_id")["mask"]["a_ct"].endswith("a_seg.nii.gz")


def disc_class_map_not_json(tmp: Path) -> None:
    root = _pairs(tmp)
    (root / "class_map.json").write_text('{"1": "spleen",\n "5": liver}')
    with pytest.raises(DataError, match=r"class_map.json: class map is not valid JSON \(.* at line 2, column 7\)"):
        crop.discover_cases(root)


def disc_class_map_is_a_list(tmp: Path) -> None:
    root = _pairs(tmp)
    (root / "class_map.json").write_text('["spleen", "liver"]')
    with pytest.raises(DataError, match=r"class_map.json: expected a JSON object mapping labels to names, got list"):
        crop.discover_cases(root)


def disc_class_map_not_utf8(tmp: Path) -> None:
    root = _pairs(tmp)
    (root / "class_map.json").write_bytes(b'{"1": "\xff\xfe"}')
    with pytest.raises(DataError, match=r"class_map.json: unreadable class map \(UnicodeDecodeError"):
        crop.discover_cases(root)


def disc_class_map_bad_entries(tmp: Path) -> None:
    root = _pairs(tmp)
    (root / "class_map.json").write_text(json.dumps({"1": "liver", "2": None, "5": "liver"}))
    with pytest.raises(DataError, match=r"class_map.json: unreadable class map entries: '2': None.*"
                                        r"name 'liver' used for labels 1 and 5"):
        crop.discover_cases(root)


def disc_class_map_without_task(tmp: Path) -> None:
    root = _pairs(tmp)
    (root / "class_map.json").write_text(json.dumps({"total_mr": {"1": "spleen"}, "other": {"2": "x"}}))
    with pytest.raises(DataError, match=r"class_map.json: no labels for task 'total' \(tasks: other, total_mr\)"):
        crop.discover_cases(root)


def _nnunet(tmp: Path) -> Path:
    nn = tmp / "Dataset001"
    _save(_ct(), nn / "imagesTr" / "c_001_0000.nii.gz")
    _save(_seg(), nn / "labelsTr" / "c_001.nii.gz")
    (nn / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "spleen": 1, "liver": 5}}))
    return nn


def disc_nnunet_broken_dataset_json(tmp: Path) -> None:
    nn = _nnunet(tmp)
    (nn / "dataset.json").write_text('{"labels": {"liver": 1,}}')
    with pytest.raises(DataError, match=r"dataset.json: class map is not valid JSON"):
        crop.discover_cases(nn)


def disc_nnunet_zero_byte_image(tmp: Path) -> None:
    nn = _nnunet(tmp)
    (nn / "imagesTr" / "c_002_0000.nii.gz").write_bytes(b"")
    cases, skips = _discover_skips(nn)
    assert cases.case_id.tolist() == ["c_001"] and skips.case.tolist() == ["c_002"]


def disc_totalseg_zero_byte_ct(tmp: Path) -> None:
    root = tmp / "ts"
    _save(_ct(), root / "s01" / "ct.nii.gz")
    _save((_seg() == 5).astype(np.uint8), root / "s01" / "segmentations" / "liver.nii.gz")
    (root / "s02" / "segmentations").mkdir(parents=True)
    (root / "s02" / "ct.nii.gz").write_bytes(b"")
    cases, skips = _discover_skips(root)
    assert cases.case_id.tolist() == ["s01"] and skips.case.tolist() == ["s02"]


def disc_synthetic_broken_studies_csv(tmp: Path) -> None:
    root = tmp / "syn"
    root.mkdir()
    (root / "studies.csv").write_text("study_id,patient_id\nS1,P1\n")
    with pytest.raises(DataError, match=r"studies.csv: missing column\(s\) \['ct_path', 'seg_path'\]"):
        crop.discover_cases(root)


def disc_crop_batch_reports_discovery_skips(tmp: Path) -> None:
    root = _pairs(tmp)
    (root / "c_ct.nii.gz").write_bytes(b"")
    _save(_seg(), root / "b_seg_v2.nii.gz", nib.load(str(root / "b_seg.nii.gz")).affine)
    before = _tree(root)
    cases = crop.discover_cases(root)
    index, skipped = crop.crop_cohort(cases, ["liver"], tmp / "crops", progress=False)
    assert index.case_id.tolist() == ["a_ct"]
    assert set(skipped.case) == {"b_ct", "c_ct"} and set(skipped.stage) == {"discover"}
    on_disk = pd.read_csv(tmp / "crops" / "bbox" / "skipped.csv")
    assert set(on_disk.case) == {"b_ct", "c_ct"}
    assert _tree(root) == before  # crop batches never write into their inputs


def disc_case_tables_concatenate(tmp: Path) -> None:
    root = _pairs(tmp)
    clean = crop.discover_cases(root)
    (root / "c_ct.nii.gz").write_bytes(b"")
    dirty = crop.discover_cases(root)
    assert len(pd.concat([clean, dirty], ignore_index=True)) == 4  # differing attrs must not raise


DISCOVERY_CASES: dict[str, Callable[[Path], None]] = {
    name.removeprefix("disc_"): fn for name, fn in dict(globals()).items() if name.startswith("disc_")}


@pytest.mark.parametrize("name", sorted(DISCOVERY_CASES))
def test_hostile_case_discovery(name: str, tmp_path: Path) -> None:
    DISCOVERY_CASES[name](tmp_path)


def test_table_size() -> None:
    assert len(REPORT_CASES) + len(ONE_MB) + len(DISCOVERY_CASES) >= 25
