"""Own data end to end: a small cohort laid out the way a user has it -- CT as DICOM series folders,
TotalSegmentator's per-structure masks, a Japanese reports CSV with its own column names -- through
``mednb run --profile smoke --config study.yaml`` (EDA, report labels, crops, training, k-fold,
explanations, export and serving; segmentation skipped with its reason)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from lib import cli, config, crop, reports, synth

#: Patients of the synthetic smoke cohort turned into the own-data cohort (about 20 studies).
N_PATIENTS = 14
STRUCTURES = ["liver", "spleen", "kidney_left"]
COLUMNS = {"study_id": "検査ID", "patient_id": "患者ID", "text": "所見"}


def write_dicom_series(volume: nib.Nifti1Image, folder: Path, patient: str) -> None:
    """One CT slice file per z, geometry from the NIfTI affine (a scanner's DICOM export of the same volume).

    The NIfTI affine is RAS; DICOM positions are LPS: rows run along -x, columns along -y, slices along +z.
    """
    aff = volume.affine
    hu = np.asanyarray(volume.dataobj).astype(np.int16)
    sx, sy, sz = (float(np.linalg.norm(aff[:3, i])) for i in range(3))
    assert np.allclose(aff[:3, :3], np.diag([sx, sy, sz])), "writer expects an axis-aligned RAS affine"
    folder.mkdir(parents=True)
    series, study = generate_uid(), generate_uid()
    for k in range(hu.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", patient, study, series
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
        x, y, z = aff[:3, 3] + aff[:3, 2] * k
        ds.ImagePositionPatient = [f"{-x:.6f}", f"{-y:.6f}", f"{z:.6f}"]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]
        ds.SliceThickness = f"{sz:.6f}"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu[:, :, k].T.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"IM{k + 1:04d}.dcm", enforce_file_format=True)


def own_cohort(root: Path) -> tuple[Path, Path]:
    """``root/ct/<study>/ct/*.dcm`` + ``root/ct/<study>/segmentations/<structure>.nii.gz`` and
    ``root/reports/読影レポート.csv`` (Shift-JIS, columns 検査ID / 患者ID / 検査日 / 所見), from the smoke cohort."""
    src = synth.ensure_cohort("smoke", config.DEFAULT_SEED)
    studies = pd.read_csv(src / "studies.csv")
    studies = studies[studies.patient_id.isin(sorted(studies.patient_id.unique())[:N_PATIENTS])]
    cmap = {v: int(k) for k, v in json.loads((src / "class_map.json").read_text()).items()}
    for st in studies.itertuples():
        case = root / "ct" / st.study_id
        ct = nib.load(src / st.ct_path)
        write_dicom_series(ct, case / "ct", st.patient_id)
        labels = np.asanyarray(nib.load(src / st.seg_path).dataobj)
        (case / "segmentations").mkdir()
        for s in STRUCTURES:
            nib.save(nib.Nifti1Image((labels == cmap[s]).astype(np.uint8), ct.affine),
                     case / "segmentations" / f"{s}.nii.gz")
    texts = pd.read_csv(src / "reports.csv")
    texts = texts[(texts.lang == "ja") & texts.study_id.isin(studies.study_id)]
    table = pd.DataFrame({"検査ID": texts.study_id, "患者ID": texts.patient_id, "検査日": texts.study_date,
                          "所見": texts.text})
    csv = root / "reports" / "読影レポート.csv"
    csv.parent.mkdir()
    csv.write_bytes(table.to_csv(index=False).encode("cp932"))
    return root / "ct", csv


def test_dicom_series_and_per_structure_masks_are_discovered_and_cropped(tmp_path: Path) -> None:
    ct, _ = own_cohort(tmp_path)
    cases, _ = crop.open_cases(ct)
    assert len(cases) > 10 and (cases["mask_kind"] == "folder").all()
    assert all(Path(p).is_dir() for p in cases["image"])
    assert crop.is_volume_cohort(ct) and not crop.is_volume_cohort(tmp_path / "reports")
    first = cases.iloc[0]
    src = synth.ensure_cohort("smoke", config.DEFAULT_SEED)
    read = crop.load_3d(first["image"])
    orig = nib.load(src / "ct" / f"{first['case_id']}.nii.gz")
    assert np.allclose(read.affine, orig.affine, atol=1e-3)
    assert np.array_equal(np.asanyarray(read.dataobj), np.asanyarray(orig.dataobj))  # HU after slope/intercept
    index, skipped = crop.crop_cohort(cases.head(3), STRUCTURES, tmp_path / "crops", mode="bbox", workers=1,
                                      progress=False)
    assert skipped.empty, skipped
    assert len(index) == 3 * len(STRUCTURES)


def test_reports_csv_with_its_own_column_names(tmp_path: Path) -> None:
    _, csv = own_cohort(tmp_path)
    labels = reports.label_cohort(tmp_path, "ja", tmp_path / "run", reports_csv=csv, columns=COLUMNS)
    assert labels["study_id"].str.match(r"P\d{4}_S\d").all() and labels["patient_id"].str.match(r"P\d{4}").all()
    assert labels["liver_fatty"].isin([0, 1, -1]).any()
    with pytest.raises(Exception, match=r"missing column\(s\) \['study_id', 'text'\].*report_columns"):
        reports.label_cohort(tmp_path, "ja", tmp_path / "run2", reports_csv=csv)
    with pytest.raises(Exception, match=r"mapped column\(s\) not found: text -> 'findings'"):
        reports.read_reports_csv(csv, {"study_id": "検査ID", "text": "findings"})
    with pytest.raises(ValueError, match=r"report columns \['finding'\] are not report fields"):
        reports.read_reports_csv(csv, {"finding": "所見"})


@pytest.mark.slow
def test_own_cohort_through_the_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ct, csv = own_cohort(tmp_path / "study")
    study = {
        "dataset": str(ct), "reports_csv": str(csv), "report_columns": COLUMNS, "structures": STRUCTURES,
        "02": {"modes": ["bbox"], "verify_cases": 2, "n_gallery": 1, "dicom_dir": ""},
        "03": {"epochs": 3},
        # 20 studies of 14 patients, 3 of them without the finding: no held-out part, and the floors of the
        # synthetic smoke run do not apply (this test checks that every stage runs on the layout)
        "04": {"epochs": 3, "n_splits": 2, "test_fraction": 0.0, "min_oof_auc": 0.0},
        "05": {"n_cases": 2, "methods": ["occlusion"]},
        "07": {"latency_runs": 2, "n_parity": 2},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, allow_unicode=True), encoding="utf-8")
    monkeypatch.setattr(config, "RUNS", tmp_path / "runs")
    code = cli.main(["run", "--profile", "smoke", "--config", str(path), "--run-id", "own"])
    run_dir = tmp_path / "runs" / "own"
    info = json.loads((run_dir / "run.json").read_text())
    status = {s["notebook"][:2]: s["status"] for s in info["stages"]}
    assert code == 0, (status, [(s["notebook"], s.get("error")) for s in info["stages"] if s["status"] == "failed"])
    assert status == {"00": "ok", "01": "ok", "02": "ok", "03": "ok", "04": "ok", "05": "ok", "06": "skipped",
                      "07": "ok"}, status
    labels = pd.read_csv(run_dir / "labels.csv")
    index = pd.read_csv(run_dir / "crops" / "index.csv")
    assert set(index["case_id"]) <= set(labels["study_id"]) and len(index) >= 10
    kfold = json.loads(next((run_dir / "kfold").glob("*/metrics.json")).read_text())
    assert math.isfinite(kfold["pooled"]["auc"]), kfold["pooled"]
    explain = json.loads(next((run_dir / "explain").glob("*/metrics.json")).read_text())
    assert explain, "no explanation metrics"
    export = next((run_dir / "export").glob("*"))
    assert {"model.onnx", "metadata.json", "labels.json"} <= {p.name for p in export.iterdir()}
    served = json.loads((export / "metrics.json").read_text())
    assert all(math.isfinite(p) for p in served["sample_prediction"].values())
    assert served["parity_max_abs_diff"] <= 1e-4
