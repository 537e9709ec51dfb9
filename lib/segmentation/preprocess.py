"""How an image becomes segmentation network input, and how the output goes back to the image (no torch).

Why torch-free: the service's ``POST /segment`` runs an ONNX export and must not load torch; training,
checkpoints and the service all call ``preprocess_image``, so they cannot drift apart. The recipe
(``Preprocess``) is stored in every checkpoint and export.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_SIZE = 128
DENOISERS = ("none", "gradient", "curvature", "isotropic", "tv")
NORMALISERS = ("minmax", "zscore", "none")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes network input; stored in checkpoints so inference repeats it exactly.

    Steps: crop to the field of view (bounding box of pixels above ``fov_threshold`` in the raw image,
    e.g. the ultrasound fan or the skull-stripped brain), scale each channel to [0, 1] (CT: by the HU
    window; otherwise 0.5-99.5th percentiles inside the crop) so the diffusion ``conductance`` means the
    same for every source, denoise, resize to ``size`` x ``size``, then ``normalise``.
    """

    size: int = DEFAULT_SIZE
    crop_fov: bool = True
    fov_threshold: float = 0.0
    denoise: str = "none"
    denoise_iterations: int = 5
    conductance: float = 1.0
    normalise: str = "minmax"
    window: tuple[float, float] | None = None  # (level, width) in HU for CT

    def __post_init__(self) -> None:
        if self.size % 32:
            raise ValueError(f"size must be a multiple of 32 (encoder strides), got {self.size}")
        if self.denoise not in DENOISERS:
            raise ValueError(f"denoise must be one of {DENOISERS}, got {self.denoise!r}")
        if self.normalise not in NORMALISERS:
            raise ValueError(f"normalise must be one of {NORMALISERS}, got {self.normalise!r}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        keys = cls.__dataclass_fields__
        d = {k: v for k, v in d.items() if k in keys}
        if d.get("window") is not None:
            d["window"] = tuple(d["window"])
        return cls(**d)


def denoise(channel: np.ndarray, method: str = "curvature", iterations: int = 5,
            conductance: float = 1.0) -> np.ndarray:
    """Edge-preserving smoothing of one 2D channel in [0, 1] by SimpleITK / scikit-image filters.

    ``gradient``/``curvature`` = Perona-Malik / curvature anisotropic diffusion; ``isotropic`` = the
    heat equation run for the same time (a Gaussian with variance 2 * 0.125 * iterations pixels^2);
    ``tv`` = total-variation (Chambolle) with weight 0.1 / conductance.
    """
    if method == "none":
        return channel.astype(np.float32)
    if method == "tv":
        from skimage.restoration import denoise_tv_chambolle

        return denoise_tv_chambolle(channel.astype(np.float64), weight=0.1 / conductance).astype(np.float32)
    import SimpleITK as sitk  # noqa: N813

    img = sitk.GetImageFromArray(channel.astype(np.float32))
    if method == "gradient":
        out = sitk.GradientAnisotropicDiffusion(img, timeStep=0.125, conductanceParameter=conductance,
                                                numberOfIterations=iterations)
    elif method == "curvature":
        out = sitk.CurvatureAnisotropicDiffusion(img, timeStep=0.0625, conductanceParameter=conductance,
                                                 numberOfIterations=iterations)
    elif method == "isotropic":
        out = sitk.DiscreteGaussian(img, variance=2 * 0.125 * iterations, useImageSpacing=False)
    else:
        raise ValueError(f"denoise must be one of {DENOISERS}, got {method!r}")
    return sitk.GetArrayFromImage(out).astype(np.float32)


def fov_box(image: np.ndarray, pre: Preprocess) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the field of view: the bounding box of pixels above the threshold in any channel
    (the whole image when cropping is off or the box is under 8 pixels a side)."""
    h, w = image.shape[-2:]
    if not pre.crop_fov:
        return 0, h, 0, w
    thr = pre.fov_threshold if pre.window is None else pre.window[0] - pre.window[1] / 2
    inside = (np.asarray(image) > thr).reshape(-1, h, w).any(0)
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    if not len(rows) or rows[-1] + 1 - rows[0] < 8 or cols[-1] + 1 - cols[0] < 8:
        return 0, h, 0, w
    return int(rows[0]), int(rows[-1] + 1), int(cols[0]), int(cols[-1] + 1)


def scale01(channel: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """One channel to [0, 1]: by the HU window (level, width), else by its 0.5-99.5th percentiles."""
    if window is not None:
        lo = window[0] - window[1] / 2
        return np.clip((channel - lo) / window[1], 0, 1).astype(np.float32)
    lo, hi = np.percentile(channel, [0.5, 99.5])
    return np.clip((channel - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def resize(arr: np.ndarray, size: Sequence[int], mode: str = "bilinear") -> np.ndarray:
    """``(C, H, W)`` -> ``(C, *size)`` float32: ``bilinear`` (scikit-image, Gaussian anti-aliasing when shrinking)
    or ``nearest`` (pixel ``floor(i * H / h)``, so a 0/1 mask stays 0/1)."""
    arr = np.asarray(arr, dtype=np.float32)
    h, w = (int(s) for s in size)
    if mode == "nearest":
        rows = np.minimum((np.arange(h) * arr.shape[-2] / h).astype(int), arr.shape[-2] - 1)
        cols = np.minimum((np.arange(w) * arr.shape[-1] / w).astype(int), arr.shape[-1] - 1)
        return arr[:, rows][:, :, cols]
    if mode != "bilinear":
        raise ValueError(f"resize mode must be bilinear|nearest, got {mode!r}")
    from skimage.transform import resize as sk_resize

    return sk_resize(arr, (arr.shape[0], h, w), order=1, mode="edge", preserve_range=True,
                     anti_aliasing=h < arr.shape[-2] or w < arr.shape[-1]).astype(np.float32)


def normalise_channels(x: np.ndarray, how: str) -> np.ndarray:
    """Per channel: ``minmax`` to [0, 1] (a constant channel -> 0), ``zscore`` (a constant channel -> 0), ``none``."""
    if how == "none":
        return x.astype(np.float32)
    flat = x.reshape(len(x), -1)
    if how == "minmax":
        lo, span = flat.min(1), np.ptp(flat, 1)
        out = np.where(span[:, None] > 0, (flat - lo[:, None]) / np.where(span > 0, span, 1)[:, None], 0.0)
    elif how == "zscore":
        mean, std = flat.mean(1), flat.std(1)
        out = (flat - mean[:, None]) / np.where(std > 0, std, 1)[:, None]
    else:
        raise ValueError(f"normalise must be one of {NORMALISERS}, got {how!r}")
    return out.reshape(x.shape).astype(np.float32)


def preprocess_image(image: np.ndarray, pre: Preprocess) -> tuple[np.ndarray, dict]:
    """Raw ``(C, H, W)`` -> network input ``(C, size, size)`` float32 and the geometry to undo the crop/resize."""
    y0, y1, x0, x1 = fov_box(image, pre)
    crop = image[:, y0:y1, x0:x1]
    chans = [denoise(scale01(c, pre.window), pre.denoise, pre.denoise_iterations, pre.conductance) for c in crop]
    x = normalise_channels(resize(np.stack(chans), (pre.size, pre.size), "bilinear"), pre.normalise)
    return x, {"shape": [int(v) for v in image.shape[-2:]], "box": [y0, y1, x0, x1]}


def preprocess_mask(mask: np.ndarray, geometry: dict, size: int) -> np.ndarray:
    """The mask cropped and resized like its image (nearest neighbour keeps it 0/1)."""
    y0, y1, x0, x1 = geometry["box"]
    return resize(mask[None, y0:y1, x0:x1], (size, size), "nearest")[0].astype(np.uint8)


def restore_probability(prob: np.ndarray, geometry: dict) -> np.ndarray:
    """A ``(size, size)`` probability map back on the input image's own pixel grid (zero outside the crop)."""
    y0, y1, x0, x1 = geometry["box"]
    out = np.zeros(geometry["shape"], np.float32)
    out[y0:y1, x0:x1] = resize(np.asarray(prob)[None], (y1 - y0, x1 - x0), "bilinear")[0]
    return out


def as_chw(image: np.ndarray, in_chans: int) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) -> (in_chans, H, W): RGB is averaged for 1-channel models."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] not in (1, 3, 4):
        a = a[..., :3].transpose(2, 0, 1)
    if a.ndim != 3:
        raise ValueError(f"expected a 2D image (H, W[, C]), got shape {np.shape(image)}")
    if a.shape[0] != in_chans:
        if in_chans == 1:
            a = a.mean(0, keepdims=True)
        else:
            raise ValueError(f"model expects {in_chans} channels, image has {a.shape[0]}")
    return a
