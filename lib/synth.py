"""Deterministic synthetic abdominal-CT cohort: volumes, organ masks, lesion masks, reports.

Why: a fresh clone must run every notebook with no download, and explanations need lesion masks
that no public set offers. The cohort is written in the layout a real user brings (NIfTI CT in HU,
a TotalSegmentator-style multilabel mask + class map, reports as CSV) so the notebooks do not know
it is synthetic. Ground truth lives in ``ground_truth/`` which the labelling code never reads.

Layout of ``data/synthetic/<name>/``::

    ct/<study_id>.nii.gz          CT in Hounsfield units (int16), RAS affine, varied spacing
    seg/<study_id>.nii.gz         multilabel organ mask (uint8), labels in class_map.json
    lesions/<study_id>.nii.gz     lesion instance mask (uint8, 0 = none); ids in ground_truth/lesions.csv
    class_map.json                {"1": "spleen", ...} TotalSegmentator 'total' indices
    studies.csv                   study_id, patient_id, study_date, ct/seg/lesion paths, shape, spacing
    reports.csv                   study_id, patient_id, study_date, lang (en|ja), text
    ground_truth/labels.csv       study_id, patient_id, one 0/1 column per organ_finding + organ_abnormal
    ground_truth/lesions.csv      study_id, lesion_id, organ, finding, centre_mm, diameter_mm
    ground_truth/report_errors.csv  study_id, label, error (missed | overcalled): where reports contradict truth
    cohort.json                   generator parameters (seed, profile, sizes) for provenance
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from lib import config, resources
from lib.io import write_json

# Organ -> findings. Column names everywhere are f"{organ}_{finding}"; the report vocabulary uses the
# same keys. "kidney" covers both kidneys (masks kidney_left / kidney_right).
FINDINGS: dict[str, list[str]] = {
    "liver": ["cyst", "mass", "fatty", "hepatomegaly"],
    "spleen": ["splenomegaly", "lesion"],
    "pancreas": ["mass", "duct_dilatation", "cyst"],
    "kidney": ["cyst", "stone"],
    "gallbladder": ["gallstone"],
}
PREVALENCE: dict[str, float] = {
    "liver_cyst": 0.25, "liver_mass": 0.15, "liver_fatty": 0.15, "liver_hepatomegaly": 0.10,
    "spleen_splenomegaly": 0.12, "spleen_lesion": 0.10,
    "pancreas_mass": 0.08, "pancreas_duct_dilatation": 0.10, "pancreas_cyst": 0.08,
    "kidney_cyst": 0.25, "kidney_stone": 0.12, "gallbladder_gallstone": 0.15,
}
LABEL_COLUMNS = [f"{o}_{f}" for o, fs in FINDINGS.items() for f in fs]
ABNORMAL_COLUMNS = [f"{o}_abnormal" for o in FINDINGS]

# TotalSegmentator 'total' task indices for the structures we draw.
CLASS_MAP: dict[int, str] = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder",
                             5: "liver", 7: "pancreas", 52: "aorta"}
ORGAN_STRUCTURES: dict[str, list[str]] = {"liver": ["liver"], "spleen": ["spleen"],
                                          "pancreas": ["pancreas"], "gallbladder": ["gallbladder"],
                                          "kidney": ["kidney_left", "kidney_right"]}


@dataclass(frozen=True)
class CohortSpec:
    """Size and difficulty of a cohort. Profiles below; every field is a knob for users."""

    n_patients: int = 48
    max_studies_per_patient: int = 3
    spacing_xy_mm: tuple[float, float] = (3.2, 4.0)
    spacing_z_mm: tuple[float, float] = (4.0, 6.0)
    fov_mm: float = 360.0
    z_extent_mm: tuple[float, float] = (200.0, 240.0)
    noise_hu: tuple[float, float] = (12.0, 22.0)
    lesion_contrast: float = 1.0  # multiplies lesion-vs-organ HU differences
    lesion_size: float = 1.0  # multiplies lesion diameters
    uncertain_rate: float = 0.12  # positive findings reported with hedging
    false_hedge_rate: float = 0.05  # absent findings reported as "cannot be excluded"
    unmentioned_rate: float = 0.15  # normal organs left out of the report
    miss_rate: float = 0.05  # present findings the report does not mention (reading errors)
    overcall_rate: float = 0.005  # absent findings the report states as present
    seed: int = config.DEFAULT_SEED
    name: str = "demo"
    prevalence: dict[str, float] = field(default_factory=lambda: dict(PREVALENCE))


PROFILES: dict[str, CohortSpec] = {
    # smoke: coarse voxels so every notebook runs in seconds, with one learnable target (liver lesions at 3x contrast
    # and 2.5x size, cysts in ~half the studies) so CI notices a model that stops learning
    "smoke": CohortSpec(n_patients=24, max_studies_per_patient=2, spacing_xy_mm=(7.0, 8.0),
                        spacing_z_mm=(8.0, 10.0), lesion_contrast=3.0, lesion_size=2.5, name="smoke",
                        prevalence={**PREVALENCE, "liver_cyst": 0.45, "liver_fatty": 0.5}),
    # demo: enough studies (~290) for from-scratch CNNs to learn focal lesions; contrast 1.8 puts lesion-to-liver
    # differences at portal-venous-phase levels (the base HU table is closer to unenhanced CT).
    "demo": CohortSpec(n_patients=150, lesion_contrast=1.8, lesion_size=1.6, name="demo"),
    "full": CohortSpec(n_patients=200, spacing_xy_mm=(1.8, 2.4), spacing_z_mm=(2.5, 3.5), name="full"),
}

HU = {"air": -1000, "fat": -100, "muscle": 50, "bone": 450, "aorta": 170, "liver": 62, "spleen": 52,
      "kidney": 150, "pancreas": 45, "gallbladder": 8, "bowel_gas": -850, "bowel_wall": 35}

# Organ geometry in mm in a RAS frame centred on the abdomen: centre (x, y, z) and radii.
# Patient's right is -x, anterior is +y, cranial is +z.
ORGAN_SHAPES = {
    "liver": ((-62.0, 12.0, 45.0), (78.0, 68.0, 62.0)),
    "spleen": ((88.0, -38.0, 55.0), (30.0, 42.0, 48.0)),
    "kidney_right": ((-58.0, -62.0, -20.0), (26.0, 24.0, 52.0)),
    "kidney_left": ((58.0, -60.0, -10.0), (26.0, 24.0, 52.0)),
    "pancreas": ((10.0, -18.0, 8.0), (68.0, 14.0, 16.0)),
    "gallbladder": ((-42.0, 38.0, -5.0), (16.0, 17.0, 32.0)),
}


def cohort_dir(name: str, seed: int) -> Path:
    return config.DATA / "synthetic" / f"{name}-seed{seed}"


def ensure_cohort(profile: str = "smoke", seed: int = config.DEFAULT_SEED,
                  root: Path | None = None, **overrides: object) -> Path:
    """Generate the cohort for ``profile`` unless an identical one is already on disk."""
    if profile not in PROFILES:
        raise ValueError(f"unknown cohort profile {profile!r}; choose from {sorted(PROFILES)}")
    spec = replace(PROFILES[profile], seed=seed, **overrides)
    out = Path(root) if root else cohort_dir(spec.name, seed)
    meta = out / "cohort.json"
    if meta.exists() and json.loads(meta.read_text()).get("spec") == spec_json(spec):
        return out
    return generate_cohort(spec, out)


def spec_json(spec: object) -> dict:
    """A generator spec dataclass as plain JSON values (what ``cohort.json`` stores and cache checks compare)."""
    return json.loads(json.dumps(asdict(spec)))


def _rng(seed: int, *keys: object) -> np.random.Generator:
    """Independent stream per (seed, key): a case's content does not depend on the others."""
    digest = hashlib.sha256(repr((seed,) + keys).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# ----------------------------------------------------------------------------- findings


def draw_patients(spec: CohortSpec) -> pd.DataFrame:
    """Patients, their studies and the findings of each study (persistent across follow-ups)."""
    rows = []
    for p in range(spec.n_patients):
        rng = _rng(spec.seed, "patient", p)
        pid = f"P{p:04d}"
        n_studies = int(rng.integers(1, spec.max_studies_per_patient + 1))
        base = {c: bool(rng.random() < spec.prevalence[c]) for c in LABEL_COLUMNS}
        day0 = np.datetime64("2019-01-01") + int(rng.integers(0, 1500))
        for s in range(n_studies):
            found = dict(base)
            if s > 0:  # follow-up: most findings persist, a few appear or resolve
                for c in LABEL_COLUMNS:
                    if rng.random() < 0.08:
                        found[c] = not found[c]
            date = day0 + s * int(rng.integers(90, 400))
            rows.append({"study_id": f"{pid}_S{s}", "patient_id": pid, "study_index": s,
                         "study_date": str(date), "sex": "MF"[int(rng.integers(0, 2))],
                         "age": int(rng.integers(30, 85)), **{c: int(v) for c, v in found.items()}})
    df = pd.DataFrame(rows)
    for organ, fs in FINDINGS.items():
        df[f"{organ}_abnormal"] = df[[f"{organ}_{f}" for f in fs]].max(axis=1)
    return df


# ----------------------------------------------------------------------------- volumes


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, amp: float) -> np.ndarray:
    noise = rng.standard_normal(shape).astype(np.float32)
    field_ = ndimage.gaussian_filter(noise, sigma)
    return field_ / (field_.std() + 1e-6) * amp


def _ellipsoid(coords: np.ndarray, centre, radii, wobble: np.ndarray | None = None) -> np.ndarray:
    d = sum(((coords[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    if wobble is not None:
        d = d + wobble
    return d <= 1.0


def _sphere(coords: np.ndarray, centre, radius: float) -> np.ndarray:
    return sum((coords[i] - centre[i]) ** 2 for i in range(3)) <= radius**2


def _point_in(mask: np.ndarray, coords: np.ndarray, rng: np.random.Generator, margin_vox: int = 1):
    """A random point (mm) well inside ``mask`` (eroded so lesions sit in the organ)."""
    inner = ndimage.binary_erosion(mask, iterations=margin_vox) if margin_vox else mask
    idx = np.argwhere(inner if inner.any() else mask)
    i, j, k = idx[int(rng.integers(0, len(idx)))]
    return tuple(float(coords[a][i, j, k]) for a in range(3))


def render_study(spec: CohortSpec, study: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                 np.ndarray, list[dict]]:
    """One CT study: (hu int16, organ labels uint8, lesion ids uint8, affine, lesion records)."""
    prng = _rng(spec.seed, "anatomy", study.patient_id)  # anatomy is the patient's
    rng = _rng(spec.seed, "study", study.study_id)  # acquisition and lesion draw are the study's
    sx = float(rng.uniform(*spec.spacing_xy_mm))
    sz = float(rng.uniform(*spec.spacing_z_mm))
    zext = float(rng.uniform(*spec.z_extent_mm))
    nxy, nz = int(round(spec.fov_mm / sx)), int(round(zext / sz))
    size = float(prng.uniform(0.88, 1.12))  # patient habitus
    ax = [(np.arange(nxy) - (nxy - 1) / 2) * sx, (np.arange(nxy) - (nxy - 1) / 2) * sx,
          (np.arange(nz) - (nz - 1) / 2) * sz + float(rng.uniform(-12, 12))]
    coords = np.stack(np.meshgrid(*ax, indexing="ij")).astype(np.float32)
    shape = coords.shape[1:]
    # smooth deformation shared by all structures (anatomy varies, organs stay in place)
    warp_sigma = 30.0 / sx
    for a in range(3):
        coords[a] += _smooth_field(prng if a < 2 else rng, shape, warp_sigma, 6.0)

    hu = np.full(shape, HU["air"], np.float32)
    body = _ellipsoid(coords, (0, 0, 0), (165 * size, 120 * size, 1e6))
    muscle = _ellipsoid(coords, (0, -5, 0), (150 * size, 105 * size, 1e6))
    cavity = _ellipsoid(coords, (0, 2, 0), (138 * size, 92 * size, 1e6))
    hu[body] = HU["fat"]
    hu[muscle] = HU["muscle"]
    hu[cavity] = HU["fat"] + 30  # mesenteric fat with some stranding
    spine = (coords[0] ** 2 + (coords[1] + 78) ** 2) <= 22**2
    canal = (coords[0] ** 2 + (coords[1] + 100) ** 2) <= 8**2
    hu[spine] = HU["bone"]
    hu[canal] = 20
    aorta = ((coords[0] - 18) ** 2 + (coords[1] + 48) ** 2) <= 11**2
    hu[aorta] = HU["aorta"]

    found = {c: bool(study[c]) for c in LABEL_COLUMNS}
    labels = np.zeros(shape, np.uint8)
    organ_hu: dict[str, float] = {}
    index = {v: k for k, v in CLASS_MAP.items()}
    labels[aorta & cavity] = index["aorta"]
    for name, (centre, radii) in ORGAN_SHAPES.items():
        grow = 1.0
        if name == "liver" and found["liver_hepatomegaly"]:
            grow = float(rng.uniform(1.22, 1.35))
        if name == "spleen" and found["spleen_splenomegaly"]:
            grow = float(rng.uniform(1.4, 1.7))
        c = tuple(v * size for v in centre)
        r = tuple(v * size * grow * float(prng.uniform(0.92, 1.08)) for v in radii)
        if grow > 1:  # enlarged organs grow away from the midline and downwards
            c = (c[0] * (1 + 0.25 * (grow - 1)), c[1], c[2] - 0.4 * (r[2] - radii[2] * size))
        wobble = _smooth_field(prng, shape, 12.0 / sx, 0.12)
        m = _ellipsoid(coords, c, r, wobble) & cavity & ~spine & ~aorta
        base = HU["kidney" if name.startswith("kidney") else name]
        if name == "liver" and found["liver_fatty"]:
            base -= float(rng.uniform(28, 50))
        base += float(rng.normal(0, 5))
        organ_hu[name] = base
        hu[m] = base
        labels[m] = index[name]
    # bowel: a few gas pockets and loops in the free cavity, as distractors
    free = cavity & (labels == 0) & ~spine
    for _ in range(int(rng.integers(4, 9))):
        c = _point_in(free, coords, rng, 0)
        loop = _sphere(coords, c, float(rng.uniform(10, 22)))
        hu[loop & free] = HU["bowel_wall"]
        hu[_sphere(coords, c, float(rng.uniform(4, 9))) & free] = HU["bowel_gas"]

    lesion_ids = np.zeros(shape, np.uint8)
    records: list[dict] = []

    def add_lesion(organ_struct: str, finding: str, diameter: float, delta: float,
                   absolute: float | None = None, soft: bool = False) -> None:
        mask = labels == index[organ_struct]
        if not mask.any():
            return
        d = diameter * spec.lesion_size
        c = _point_in(mask, coords, rng, margin_vox=max(1, int(d / 2 / sx)))
        les = _sphere(coords, c, d / 2) & mask
        if not les.any():
            return
        value = absolute if absolute is not None else organ_hu[organ_struct] + delta * spec.lesion_contrast
        if absolute is not None:
            value = organ_hu[organ_struct] + (absolute - organ_hu[organ_struct]) * spec.lesion_contrast
        if soft:  # ill-defined margin: blend towards the organ value at the rim
            dist = np.sqrt(sum((coords[i] - c[i]) ** 2 for i in range(3)))
            w = np.clip(1.3 - dist / (d / 2), 0, 1)
            hu[les] = organ_hu[organ_struct] + (value - organ_hu[organ_struct]) * w[les]
        else:
            hu[les] = value
        lid = len(records) + 1
        lesion_ids[les] = lid
        records.append({"study_id": study.study_id, "lesion_id": lid,
                        "organ": organ_struct, "finding": finding,
                        "centre_mm": [round(v, 1) for v in c], "diameter_mm": round(d, 1),
                        "voxels": int(les.sum())})

    if found["liver_cyst"]:
        for _ in range(int(rng.integers(1, 4))):
            add_lesion("liver", "cyst", float(rng.uniform(9, 24)), 0, absolute=float(rng.uniform(2, 14)))
    if found["liver_mass"]:
        add_lesion("liver", "mass", float(rng.uniform(16, 40)), -float(rng.uniform(22, 40)), soft=True)
    if found["spleen_lesion"]:
        add_lesion("spleen", "lesion", float(rng.uniform(10, 24)), -float(rng.uniform(20, 35)), soft=True)
    if found["pancreas_mass"]:
        add_lesion("pancreas", "mass", float(rng.uniform(14, 26)), -float(rng.uniform(18, 30)), soft=True)
    if found["pancreas_cyst"]:
        add_lesion("pancreas", "cyst", float(rng.uniform(10, 20)), 0, absolute=8.0)
    if found["pancreas_duct_dilatation"]:
        m = labels == index["pancreas"]
        cy, cz = ORGAN_SHAPES["pancreas"][0][1] * size, ORGAN_SHAPES["pancreas"][0][2] * size
        r = float(rng.uniform(2.5, 4.5)) * spec.lesion_size
        duct = (((coords[1] - cy) ** 2 + (coords[2] - cz) ** 2) <= max(r, sx * 0.6) ** 2) & m
        hu[duct] = organ_hu["pancreas"] + (8 - organ_hu["pancreas"]) * spec.lesion_contrast
        lid = len(records) + 1
        lesion_ids[duct] = lid
        records.append({"study_id": study.study_id, "lesion_id": lid, "organ": "pancreas",
                        "finding": "duct_dilatation", "centre_mm": [10.0, cy, cz],
                        "diameter_mm": round(2 * r, 1), "voxels": int(duct.sum())})
    if found["kidney_cyst"]:
        side = ["kidney_left", "kidney_right"][int(rng.integers(0, 2))]
        add_lesion(side, "cyst", float(rng.uniform(10, 28)), 0, absolute=float(rng.uniform(0, 15)))
    if found["kidney_stone"]:
        side = ["kidney_left", "kidney_right"][int(rng.integers(0, 2))]
        add_lesion(side, "stone", float(rng.uniform(4, 9)), 0, absolute=float(rng.uniform(500, 1000)))
    if found["gallbladder_gallstone"]:
        for _ in range(int(rng.integers(1, 3))):
            add_lesion("gallbladder", "gallstone", float(rng.uniform(5, 12)), 0,
                       absolute=float(rng.uniform(250, 700)))

    # acquisition: slight blur (partial volume) and noise
    hu = ndimage.gaussian_filter(hu, sigma=(0.6, 0.6, 0.4))
    hu += rng.normal(0, float(rng.uniform(*spec.noise_hu)), shape).astype(np.float32)
    hu = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    affine = np.diag([sx, sx, sz, 1.0])
    affine[:3, 3] = [-ax[0][-1], -ax[1][-1], float(ax[2][0])]
    return hu, labels, lesion_ids, affine, records


def _save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    # write through an uncompressed buffer + fixed gzip mtime so bytes are identical for a seed; level 1:
    # noise-filled CT barely compresses further at 9 (+3 % size) and 9 costs 5x the time
    import gzip

    raw = img.to_bytes()
    with open(path, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="", compresslevel=1) as gz:
        gz.write(raw)


# ----------------------------------------------------------------------------- reports (text lives in synth_text)


def _write_study(spec: CohortSpec, study: pd.Series, out: Path) -> tuple[dict, list[dict]]:
    """Render one study and write its three NIfTI files; returns its ``studies.csv`` row and lesion records.

    Each study draws from its own random streams (``_rng``), so studies render in any order or process
    and the cohort is byte-identical for a seed whatever the number of workers.
    """
    hu, labels, les, affine, recs = render_study(spec, study)
    paths = {k: f"{k}/{study.study_id}.nii.gz" for k in ("ct", "seg", "lesions")}
    _save_nifti(hu, affine, out / paths["ct"])
    _save_nifti(labels, affine, out / paths["seg"])
    _save_nifti(les, affine, out / paths["lesions"])
    row = {"study_id": study.study_id, "patient_id": study.patient_id, "study_date": study.study_date,
           "sex": study.sex, "age": study.age, "ct_path": paths["ct"], "seg_path": paths["seg"],
           "lesion_path": paths["lesions"], "shape": "x".join(map(str, hu.shape)),
           "spacing_mm": "x".join(f"{v:.3f}" for v in np.abs(np.diag(affine))[:3])}
    return row, recs


def generate_cohort(spec: CohortSpec, out: Path, workers: int | None = None) -> Path:
    """Write the whole cohort to ``out`` (deterministic: same spec, same bytes, any ``workers``).

    Studies render in a process pool of ``workers`` (default: the cores granted, ``lib.resources.workers``).
    """
    from concurrent.futures import ProcessPoolExecutor

    from lib.synth_text import write_reports

    out = Path(out)
    studies = draw_patients(spec)
    (out / "ground_truth").mkdir(parents=True, exist_ok=True)
    records = [st for _, st in studies.iterrows()]
    workers = resources.workers(limit=len(records)) if workers is None else min(workers, len(records))
    if workers <= 1:
        done = [_write_study(spec, st, out) for st in records]
    else:
        # preload the heavy imports, not lib.synth itself: under `python -m lib.synth` each worker re-runs the main
        # module, which must not be imported already
        ctx = resources.pool_context("lib.synth_text", "nibabel", "scipy.ndimage")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            done = list(pool.map(_write_study, [spec] * len(records), records, [out] * len(records),
                                 chunksize=4))
    rows = [row for row, _ in done]
    lesions = [rec for _, recs in done for rec in recs]
    pd.DataFrame(rows).to_csv(out / "studies.csv", index=False)
    gt_cols = ["study_id", "patient_id"] + LABEL_COLUMNS + ABNORMAL_COLUMNS
    studies[gt_cols].to_csv(out / "ground_truth" / "labels.csv", index=False)
    les_df = pd.DataFrame(lesions, columns=["study_id", "lesion_id", "organ", "finding", "centre_mm",
                                            "diameter_mm", "voxels"])
    les_df.to_csv(out / "ground_truth" / "lesions.csv", index=False)
    write_reports(spec, studies, les_df, out / "reports.csv", out / "ground_truth" / "report_errors.csv")
    write_json(out / "class_map.json", CLASS_MAP)
    write_json(out / "cohort.json", {"spec": spec_json(spec), "n_studies": len(studies),
                                     "n_patients": int(studies.patient_id.nunique())})
    return out


def generator_cli(description: str, ensure, profiles: dict, argv: list[str] | None = None) -> None:  # noqa: ANN001
    """``--profile/--seed/--out`` command line shared by the synthetic generators; prints the folder written."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--profile", default="demo", choices=sorted(profiles))
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    print(ensure(args.profile, args.seed, root=args.out))


def main(argv: list[str] | None = None) -> None:
    generator_cli("Generate the synthetic abdominal-CT cohort.", ensure_cohort, PROFILES, argv)


if __name__ == "__main__":
    from lib.synth import main as _main  # the importable module, so worker processes unpickle lib.synth's functions

    _main()
