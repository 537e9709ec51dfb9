"""Deterministic synthetic transrectal-ultrasound (TRUS) images with gland and lesion masks.

Why: no public TRUS set with lesion masks can be redistributed, yet notebook 06 must train and be
checked on a fresh clone. The images copy what makes TRUS segmentation hard: multiplicative speckle
laid out along the beam (rendered in polar coordinates, then scan-converted into a fan), depth
attenuation with log compression, a hypoechoic gland and a lesion inside it whose size and contrast
vary (some images have none, so empty masks are exercised). Images of one patient share anatomy,
so splits must group by patient.

Layout of ``data/synthetic/trus-<name>-seed<seed>/``::

    images/<case_id>.png   8-bit greyscale B-mode image (0 outside the fan)
    masks/<case_id>.png    lesion mask, 0/255
    gland/<case_id>.png    gland mask, 0/255
    index.csv              case_id, patient_id, image_path, mask_path, gland_path, has_lesion,
                           lesion_area_px, lesion_contrast, spacing_mm
    trus.json              generator parameters (provenance; regenerated when they change)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from lib import config
from lib.io import write_json
from lib.synth import generator_cli, spec_json


@dataclass(frozen=True)
class TrusSpec:
    """Size and difficulty of a synthetic TRUS set; every field is a knob."""

    n_patients: int = 40
    images_per_patient: int = 5
    size: int = 128  # output height = width (pixels)
    fov_depth_mm: float = 50.0  # depth covered by the image height
    half_angle_deg: tuple[float, float] = (32.0, 42.0)  # fan half-opening
    gland_radius: tuple[float, float] = (0.22, 0.30)  # fraction of image size
    gland_level: tuple[float, float] = (0.45, 0.65)  # echogenicity relative to surrounding tissue
    lesion_radius: tuple[float, float] = (0.05, 0.14)  # fraction of image size
    lesion_contrast: tuple[float, float] = (0.35, 0.75)  # fractional echo drop of lesion vs gland
    lesion_free_rate: float = 0.1  # images with no lesion (empty masks)
    speckle_sigma: tuple[float, float] = (0.6, 1.4)  # axial, lateral grain in pixels at size 128
    seed: int = config.DEFAULT_SEED
    name: str = "demo"


PROFILES: dict[str, TrusSpec] = {
    "smoke": TrusSpec(n_patients=8, images_per_patient=4, size=64, lesion_radius=(0.08, 0.15),
                      lesion_contrast=(0.55, 0.8), name="smoke"),
    "demo": TrusSpec(n_patients=40, images_per_patient=5, size=128, name="demo"),
    "full": TrusSpec(n_patients=150, images_per_patient=8, size=256, name="full"),
}


def _rng(seed: int, *keys: object) -> np.random.Generator:
    """Independent stream per (seed, key): one image does not depend on how many others exist."""
    digest = hashlib.sha256(repr((seed, "trus") + keys).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (organ wobble, tissue texture)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (field / (field.std() + 1e-9)).astype(np.float32)


def _blob(yy: np.ndarray, xx: np.ndarray, centre: tuple[float, float], radii: tuple[float, float],
          angle: float, wobble: np.ndarray, amount: float) -> np.ndarray:
    """Rotated ellipse with a wobbly border (normalised-radius test)."""
    dy, dx = yy - centre[0], xx - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dy + s * dx, -s * dy + c * dx
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + amount * wobble <= 1.0


def patient_anatomy(spec: TrusSpec, patient: int) -> dict:
    """Gland and lesion geometry shared by all images of one patient (fractions of image size)."""
    rng = _rng(spec.seed, "patient", patient)
    r = float(rng.uniform(*spec.gland_radius))
    return {
        "gland_centre": (float(rng.uniform(0.52, 0.6)), float(rng.uniform(0.45, 0.55))),
        "gland_radii": (r * float(rng.uniform(0.75, 0.9)), r * float(rng.uniform(1.0, 1.2))),
        "gland_angle": float(rng.uniform(-0.3, 0.3)),
        "gland_level": float(rng.uniform(*spec.gland_level)),
        # lesion position in the gland's normalised frame, its size and contrast
        "lesion_pos": (float(rng.uniform(-0.45, 0.45)), float(rng.uniform(-0.5, 0.5))),
        "lesion_radius": float(rng.uniform(*spec.lesion_radius)),
        "lesion_contrast": float(rng.uniform(*spec.lesion_contrast)),
        "lesion_aspect": float(rng.uniform(0.7, 1.3)),
    }


def render_image(spec: TrusSpec, patient: int, index: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """One B-mode frame: (image float32 in [0, 1], masks {lesion, gland, fov} uint8 0/1, record)."""
    anat = patient_anatomy(spec, patient)
    rng = _rng(spec.seed, "image", patient, index)
    n = spec.size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    # fan geometry: virtual apex above the top edge, beams spread downwards
    apex = (-float(rng.uniform(0.08, 0.14)), 0.5)
    half = np.deg2rad(float(rng.uniform(*spec.half_angle_deg)))
    rr = np.hypot(yy - apex[0], xx - apex[1])
    th = np.arctan2(xx - apex[1], yy - apex[0])
    r0, r1 = 0.14 - apex[0] * 0.5, 1.0 - apex[0]
    fov = (rr >= r0) & (rr <= r1) & (np.abs(th) <= half)

    # anatomy with per-frame jitter (probe pressure, slice position)
    scale = float(rng.uniform(0.9, 1.1))
    gc = (anat["gland_centre"][0] + float(rng.normal(0, 0.015)), anat["gland_centre"][1] + float(rng.normal(0, 0.015)))
    gr = (anat["gland_radii"][0] * scale, anat["gland_radii"][1] * scale)
    gland = _blob(yy, xx, gc, gr, anat["gland_angle"], _smooth_noise(rng, (n, n), n / 10), 0.12) & fov
    has_lesion = bool(rng.random() >= spec.lesion_free_rate)
    lesion = np.zeros_like(gland)
    contrast = 0.0
    if has_lesion:
        c, s = np.cos(anat["gland_angle"]), np.sin(anat["gland_angle"])
        pu, pv = anat["lesion_pos"][0] * gr[0], anat["lesion_pos"][1] * gr[1]
        lc = (gc[0] + c * pu - s * pv, gc[1] + s * pu + c * pv)
        lr = anat["lesion_radius"] * float(rng.uniform(0.6, 1.15))  # slice through the lesion
        radii = (lr * anat["lesion_aspect"] ** 0.5, lr / anat["lesion_aspect"] ** 0.5)
        inner = ndimage.binary_erosion(gland, iterations=max(1, n // 64))
        lesion = _blob(yy, xx, lc, radii, float(rng.uniform(0, np.pi)),
                       _smooth_noise(rng, (n, n), n / 20), 0.25) & inner
        has_lesion = bool(lesion.any())
        contrast = anat["lesion_contrast"] * float(rng.uniform(0.85, 1.15)) if has_lesion else 0.0

    # echogenicity: textured tissue, darker gland with a bright capsule, darker lesion
    echo = 1.0 + 0.15 * _smooth_noise(rng, (n, n), n / 16)
    capsule = gland & ~ndimage.binary_erosion(gland, iterations=max(1, n // 96))
    echo = np.where(gland, anat["gland_level"] * (1 + 0.08 * _smooth_noise(rng, (n, n), n / 24)), echo)
    echo = np.where(capsule, echo * 1.6, echo)
    echo = np.where(lesion, echo * (1.0 - contrast), echo)
    # speckle: complex Gaussian scatterers blurred by an anisotropic PSF in beam (polar) coordinates
    sa, sl = (v * n / 128 for v in spec.speckle_sigma)
    field = ndimage.gaussian_filter(rng.standard_normal((n, n)), (sa, sl)) \
        + 1j * ndimage.gaussian_filter(rng.standard_normal((n, n)), (sa, sl))
    speckle = np.abs(field).astype(np.float32)
    speckle /= speckle.mean() + 1e-9
    ri = (rr - r0) / (r1 - r0) * (n - 1)
    ti = (th + half) / (2 * half) * (n - 1)
    speckle = ndimage.map_coordinates(speckle, [ri, ti], order=1, mode="reflect")
    # depth attenuation partly corrected by time-gain compensation, then log compression
    depth = np.clip((rr - r0) / (r1 - r0), 0, 1)
    intensity = echo * speckle * np.exp(-float(rng.uniform(0.3, 0.8)) * depth)
    img = np.log1p(8.0 * intensity) / np.log1p(8.0 * 3.0)
    img = img + rng.normal(0, 0.02, img.shape)
    img = np.clip(np.where(fov, img * float(rng.uniform(0.85, 1.05)), 0.0), 0, 1).astype(np.float32)
    masks = {"lesion": lesion.astype(np.uint8), "gland": gland.astype(np.uint8), "fov": fov.astype(np.uint8)}
    record = {"case_id": f"T{patient:04d}_{index:02d}", "patient_id": f"T{patient:04d}",
              "has_lesion": int(has_lesion), "lesion_area_px": int(lesion.sum()),
              "lesion_contrast": round(contrast, 4), "spacing_mm": round(spec.fov_depth_mm / n, 4)}
    return img, masks, record


def make_arrays(spec: TrusSpec) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Whole set in memory: images (N, H, W) float32, lesion masks (N, H, W) uint8, index frame."""
    imgs, masks, rows = [], [], []
    for p in range(spec.n_patients):
        for i in range(spec.images_per_patient):
            img, m, rec = render_image(spec, p, i)
            imgs.append(img)
            masks.append(m["lesion"])
            rows.append(rec)
    return np.stack(imgs), np.stack(masks), pd.DataFrame(rows)


def trus_dir(name: str, seed: int) -> Path:
    return config.DATA / "synthetic" / f"trus-{name}-seed{seed}"


def ensure_trus(profile: str = "smoke", seed: int = config.DEFAULT_SEED, root: Path | None = None,
                **overrides: object) -> Path:
    """Write the set for ``profile`` as PNGs + ``index.csv`` unless an identical one is on disk."""
    if profile not in PROFILES:
        raise ValueError(f"unknown TRUS profile {profile!r}; choose from {sorted(PROFILES)}")
    spec = replace(PROFILES[profile], seed=seed, **overrides)
    out = Path(root) if root else trus_dir(spec.name, seed)
    meta = out / "trus.json"
    if meta.exists() and json.loads(meta.read_text()).get("spec") == spec_json(spec):
        return out
    rows = []
    for p in range(spec.n_patients):
        for i in range(spec.images_per_patient):
            img, masks, rec = render_image(spec, p, i)
            paths = {k: f"{k}/{rec['case_id']}.png" for k in ("images", "masks", "gland")}
            for key, arr in (("images", np.round(img * 255)), ("masks", masks["lesion"] * 255),
                             ("gland", masks["gland"] * 255)):
                (out / key).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr.astype(np.uint8), mode="L").save(out / paths[key])
            rows.append({**rec, "image_path": paths["images"], "mask_path": paths["masks"],
                         "gland_path": paths["gland"]})
    cols = ["case_id", "patient_id", "image_path", "mask_path", "gland_path", "has_lesion", "lesion_area_px",
            "lesion_contrast", "spacing_mm"]
    pd.DataFrame(rows)[cols].to_csv(out / "index.csv", index=False)
    write_json(meta, {"spec": spec_json(spec), "n_images": len(rows)})
    return out


def main(argv: list[str] | None = None) -> None:
    generator_cli("Generate the synthetic TRUS segmentation set.", ensure_trus, PROFILES, argv)


if __name__ == "__main__":
    main()
