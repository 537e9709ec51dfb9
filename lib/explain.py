"""Saliency maps that can be checked: Grad-CAM, Grad-CAM++ and occlusion, scored against lesion masks.

Why: a heat map on a CT crop is persuasive whether or not it is right. The synthetic cohort has lesion
masks, so every map here gets numbers: does its maximum fall on the lesion (pointing game), how much of
its positive energy lies inside the lesion, does removing its most relevant pixels first lower the
class probability faster than removing random pixels (deletion curve), and does it change when the
model's weights are randomised (Adebayo et al. 2018 sanity check). Maps come from ``monai.visualize``;
this module only picks layers, wraps MONAI's sharp edges and scores the results.

MONAI behaviour pinned here (tests/test_explain.py checks each one, because these changed between
releases and users reported "broken" occlusion maps after upgrades):

* ``OcclusionSensitivity`` returns the probability *with* the patch occluded (MONAI >= 1.1), not the
  drop; we return ``p(original) - p(occluded)`` so larger means more important, like Grad-CAM.
* Its built-in activation chooses sigmoid/softmax from the number of *input* channels, so a 2.5D input
  with one output logit gets softmax over one value (always 1, an all-zero map). We always pass the
  activation that matches the model's task.
* Its default overlap changed (0.25 -> 0.6); we always pass it (or ``stride``) explicitly.
* Its ``mean_patch`` mode multiplies the patch by its mean instead of replacing it, and callable modes
  raise; we offer ``gaussian``, ``mean_img`` and a constant value only.
* CAM post-processing by default rescales each map so that its *maximum becomes 0*; we keep raw maps.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from scipy import ndimage, stats
from torch import Tensor, nn
from tqdm.auto import tqdm

METHODS = ("gradcam", "gradcampp", "occlusion")
OCCLUSION_MODES = ("gaussian", "mean_img", "tissue")
BASELINES = ("blur", "mean", "zero", "tissue")


# ----------------------------------------------------------------------------- target layer


def _spatial_outputs(model: nn.Module, example: Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every sub-module whose output is a (N, C, H, W) map with H*W > 1, in run order."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    hooks = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(_m, _i, out, name=name):
            if isinstance(out, Tensor) and out.ndim == 4 and out.shape[-1] * out.shape[-2] > 1:
                seen.append((name, tuple(out.shape)))

        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception:  # noqa: BLE001 - a model that cannot run this input simply has no candidates
        pass
    finally:
        for h in hooks:
            h.remove()
    return seen


def _has_conv(mod: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in mod.modules())


TOKEN_MODELS = ("VisionTransformer", "SwinTransformer", "Eva", "Beit", "Deit", "MaxxVit", "CaiT", "XCiT")


def _family_layer(model: nn.Module) -> str | None:
    """The usual Grad-CAM layer of common timm families (class name decides), or None."""
    kind = type(model).__name__
    if any(t.lower() in kind.lower() for t in TOKEN_MODELS):
        raise ValueError(f"{kind} works on tokens, not (N, C, H, W) maps: Grad-CAM needs a reshape of its "
                         f"token outputs, which this module does not do; use method='occlusion'")
    names = dict(model.named_modules())
    if kind in ("ResNet", "ResNetV2") and "layer4" in names:
        return "layer4"
    if kind == "EfficientNet" and "bn2" in names:
        return "bn2"  # conv_head after its BatchNorm + activation: the last spatial features
    if kind in ("ConvNeXt", "RegNet", "MobileNetV3", "MobileNetV4", "EfficientNet", "DenseNet"):
        info = getattr(model, "feature_info", None)
        if info:
            return info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
    return None


def candidate_layers(model: nn.Module, example: Tensor) -> list[str]:
    """Names of layers that contain a Conv2d and output a spatial map for ``example`` (run order)."""
    mods = dict(model.named_modules())
    out = []
    for name, _shape in _spatial_outputs(model, example):
        if name not in out and _has_conv(mods[name]):
            out.append(name)
    return out


def find_target_layer(model: nn.Module, example: Tensor, layer: str | None = None, min_map_size: int = 4) -> str:
    """The layer Grad-CAM hooks: ``layer`` if given, else the family default, else the last conv stage.

    An automatic pick must give a map of at least ``min_map_size`` cells per side for ``example``: on the small
    inputs used here (64 px) ResNet's ``layer4`` is a 2 x 2 grid that can only point at a quadrant, so the
    pick steps back to the last conv stage that is fine enough (``layer3``, 4 x 4). Raises ValueError naming
    the layers that would work when the model has no usable convolutional layer or ``layer`` is not one of them.
    """
    spatial = dict(_spatial_outputs(model, example))
    candidates = candidate_layers(model, example)
    if layer is not None:
        if layer in spatial:
            return layer
        raise ValueError(f"target layer {layer!r} of {type(model).__name__} does not give a spatial (N, C, H, W) "
                         f"map for input {tuple(example.shape)}; candidate layers: {candidates[-12:]}")
    if not candidates:
        names = [n for n, _ in model.named_children()]
        raise ValueError(f"{type(model).__name__} has no convolutional layer usable for Grad-CAM (no Conv2d "
                         f"stage gives a spatial map for input {tuple(example.shape)}); candidate layers: none. "
                         f"Its top-level layers are {names}; pass target_layer=<name> of a layer with a "
                         f"(N, C, H, W) output, or use method='occlusion'.")

    def fine(name: str) -> bool:
        return min(spatial[name][-2:]) >= min(min_map_size, *example.shape[-2:])

    family = _family_layer(model)
    if family is not None and family in spatial and fine(family):
        return family
    # Step back along timm's own feature stages (feature_info: ResNet layer1..4, EfficientNet blocks.k, ConvNeXt
    # stages.k, ...) to the last one that is fine enough; models without it: the conv-containing module that
    # finishes last, e.g. a whole stage rather than its last conv.
    info = getattr(model, "feature_info", None)
    stages = [d["module"] for d in info] if isinstance(info, list) else []
    for pool in ([n for n in stages if n in spatial and fine(n)], [n for n in candidates if fine(n)]):
        if pool:
            return pool[-1]
    return candidates[-1]


# ----------------------------------------------------------------------------- maps


def activation(task: str) -> Callable[[Tensor], Tensor]:
    """Logits -> probabilities the way the model was trained (sigmoid per output, or softmax)."""
    if task == "multiclass":
        return _softmax
    if task in ("binary", "multilabel"):
        return torch.sigmoid
    raise ValueError(f"task must be binary|multiclass|multilabel, got {task!r}")


def _softmax(t: Tensor) -> Tensor:
    """Softmax over classes: a module-level function, so explainers pickle into the worker pool."""
    return t.softmax(1)


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass
class Explainer:
    """One model + how to explain it: target layer, class, occlusion settings. Builds MONAI objects once.

    MONAI's CAM classes register hooks on the model that are never removed, so one Explainer per model
    (not one per image) keeps them from piling up.
    """

    model: nn.Module
    task: str = "binary"
    class_idx: int = 0
    target_layer: str | None = None
    min_map_size: int = 4  # automatic Grad-CAM layer: at least this many cells per side
    mask_size: int = 16
    stride: int | None = None  # occlusion step in pixels; None -> from overlap
    overlap: float = 0.6
    occlusion_mode: str | float = "mean_img"
    n_batch: int = 32
    progress: bool = False
    fast: bool = True  # occlusion and probabilities through lib.models.inference_model (built on first use)
    _cams: dict = field(default_factory=dict, repr=False)
    _forward: nn.Module | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.model = self.model.eval()
        self._act = activation(self.task)
        if isinstance(self.occlusion_mode, str) and self.occlusion_mode not in OCCLUSION_MODES:
            raise ValueError(f"occlusion_mode must be one of {OCCLUSION_MODES} or a number, got "
                             f"{self.occlusion_mode!r} (MONAI's mean_patch multiplies instead of replacing)")
        if self.stride is not None and not 1 <= self.stride <= self.mask_size:
            raise ValueError(f"stride must be in [1, mask_size={self.mask_size}], got {self.stride}")

    def __getstate__(self) -> dict:
        """Picklable for worker processes: MONAI's CAM objects (hook closures) stay behind and are rebuilt on
        first use; a model that already carries their hooks travels as a clean copy."""
        state = dict(self.__dict__)
        state["_cams"] = {k: v for k, v in self._cams.items() if isinstance(v, str)}
        state["_forward"] = None  # TorchScript modules do not pickle; each process builds its own
        if len(state["_cams"]) < len(self._cams):
            model = copy.deepcopy(self.model)
            for mod in model.modules():
                for hooks in (mod._forward_hooks, mod._forward_pre_hooks, mod._backward_hooks,
                              mod._backward_pre_hooks):
                    hooks.clear()
            state["model"] = model
        return state

    def forward_model(self, x: Tensor) -> nn.Module:
        """The network for gradient-free passes over inputs like ``x``: occlusion and deletion curves run hundreds
        of them per image, so with ``fast`` a traced, optimised copy (``lib.models.inference_model``)."""
        if not self.fast:
            return self.model
        if self._forward is None:
            from lib.models import inference_model

            self._forward = inference_model(self.model, x[:1].float())
        return self._forward

    def prob(self, x: Tensor) -> np.ndarray:
        """Probability of ``class_idx`` for a batch ``(B, C, H, W)``."""
        with torch.no_grad():
            return self._act(self.forward_model(x)(x.float()))[:, self.class_idx].double().cpu().numpy()

    def layer(self, x: Tensor) -> str:
        """Grad-CAM target layer for inputs shaped like ``x`` (picked once, see ``find_target_layer``)."""
        if "layer" not in self._cams:
            self._cams["layer"] = find_target_layer(self.model, x[:1].float(), self.target_layer, self.min_map_size)
        return self._cams["layer"]

    def _cam(self, method: str, x: Tensor):
        from monai.visualize import GradCAM, GradCAMpp

        if method not in self._cams:
            cls = GradCAM if method == "gradcam" else GradCAMpp
            self._cams[method] = cls(nn_module=self.model, target_layers=self.layer(x), postprocessing=_identity)
        return self._cams[method]

    def occlusion_overlap(self) -> float:
        """MONAI's sliding-window overlap for the requested stride (step = mask_size * (1 - overlap))."""
        if self.stride is None:
            return float(self.overlap)
        return 1.0 - self.stride / self.mask_size

    def occlusion(self, x: Tensor) -> np.ndarray:
        """Drop in class probability when each region is occluded, ``(H, W)`` for one image ``(1, C, H, W)``."""
        from monai.visualize import OcclusionSensitivity

        size = min(self.mask_size, *x.shape[-2:])
        mode = float(tissue_level(x).median()) if self.occlusion_mode == "tissue" else self.occlusion_mode
        occ = OcclusionSensitivity(nn_module=self.forward_model(x), mask_size=size, n_batch=self.n_batch,
                                   verbose=self.progress, mode=mode,
                                   overlap=self.occlusion_overlap(), activate=self._act)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MONAI's own indexing deprecation notes
            occ_map, _ = occ(x.float())
        p0 = self.prob(x)[0]
        return (p0 - occ_map[0, self.class_idx].detach().cpu().numpy()).astype(np.float32)

    def map(self, x: Tensor, method: str = "gradcam") -> np.ndarray:
        """Raw saliency ``(B, H, W)`` for a batch ``(B, C, H, W)`` (occlusion: one image at a time)."""
        if x.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        if method == "occlusion":
            return np.stack([self.occlusion(x[i:i + 1]) for i in range(len(x))])
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        from lib.models import SliceMIL

        if method == "gradcampp" and isinstance(self.model, SliceMIL):
            raise ValueError("Grad-CAM++ needs one class score per map; a SliceMIL model scores studies, not slices: "
                             "use gradcam or occlusion")
        cam = self._cam(method, x)
        with torch.enable_grad():
            out = cam(x.float().clone().requires_grad_(True), class_idx=self.class_idx)[:, 0]
        if out.shape[0] != x.shape[0]:  # lib.models.SliceMIL: one map per slice -> strongest slice per pixel
            out = out.reshape(x.shape[0], -1, *out.shape[-2:]).amax(dim=1)
        return out.detach().cpu().numpy().astype(np.float32)


def normalise(saliency: np.ndarray) -> np.ndarray:
    """Positive part scaled to max 1, so fold maps of different magnitude weigh the same; zeros stay zeros."""
    pos = np.clip(np.nan_to_num(np.asarray(saliency, dtype=np.float32)), 0, None)
    peak = pos.max() if pos.size else 0.0
    return pos / peak if peak > 0 else pos


def ensemble_map(explainers: Sequence[Explainer], x: Tensor, method: str = "gradcam") -> tuple[np.ndarray, np.ndarray]:
    """Mean of the normalised per-model maps ``(H, W)`` and the per-model maps ``(K, H, W)`` for one image."""
    maps = np.stack([normalise(e.map(x, method)[0]) for e in explainers])
    return maps.mean(0), maps


def ensemble_prob(explainers: Sequence[Explainer]) -> Callable[[Tensor], np.ndarray]:
    """Mean probability over the fold models: the ensemble whose maps are averaged."""
    return lambda x: np.mean([e.prob(x) for e in explainers], axis=0)


# ----------------------------------------------------------------------------- localisation


def is_zero_map(saliency: np.ndarray) -> bool:
    """No positive, finite evidence anywhere: scores would divide by zero."""
    s = np.nan_to_num(np.asarray(saliency, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return not (s > 0).any()


def pointing_game(saliency: np.ndarray, lesion: np.ndarray | None, tolerance: float = 2.0) -> float:
    """1.0 when the map's maximum lies within ``tolerance`` pixels of the lesion, else 0.0.

    Upsampled coarse maps have flat tops (ties); the score is then the share of the tied maximal pixels
    that hit, i.e. the expected score when the tie is broken at random, not whichever comes first in
    memory. NaN when there is no lesion to point at or the map has no positive value (see ``is_zero_map``).
    """
    if lesion is None or not np.asarray(lesion).any() or is_zero_map(saliency):
        return float("nan")
    lesion = np.asarray(lesion) > 0
    s = np.nan_to_num(np.asarray(saliency, dtype=np.float64), nan=-np.inf, posinf=np.finfo(np.float64).max)
    if s.shape != lesion.shape:
        raise ValueError(f"map shape {s.shape} differs from lesion mask {lesion.shape}")
    peak = s.max()
    tops = s >= peak - 1e-6 * abs(peak)
    dist = ndimage.distance_transform_edt(~lesion)
    return float((dist[tops] <= tolerance).mean())


def energy_inside(saliency: np.ndarray, lesion: np.ndarray | None) -> float:
    """Share of the map's positive energy inside the lesion mask (1.0 = all of it); NaN if undefined."""
    if lesion is None or not np.asarray(lesion).any() or is_zero_map(saliency):
        return float("nan")
    pos = np.clip(np.nan_to_num(np.asarray(saliency, dtype=np.float64), posinf=0.0), 0, None)
    if pos.shape != np.asarray(lesion).shape:
        raise ValueError(f"map shape {pos.shape} differs from lesion mask {np.asarray(lesion).shape}")
    return float(pos[np.asarray(lesion) > 0].sum() / pos.sum())


def random_map(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Uniform noise of the map's shape: the 'explanation' that knows nothing."""
    return np.random.default_rng(seed).random(shape).astype(np.float32)


# ----------------------------------------------------------------------------- faithfulness


def tissue_level(x: Tensor) -> Tensor:
    """Median of each channel's non-zero pixels, shape ``(B, C, 1, 1)``: the organ's own intensity in a masked crop.

    Why: in a crop blanked outside the organ mask the image mean, and a blur near the edge, are darker than the
    organ -- a hypodense patch, i.e. what a lesion looks like -- so 'deleting' with them can add evidence.
    """
    flat = x.detach().flatten(2).float()
    vals = torch.where(flat != 0, flat, torch.full_like(flat, float("nan")))
    return torch.nan_to_num(vals.nanmedian(dim=2).values, nan=0.0)[..., None, None].to(x)


def baseline_image(x: Tensor, kind: str | float = "blur", sigma: float = 4.0) -> Tensor:
    """What deleted pixels become: a heavily blurred copy (default), the image mean, zero, a constant, or
    ``tissue``: the channel's organ median inside the organ (non-zero pixels), zero outside it -- for masked crops,
    where a deleted lesion should look like normal organ, not like a new dark patch."""
    if isinstance(kind, int | float) and not isinstance(kind, bool):
        return torch.full_like(x, float(kind))
    if kind == "tissue":
        return torch.where(x != 0, tissue_level(x).expand_as(x), torch.zeros_like(x))
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        return torch.full_like(x, float(x.mean()))
    if kind == "blur":
        arr = x.detach().cpu().numpy()
        sig = (0,) * (arr.ndim - 2) + (sigma, sigma)
        return torch.from_numpy(ndimage.gaussian_filter(arr, sig, mode="nearest")).to(x)
    raise ValueError(f"baseline must be one of {BASELINES} or a number, got {kind!r}")


def deletion_curve(prob_fn: Callable[[Tensor], np.ndarray], x: Tensor, saliency: np.ndarray, n_steps: int = 20,
                   baseline: str | float = "blur", seed: int = 0, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Class probability as the most relevant pixels are replaced by the baseline first.

    ``x`` is one image ``(1, C, H, W)``; a pixel is deleted in all channels (2.5D slices) at once. Ties in the
    map (e.g. an all-zero map) are broken at random with ``seed``. Returns (fractions deleted, probabilities),
    ``n_steps + 1`` points from 0 to 1.
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image (1, C, H, W), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if saliency.shape != (h, w):
        raise ValueError(f"map shape {saliency.shape} differs from image {(h, w)}")
    s = np.nan_to_num(np.asarray(saliency, dtype=np.float64), nan=-np.inf).ravel()
    tie = np.random.default_rng(seed).random(s.size)
    order = np.lexsort((tie, -s))  # descending saliency, random among equals
    rank = np.empty(s.size, dtype=np.int64)
    rank[order] = np.arange(s.size)
    fractions = np.linspace(0.0, 1.0, n_steps + 1)
    counts = np.round(fractions * s.size).astype(np.int64)
    base = baseline_image(x, baseline)
    rank_t = torch.from_numpy(rank.reshape(h, w))
    probs = []
    for i in range(0, len(counts), batch):
        keep = torch.stack([(rank_t >= c) for c in counts[i:i + batch]])[:, None].to(x.device)  # (b,1,H,W)
        probs.append(prob_fn(torch.where(keep, x, base)))
    return fractions, np.concatenate(probs)


def curve_auc(fractions: np.ndarray, probs: np.ndarray) -> float:
    """Area under a deletion curve (trapezoid over the deleted fraction 0..1); lower = more faithful."""
    return float(np.trapezoid(probs, fractions))


# ----------------------------------------------------------------------------- randomisation sanity check


def parameter_layers(model: nn.Module) -> list[str]:
    """Names of leaf modules with their own parameters, output side first (the cascade order)."""
    names = [n for n, m in model.named_modules()
             if n and not list(m.children()) and any(True for _ in m.parameters(recurse=False))]
    return names[::-1]


def _randomise(mod: nn.Module) -> None:
    if hasattr(mod, "reset_parameters"):
        mod.reset_parameters()
    else:
        for p in mod.parameters(recurse=False):
            nn.init.normal_(p, 0.0, 0.02)
    for name, buf in mod.named_buffers(recurse=False):  # e.g. running stats of custom norms
        if name == "running_mean":
            buf.zero_()
        elif name == "running_var":
            buf.fill_(1.0)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two maps; NaN when either is constant (e.g. all zero)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def input_support(x: Tensor) -> np.ndarray:
    """Pixels ``(H, W)`` where one input ``(1, C, H, W)`` is non-zero in some channel (all pixels if none is)."""
    support = (x[0] != 0).any(0).cpu().numpy()
    return support if support.any() else np.ones_like(support)


def randomisation_check(explainer: Explainer, x: Tensor, method: str = "gradcam", n_steps: int | None = None,
                        seed: int = 0, ref: np.ndarray | None = None) -> pd.DataFrame:
    """Cascading randomisation (Adebayo et al. 2018): re-initialise layers from the output down, one group
    at a time, and measure the rank correlation of each map with the trained model's map.

    A map that explains the *model* must change as the model is destroyed; a map that stays similar is
    an edge detector. ``n_steps`` groups the layers into that many steps (None = one layer per step).
    Returns one row per step: ``step, layer, n_randomised, spearman, spearman_support, zero_map`` (step 0 =
    trained model). ``spearman_support`` ranks only the pixels where the input is non-zero in some channel: in a
    crop blanked outside the organ mask, every map -- trained or random -- is low on the blank part, and that
    shared structure comes from the input, not the weights (whole image otherwise, where it equals ``spearman``).
    ``ref``: the trained model's map, when the caller has it already.
    """
    ref = explainer.map(x, method)[0] if ref is None else ref
    support = input_support(x)
    model = copy.deepcopy(explainer.model)
    layers = parameter_layers(model)
    groups = [[n] for n in layers] if not n_steps else [list(g) for g in np.array_split(layers, n_steps) if len(g)]
    mods = dict(model.named_modules())
    settings = {k: getattr(explainer, k) for k in ("task", "class_idx", "target_layer", "min_map_size", "mask_size",
                                                   "stride", "overlap", "occlusion_mode", "n_batch")}
    settings["target_layer"] = explainer.layer(x) if method != "occlusion" else explainer.target_layer
    rows = [{"step": 0, "layer": "(trained)", "n_randomised": 0, "spearman": spearman(ref, ref),
             "spearman_support": spearman(ref[support], ref[support]), "zero_map": is_zero_map(ref)}]
    done = 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for step, group in enumerate(groups, start=1):
            for name in group:
                _randomise(mods[name])
            done += len(group)
            # A fresh copy per step: MONAI's hooks would otherwise pile up on the shared model.
            # fast=False: one map per copy, so tracing the copy would cost more than it saves
            rand = Explainer(copy.deepcopy(model), **settings, fast=False).map(x, method)[0]
            rows.append({"step": step, "layer": group[-1], "n_randomised": done, "spearman": spearman(ref, rand),
                         "spearman_support": spearman(ref[support], rand[support]), "zero_map": is_zero_map(rand)})
    return pd.DataFrame(rows)


def randomisation_study(explainer: Explainer, xs: Tensor, sample_ids: Sequence[str], methods: Sequence[str],
                        n_cases: int = 1, n_steps: int | None = None, seed: int = 0) -> pd.DataFrame:
    """``randomisation_check`` for each method on the first ``n_cases`` inputs (in the given order) whose trained
    map is not all zero: a zero map has no ranks to lose, so it would make the check pass vacuously. Inputs
    are taken anyway when fewer than ``n_cases`` have a non-zero map (their rows say ``zero_map``).
    Returns the checks' rows with ``sample_id`` and ``method`` columns."""
    frames = []
    for method in methods:
        trained: dict[int, np.ndarray] = {}  # maps computed while choosing, reused as the check's reference
        chosen: list[int] = []
        for i in range(len(xs)):
            if len(chosen) == n_cases:
                break
            trained[i] = explainer.map(xs[i:i + 1], method)[0]
            if not is_zero_map(trained[i]):
                chosen.append(i)
        chosen += [i for i in range(len(xs)) if i not in chosen][:n_cases - len(chosen)]
        for i in chosen:
            res = randomisation_check(explainer, xs[i:i + 1], method, n_steps, seed, trained.get(i))
            frames.append(res.assign(sample_id=str(sample_ids[i]), method=method))
    if not frames:
        raise ValueError("randomisation study needs at least one input and one method")
    return pd.concat(frames, ignore_index=True)


def randomised_correlation(randomisation: pd.DataFrame, col: str = "spearman_support") -> pd.Series:
    """Per method: mean absolute Spearman of the fully randomised model's map with the trained map (the last
    step of each case's cascade); a map that vanished counts as 0.

    Absolute, as Adebayo et al.'s 'ABS' variant: a map that turns into its own negative when the weights are
    destroyed still carries the trained map's structure (from the input, not the model), so it must not pass.
    """
    last = randomisation.sort_values("step").groupby(["sample_id", "method"]).tail(1)
    return last[col].fillna(0.0).abs().groupby(last["method"]).mean()


# ----------------------------------------------------------------------------- one case, all checks


@dataclass
class CaseResult:
    """Maps and scores of one input: ``maps[method]`` is the ensemble map, ``rows`` the metrics. ``sample_id``
    names the input uniquely (a study has one crop per organ, so ``<case_id>_<structure>`` in notebook 05)."""

    sample_id: str
    image: np.ndarray
    lesion: np.ndarray | None
    prob: float
    maps: dict[str, np.ndarray]
    rows: list[dict]
    curves: dict[str, np.ndarray] = field(default_factory=dict)  # ensemble deletion curve per method


def score_map(prob_fn: Callable[[Tensor], np.ndarray], x: Tensor, saliency: np.ndarray, lesion: np.ndarray | None,
              tolerance: float, n_steps: int, baseline: str | float, seed: int,
              deletion: bool = True) -> tuple[dict, np.ndarray | None]:
    """All per-map numbers (pointing game, energy inside, deletion AUC, flags) and the deletion curve.

    ``deletion=False`` scores localisation only (deletion columns NaN, no curve): the deletion curve costs
    ``n_steps + 1`` forward passes, everything else none."""
    if deletion:
        fr, pr = deletion_curve(prob_fn, x, saliency, n_steps, baseline, seed)
        del_scores = {"deletion_auc": curve_auc(fr, pr), "prob_start": float(pr[0]), "prob_end": float(pr[-1])}
    else:
        pr = None
        del_scores = {"deletion_auc": np.nan, "prob_start": float(prob_fn(x)[0]), "prob_end": np.nan}
    has_lesion = lesion is not None and bool(np.asarray(lesion).any())
    scores = {"zero_map": is_zero_map(saliency), "has_lesion": has_lesion,
              "pointing": pointing_game(saliency, lesion, tolerance),
              "energy_inside": energy_inside(saliency, lesion), **del_scores}
    return scores, pr


def explain_case(explainers: Sequence[Explainer], x: Tensor, lesion: np.ndarray | None, sample_id: str = "",
                 methods: Iterable[str] = ("gradcam",), tolerance: float = 2.0, n_steps: int = 20,
                 baseline: str | float = "blur", seed: int = 0, per_fold: bool = True,
                 per_fold_deletion: bool = True) -> CaseResult:
    """Maps of every method for one image ``(1, C, H, W)``, per fold model and averaged, each scored.

    A ``random`` map is scored alongside as the baseline every method must beat, by its expected value rather
    than one noisy draw: a uniform map whose ties are broken at random gives exactly the expected pointing-game
    hit of a random peak, the lesion's area share as energy inside, and a random deletion order (its own seed per
    fold). Its overlay shows one draw of noise. Rows carry ``fold`` (an int, or ``"ensemble"``); localisation
    columns are NaN when the case has no lesion in the input. ``per_fold_deletion=False`` scores each fold's map
    on localisation only (its deletion columns NaN): the per-fold deletion curves are half of all forward passes.
    """
    ens_prob = ensemble_prob(explainers)
    p = float(ens_prob(x)[0])
    shape = tuple(x.shape[-2:])
    maps: dict[str, np.ndarray] = {}
    curves: dict[str, np.ndarray] = {}
    rows: list[dict] = []
    for method in [*methods, "random"]:
        if method == "random":
            maps[method] = random_map(shape, seed)
            mean, per_model = np.ones(shape, np.float32), np.ones((len(explainers), *shape), np.float32)
        else:
            mean, per_model = ensemble_map(explainers, x, method)
            maps[method] = mean
        targets = [("ensemble", mean, ens_prob, seed)]
        if per_fold:
            targets += [(k, per_model[k], explainers[k].prob, seed + 7919 * (k + 1)) for k in range(len(explainers))]
        for fold, sal, fn, tie_seed in targets:
            deletion = fold == "ensemble" or per_fold_deletion
            scores, curve = score_map(fn, x, sal, lesion, tolerance, n_steps, baseline, tie_seed, deletion)
            rows.append({"sample_id": sample_id, "method": method, "fold": fold, "prob": p, **scores})
            if fold == "ensemble":
                curves[method] = curve
    return CaseResult(sample_id, x[0].detach().cpu().numpy(), lesion, p, maps, rows, curves)


def _explain_cases(explainers: Sequence[Explainer], xs: Tensor, lesions: Sequence[np.ndarray | None],
                   sample_ids: Sequence[str], threads: int, kw: dict,
                   overlay_dir: Path | None = None) -> list[CaseResult]:
    """``explain_case`` for a share of the cases, each case's overlay PNG written where it was computed (runs in
    a worker process)."""
    if threads:
        torch.set_num_threads(threads)
    results = []
    for i in range(len(xs)):
        res = explain_case(explainers, xs[i:i + 1], lesions[i], str(sample_ids[i]), **kw)
        if overlay_dir is not None:
            save_overlay(overlay_dir / f"{res.sample_id}.png", res, [*kw.get("methods", ("gradcam",)), "random"])
        results.append(res)
    return results


def explain_batch(explainers: Sequence[Explainer], xs: Tensor, lesions: Sequence[np.ndarray | None],
                  sample_ids: Sequence[str], progress: bool = True, workers: int | None = None,
                  overlay_dir: str | Path | None = None, **kw) -> tuple[pd.DataFrame, list[CaseResult]]:
    """``explain_case`` over many images; returns (metrics table, per-case results in input order).

    Cases are independent, so they are shared out to ``workers`` processes (default: one per granted
    core, ``lib.resources.workers``) in interleaved chunks; every case is seeded by its own arguments, so the numbers do
    not depend on the number of workers. ``overlay_dir``: each case's ``save_overlay`` PNG
    (``<sample_id>.png``, every method and the random map), drawn by the worker that explained it.
    """
    from lib import resources

    n = len(xs)
    workers = resources.workers(limit=n) if workers is None else max(1, min(workers, n))
    pool, threads = ((None, 0) if next(explainers[0].model.parameters()).is_cuda
                     else resources.worker_pool(n, "lib.explain", "monai.visualize", n_workers=workers))
    overlay_dir = None if overlay_dir is None else Path(overlay_dir)
    if pool is None:
        results = [_explain_cases(explainers, xs[i:i + 1], lesions[i:i + 1], [sample_ids[i]], 0, kw, overlay_dir)[0]
                   for i in tqdm(range(n), desc="explain", disable=not progress)]
    else:
        shares = [list(range(w, n, workers)) for w in range(workers)]
        with pool:
            futures = [pool.submit(_explain_cases, list(explainers), xs[idx], [lesions[i] for i in idx],
                                   [sample_ids[i] for i in idx], threads, kw, overlay_dir) for idx in shares]
            by_index = {i: r for idx, f in zip(shares, futures, strict=True) for i, r in zip(idx, f.result(),
                                                                                           strict=True)}
        results = [by_index[i] for i in range(n)]
    table = pd.DataFrame([r for res in results for r in res.rows])
    return table, results


def called_positive(table: pd.DataFrame, threshold: float = 0.5) -> pd.Series:
    """Rows whose explained model calls the input positive (its own probability ``prob_start``): where deletion
    is scored."""
    return table["prob_start"] >= threshold


def summarise(table: pd.DataFrame, by: Sequence[str] = ("method", "fold"), threshold: float = 0.5) -> pd.DataFrame:
    """Per method (and fold): pointing-game hit rate, mean energy inside, mean deletion AUC, counts of
    scored / lesion-free / all-zero maps. NaNs (no lesion, zero map) are left out of the means.

    ``deletion_auc_predicted`` (and ``n_predicted``) averages the deletion AUC over the inputs the explained model
    itself calls positive (its probability ``prob_start`` >= ``threshold``), the usual protocol (Petsiuk et al.
    2018, Samek et al. 2017): only there is there evidence to remove. On an input the model calls negative the
    curve starts near zero and can only measure whether the deleted patches *add* evidence (an artefact of the
    fill), which says nothing about the map. ``deletion_auc`` keeps every input.
    """
    predicted = table["deletion_auc"].where(called_positive(table, threshold))
    t = table.assign(fold=table["fold"].astype(str), deletion_auc_predicted=predicted)
    g = t.groupby(list(by), sort=False)
    out = g.agg(n=("sample_id", "size"), n_localised=("pointing", "count"), pointing=("pointing", "mean"),
                energy_inside=("energy_inside", "mean"), deletion_auc=("deletion_auc", "mean"),
                n_predicted=("deletion_auc_predicted", "count"),
                deletion_auc_predicted=("deletion_auc_predicted", "mean"), zero_maps=("zero_map", "sum"))
    return out.reset_index()


# ----------------------------------------------------------------------------- figures


def display_slice(image: np.ndarray, lesion: np.ndarray | None = None) -> np.ndarray:
    """The 2D picture under an overlay: for a 2.5D input the slice where the lesion stands out most from
    the rest of the image (the 2D lesion mask does not say which slice holds it), else the middle slice."""
    image = np.asarray(image)
    if image.ndim == 2:
        return image
    if lesion is not None and np.asarray(lesion).any():
        inside = np.asarray(lesion) > 0
        contrast = [abs(float(c[inside].mean()) - float(np.median(c))) for c in image]
        return image[int(np.argmax(contrast))]
    return image[len(image) // 2]


def overlay(image: np.ndarray, saliency: np.ndarray, lesion: np.ndarray | None = None, title: str = "",
            ax: plt.Axes | None = None, alpha: float = 0.45, cmap: str = "jet", colorbar: bool = True) -> plt.Axes:
    """Image in grey, map in colour (with a colour bar), lesion outline in white."""
    if ax is None:
        _, ax = plt.subplots(figsize=(3.4, 3))
    ax.imshow(display_slice(image, lesion), cmap="gray")
    s = np.asarray(saliency, dtype=np.float32)
    im = ax.imshow(s, cmap=cmap, alpha=alpha, vmin=min(0.0, float(np.nanmin(s))), vmax=max(float(np.nanmax(s)), 1e-6))
    if lesion is not None and np.asarray(lesion).any():
        ax.contour(np.asarray(lesion).astype(float), levels=[0.5], colors="white", linewidths=0.8)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return ax


def save_overlay(path: str | Path, result: CaseResult, methods: Sequence[str] | None = None, dpi: int = 110) -> Path:
    """One PNG per case: every method's ensemble map over the image, each with a colour bar."""
    methods = list(methods or result.maps)
    fig, axes = plt.subplots(1, len(methods), figsize=(3.4 * len(methods), 3.1), squeeze=False)
    for ax, m in zip(axes[0], methods, strict=True):
        overlay(result.image, result.maps[m], result.lesion, f"{result.sample_id} {m} p={result.prob:.2f}", ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def gallery(groups: dict[str, Sequence[CaseResult]], method: str = "gradcam", ncols: int = 4) -> plt.Figure:
    """Rows of cases per group (e.g. TP / FP / FN), one overlay each; empty groups say so."""
    names = list(groups)
    fig, axes = plt.subplots(len(names), ncols, figsize=(3.2 * ncols, 3.0 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        cases = list(groups[name])[:ncols]
        for c in range(ncols):
            ax = axes[r, c]
            if c < len(cases):
                res = cases[c]
                overlay(res.image, res.maps[method], res.lesion, f"{name} {res.sample_id} p={res.prob:.2f}", ax=ax)
            else:
                ax.axis("off")
                if c == 0:
                    ax.text(0.5, 0.5, f"{name}: no cases", ha="center", va="center")
    fig.suptitle(f"{method} (ensemble mean); white = lesion outline")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- checkpoints and cases (notebook 05)


def load_ensemble(paths: Sequence[str | Path], device: str = "cpu") -> tuple[list[nn.Module], dict]:
    """Fold models and their shared recipe; folds trained on different inputs or labels are an error."""
    from lib.io import DataError
    from lib.models import load_checkpoint

    if not paths:
        raise DataError("kfold", "no fold checkpoints given")
    models, metas = zip(*(load_checkpoint(p, device) for p in paths), strict=True)
    keys = ("model_name", "in_chans", "num_classes", "task", "label_names", "preprocessing")
    for p, m in zip(paths[1:], metas[1:], strict=True):
        diff = [k for k in keys if m.get(k) != metas[0].get(k)]
        if diff:
            raise DataError(p, f"fold checkpoint differs from {paths[0]} in {diff}: not one ensemble")
    return list(models), dict(metas[0])


def class_index(meta: dict, label: str | None = None) -> int:
    """Output to explain: ``label`` by name, else the only output (binary) or output 1 (two-class softmax)."""
    names = list(meta.get("label_names") or [])
    if label is not None:
        if label not in names:
            raise ValueError(f"label {label!r} not among the model's outputs {names}")
        return names.index(label) if meta.get("task") != "binary" else 0
    if meta.get("task") == "multiclass" and int(meta.get("num_classes", 1)) == 2:
        return 1
    return 0


def lesion_input(lesion: np.ndarray, mask: np.ndarray | None, prep: dict, threshold: float = 0.3) -> np.ndarray:
    """A crop's lesion mask ``(S, H, W)`` put through the model's own input transform, as one 2D mask.

    The same slice choice and resize as the image (``datasets.crop_to_input``), then any slice (channel)
    with lesion counts: the 2D map of a 2.5D input is shared by all its slices. Resizing blurs small
    lesions, hence a threshold below one half.
    """
    from lib.datasets import crop_to_input

    arr = crop_to_input(np.asarray(lesion, dtype=np.float32) > 0, mask, prep.get("kind", "slab"),
                        int(prep.get("n_slices", 8)), int(prep.get("size", 64)), prep.get("mask_mode", "none"))
    return (arr > threshold).any(0)


def read_lesion(path: str | Path) -> np.ndarray | None:
    """The ``lesion`` array of a crop ``.npz``, or None when the crop has none (real data)."""
    with np.load(path) as z:
        return np.asarray(z["lesion"]) if "lesion" in z.files else None


def crop_lesions(crops_dir: str | Path, table: pd.DataFrame, prep: dict) -> list[np.ndarray | None]:
    """2D lesion masks matching each row's model input (None where the crop has no lesion array)."""
    from lib.datasets import read_crop

    out: list[np.ndarray | None] = []
    for rel in table["path"]:
        path = Path(crops_dir) / rel
        lesion = read_lesion(path)
        _, mask = read_crop(path)
        out.append(None if lesion is None else lesion_input(lesion, mask, prep))
    return out


def outcomes(truth: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """TP / FP / FN / TN per case (truth 1/0, predicted = prob >= threshold)."""
    truth = np.asarray(truth).astype(bool)
    pred = np.asarray(prob) >= threshold
    return np.select([truth & pred, ~truth & pred, truth & ~pred], ["TP", "FP", "FN"], "TN")


def pick_cases(groups: np.ndarray, n_cases: int, seed: int, order: Sequence[str] = ("TP", "FN", "FP", "TN")
               ) -> np.ndarray:
    """Up to ``n_cases`` row indices, taken in turn from each outcome group (shuffled with ``seed``), so
    the gallery has errors as well as successes."""
    rng = np.random.default_rng(seed)
    pools = {g: list(rng.permutation(np.flatnonzero(groups == g))) for g in order}
    picked: list[int] = []
    while len(picked) < n_cases and any(pools.values()):
        for g in order:
            if pools[g] and len(picked) < n_cases:
                picked.append(int(pools[g].pop(0)))
    return np.array(sorted(picked), dtype=int)


@dataclass
class Cases:
    """Inputs the ensemble is explained on: ``x`` (N, C, H, W), a table (``sample_id`` = study + structure,
    ``case_id``, ``truth``, ``prob``, ``outcome``, ...) and 2D lesion masks (None where unknown), all row-aligned."""

    x: Tensor
    table: pd.DataFrame
    lesions: list[np.ndarray | None]

    def take(self, idx: Sequence[int]) -> Cases:
        idx = list(idx)
        return Cases(self.x[idx], self.table.iloc[idx].reset_index(drop=True), [self.lesions[i] for i in idx])


def synthetic_cases(run_dir: str | Path, meta: dict, profile: str, seed: int, class_idx: int = 0,
                    crops_dir: str | Path | None = None, crop_mode: str | None = "bbox") -> Cases:
    """Crops of the synthetic cohort as the models saw them, with ground-truth labels and lesion masks.

    Inputs are rebuilt from the checkpoint's ``preprocessing`` by ``datasets.crop_dataset`` (the training
    code), labels are the cohort's ground truth (not the report labels) for output ``class_idx``. The ensemble's
    probabilities come from :func:`score_cases`, once the cases are narrowed down (:func:`case_subset`).
    """
    from lib import datasets

    crops_dir = Path(crops_dir) if crops_dir else Path(run_dir) / "crops"
    if not (crops_dir / "index.csv").exists():
        from lib import crop

        crop.ensure_crops(run_dir, profile, seed)
    truth = datasets.load_labels("truth", cohort_dir=datasets.locate("synthetic-ct", profile, seed)[1])
    return crop_cases(crops_dir, truth, meta, class_idx, crop_mode)


def crop_cases(crops_dir: str | Path, labels: pd.DataFrame, meta: dict, class_idx: int = 0,
               crop_mode: str | None = "bbox") -> Cases:
    """Organ crops in ``crops_dir`` as the models saw them, with ``labels`` (study_id + label columns: the
    synthetic ground truth, or on an own cohort the report labels) for output ``class_idx``, and the crops'
    lesion masks where present (none: maps are scored by deletion only)."""
    from lib import datasets

    prep = dict(meta.get("preprocessing") or {})
    crops_dir = Path(crops_dir)
    cols = prep.get("label_cols") or list(meta.get("label_names") or [])
    cols = cols if isinstance(cols, str) else list(cols)  # a "{organ}_abnormal" template stays a string
    ds = datasets.crop_dataset(crops_dir, labels, cols, organ=prep.get("organ"), task=meta["task"],
                               kind=prep.get("kind", "slab"), n_slices=int(prep.get("n_slices", 8)),
                               size=int(prep.get("size", 64)), mask_mode=prep.get("mask_mode", "none"),
                               uncertain=prep.get("uncertain", "ignore"), mode=crop_mode)
    y = ds.y.numpy()
    truth_k = (y == class_idx) if meta["task"] == "multiclass" else y.reshape(len(y), -1)[:, class_idx]
    table = ds.table.assign(truth=truth_k.astype(int))
    sample = table["case_id"].astype(str) + "_" + table["structure"].astype(str)
    dup = sample.groupby(sample).cumcount()
    table.insert(0, "sample_id", sample.where(dup == 0, sample + "_" + dup.astype(str)))
    lesions = crop_lesions(crops_dir, table, prep)
    table["lesion_pixels"] = [int(les.sum()) if les is not None else 0 for les in lesions]
    return Cases(ds.x, table, lesions)


def image_cases(source: str | Path, meta: dict, class_idx: int = 0) -> Cases:
    """Images of a class-per-folder 2D set (``<source>/[<split>/]<class>/<image>``) as the models saw them.

    Inputs are read by ``lib.imageio.load_input`` with the checkpoint's preprocessing (the training loader),
    truth is the class folder (whether it is output ``class_idx``'s class), and there are no lesion masks: maps
    are scored by deletion only (pointing and energy stay NaN). Probabilities: :func:`score_cases`.
    """
    from lib import imageio, splits
    from lib.io import DataError

    prep = dict(meta.get("preprocessing") or {})
    files = splits.scan_images(source)
    if files.empty:
        raise DataError(source, "no images in class sub-folders")
    names = list(meta.get("label_names") or [])
    positive = names[class_idx] if meta["task"] == "multiclass" else names[-1]
    xs, rows = [], []
    for rec in files.to_dict("records"):
        try:
            xs.append(imageio.load_input(rec["path"], prep))
        except DataError:
            continue  # unreadable: the training dataset skipped it as well
        rows.append({"case_id": f"{rec['label']}/{Path(rec['path']).name}", "organ": rec["label"],
                     "truth": int(rec["label"] == positive), "path": str(rec["path"])})
    if not xs:
        raise DataError(source, "no readable images")
    x = torch.from_numpy(np.stack(xs))
    table = pd.DataFrame(rows).assign(lesion_pixels=0)
    table.insert(0, "sample_id", table["case_id"])
    return Cases(x, table, [None] * len(table))


def score_cases(cases: Cases, explainers: Sequence[Explainer], threshold: float = 0.5, batch: int = 64) -> Cases:
    """The cases with the ensemble's probability and their outcome (TP/FP/FN/TN at ``threshold``) added; run it
    after :func:`case_subset`, so only the cases that can be explained are predicted."""
    prob = np.concatenate([ensemble_prob(explainers)(cases.x[i:i + batch]) for i in range(0, len(cases.x), batch)])
    truth = cases.table["truth"].to_numpy().astype(bool)
    table = cases.table.assign(prob=prob, outcome=outcomes(truth, prob, threshold))
    return Cases(cases.x, table, cases.lesions)


SUBSETS = ("test", "all")


def case_subset(cases: Cases, subset: str, kfold_dir: str | Path) -> Cases:
    """``test``: only the studies notebook 04 held out from every fold (``test_predictions.csv``), so no model
    being explained was trained on them; ``all``: every crop (each fold model trained on most of them, so maps may
    show what it memorised). Grouped by study, like the split itself."""
    from lib.io import DataError

    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    if subset == "all":
        return cases
    path = Path(kfold_dir) / "test_predictions.csv"
    if not path.exists():
        raise DataError(path, "no held-out test predictions (notebook 04 with test_fraction > 0 writes them); "
                              "use subset='all' to explain every crop")
    test = set(pd.read_csv(path, usecols=["case_id"])["case_id"].astype(str))
    rows = np.flatnonzero(cases.table["case_id"].astype(str).isin(test))
    if not len(rows):
        raise DataError(path, f"none of its {len(test)} held-out case_ids is among the {len(cases.table)} crops")
    return cases.take(rows)


def curves_frame(results: Sequence[CaseResult]) -> pd.DataFrame:
    """Long table of the ensemble deletion curves: sample_id, method, fraction deleted, probability."""
    rows = []
    for r in results:
        for method, probs in r.curves.items():
            fr = np.linspace(0.0, 1.0, len(probs))
            rows += [{"sample_id": r.sample_id, "method": method, "fraction": f, "prob": p}
                     for f, p in zip(fr, probs, strict=True)]
    return pd.DataFrame(rows)


def gains(summary: pd.DataFrame, method: str = "gradcam", fold: str = "ensemble") -> dict[str, float]:
    """How much ``method`` beats the random map: pointing-game and energy gains (higher is better) and the
    deletion-AUC gain (random minus method: positive when the map finds what the model uses), on the inputs the
    model calls positive (``deletion_gain``, NaN when there are none) and on all inputs (``deletion_gain_all``)."""
    s = summary[summary["fold"].astype(str) == fold].set_index("method")

    def gain(col: str, sign: int = 1) -> float:
        return float(sign * (s.loc[method, col] - s.loc["random", col]))

    return {"pointing_gain": gain("pointing"), "energy_gain": gain("energy_inside"),
            "deletion_gain": gain("deletion_auc_predicted", -1), "deletion_gain_all": gain("deletion_auc", -1)}


def gain_intervals(table: pd.DataFrame, method: str = "gradcam", fold: str = "ensemble", threshold: float = 0.5,
                   n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Bootstrap intervals of the pointing-game and deletion gains over the random map, pairing each case's map
    with its own random baseline and resampling cases (what ``gains`` averages). With a few dozen cases a mean
    gain can be luck; the interval says how much. NaN bounds when no case can be scored."""
    from lib.metrics import bootstrap_weights

    t = table[table["fold"].astype(str) == fold].set_index("sample_id")
    own, rnd = t[t["method"] == method], t[t["method"] == "random"]
    paired = {"pointing_gain_ci": (own["pointing"] - rnd["pointing"]).dropna(),
              "deletion_gain_ci": (rnd["deletion_auc"] - own["deletion_auc"])[called_positive(own, threshold)]}
    out = {}
    for key, diff in paired.items():
        if diff.empty:
            out[key] = [float("nan")] * 2
            continue
        w = bootstrap_weights(np.zeros(len(diff)), n_boot, seed)
        means = w @ diff.to_numpy() / w.sum(1)
        out[key] = [float(q) for q in np.quantile(means, [(1 - level) / 2, (1 + level) / 2])]
    return out


def write_metrics_json(path: str | Path, summary: pd.DataFrame, randomisation: pd.DataFrame | None = None,
                       methods: Sequence[str] = METHODS, table: pd.DataFrame | None = None,
                       threshold: float = 0.5, seed: int = 0) -> dict:
    """Ensemble scores per method, gains over the random map (with bootstrap intervals when the per-case
    ``table`` is given) and the final randomisation correlations as JSON, so ``lib.pipeline.merge_metrics`` puts
    stage 05 in the run's ``metrics.json`` beside the other stages."""
    from lib.io import write_json

    ens = summary[summary["fold"].astype(str) == "ensemble"].set_index("method")
    cols = ["n", "n_localised", "pointing", "energy_inside", "deletion_auc", "n_predicted", "deletion_auc_predicted",
            "zero_maps"]
    out: dict = {"ensemble": {m: {c: _num(ens.loc[m, c]) for c in cols} for m in ens.index}}
    out["vs_random"] = {m: gains(summary, m) for m in methods if m in ens.index and "random" in ens.index}
    if table is not None:
        for m, g in out["vs_random"].items():
            g.update({k: [_num(v) for v in ci] for k, ci in gain_intervals(table, m, threshold=threshold,
                                                                          seed=seed).items()})
    if randomisation is not None and len(randomisation):
        for col in ("spearman", "spearman_support"):  # mean |Spearman| after full randomisation
            out[f"randomised_abs_{col}"] = {m: _num(v) for m, v in randomised_correlation(randomisation, col).items()}
    write_json(path, out)
    return out


def _num(v: object) -> float | None:
    """JSON-safe number: NaN -> None (a score that could not be computed, e.g. no localised case)."""
    v = float(v)
    return v if np.isfinite(v) else None
