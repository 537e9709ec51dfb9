"""Models by name (one factory over timm, MONAI, segmentation-models-pytorch and SliceMIL) and the checkpoint
format every later stage reads.

Why: training, k-fold, explanation and export all need to rebuild the same network from a file
alone, so a checkpoint carries the recipe (timm name, channels, classes, task, label names,
preprocessing) beside the weights. ``load_checkpoint`` is the only place that knows the format.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lib.io import DataError

# Small, BatchNorm-based, trains from scratch in minutes on CPU at 64-96 px
# (measured ~7 ms/image fwd+bwd at 8x64x64 on one core; mobilenetv3_small_050 is faster but less stable from scratch).
DEFAULT_MODEL = "resnet10t"

# Keys that make a checkpoint self-describing; everything else in the dict is training state.
META_KEYS = ("model_name", "in_chans", "num_classes", "task", "label_names", "preprocessing", "epoch", "metrics",
             "model_kwargs")
TRAIN_STATE_KEYS = ("state_dict", "optimizer", "scheduler", "scaler", "rng", "train_state", "ema")


#: Builders by family prefix (``<family>:<name>``); a name without a prefix is timm's. Each takes
#: ``(name, in_chans, num_classes, pretrained, **kw)`` and returns the network.
FAMILIES: dict[str, Callable[..., nn.Module]] = {}

#: Spellings that are not model names here, with the name to write instead (create_model's error says it).
RENAMED = {"monai-unet": "monai:UNet (with spatial_dims=2)",
           "monai-flexunet": "monai:FlexibleUNet (with spatial_dims=2)",
           **{arch: f"smp:{arch}-<encoder>, e.g. smp:{arch}-resnet18" for arch in
              ("fpn", "unet", "unetplusplus", "deeplabv3plus", "linknet", "pspnet", "manet")}}


def register_family(prefix: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model family (timm's ``register_model`` idea, one level up: families, not models)."""

    def add(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if prefix in FAMILIES:
            raise ValueError(f"model family {prefix!r} already registered")
        FAMILIES[prefix] = build
        return build

    return add


def parse_name(name: str) -> tuple[str, str]:
    """``(family, name inside the family)`` of a model name: ``timm:resnet10t`` and ``resnet10t`` -> timm;
    ``monai:resnet10``, ``smp:fpn-resnet18``, ``mil:resnet10t``. A renamed spelling is a ValueError naming the
    current one."""
    name = str(name).strip()
    if name in RENAMED:
        raise ValueError(f"{name!r} is not a model name: write {RENAMED[name]}")
    family, sep, rest = name.partition(":")
    if not sep:
        return "timm", name
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r} in {name!r}; families: "
                         f"{', '.join(f'{f}:<name>' for f in FAMILIES)} (a bare name is a timm model)")
    if not rest:
        raise ValueError(f"model name {name!r} has no network after {family!r}:")
    return family, rest


def create_model(name: str = DEFAULT_MODEL, in_chans: int = 1, num_classes: int = 1, pretrained: bool = False,
                 **kw: Any) -> nn.Module:
    """The one model factory: a network by name, with the input channels and outputs set from the data.

    * ``timm:<name>`` or a bare ``<name>``: any timm model (``pretrained=True`` asks the hub for weights and timm
      adapts the first conv to ``in_chans``);
    * ``mil:<timm name>``: that timm network as a :class:`SliceMIL` over the slices of a ``slab``/``25d`` input
      (``in_chans`` = slices);
    * ``monai:<net>``: a ``monai.networks.nets`` network (``resnet10``, ``DenseNet121``, ``UNet``,
      ``FlexibleUNet``...), 3D unless ``spatial_dims=2`` is given;
    * ``smp:<arch>[-<encoder>]``: a segmentation-models-pytorch network (``smp:fpn-resnet18``,
      ``smp:unet-tu-resnet10t``; the encoder may also be given as ``encoder=``, default ``resnet18``);
    * ``path/net.py:factory``: ``factory(in_chans=, num_classes=)`` from a user's file (``lib.recipes``).
    """
    from lib import recipes

    if recipes.is_model_file(name):  # "net.py:factory": a user's own network
        return recipes.model_from_file(name, in_chans, num_classes, **kw)
    family, arch = parse_name(name)
    return FAMILIES[family](arch, in_chans, num_classes, pretrained, **kw)


@register_family("timm")
def _timm_model(name: str, in_chans: int, num_classes: int, pretrained: bool = False, **kw: Any) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, in_chans=in_chans, num_classes=num_classes, **kw)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise ValueError(f"unknown timm model {name!r}: {exc}") from exc


@register_family("mil")
def _mil_model(name: str, in_chans: int, num_classes: int, pretrained: bool = False, **kw: Any) -> nn.Module:
    return SliceMIL(name, n_slices=in_chans, num_classes=num_classes, pretrained=pretrained, **kw)


#: Constructor defaults for MONAI networks whose architecture arguments have none.
MONAI_DEFAULTS: dict[str, dict[str, Any]] = {"UNet": {"channels": (16, 32, 64, 128), "strides": (2, 2, 2),
                                                      "num_res_units": 2},
                                             "FlexibleUNet": {"backbone": "resnet18"}}


@register_family("monai")
def _monai_model(name: str, in_chans: int, num_classes: int, pretrained: bool = False, spatial_dims: int = 3,
                 **kw: Any) -> nn.Module:
    """A ``monai.networks.nets`` network, randomly initialised; MONAI's constructors name channels/outputs in two
    ways."""
    import inspect

    from monai.networks import nets

    build = getattr(nets, name, None)
    if build is None or not callable(build):
        raise ValueError(f"unknown MONAI network {name!r} (a name in monai.networks.nets, e.g. resnet10, UNet)")
    if pretrained:
        raise ValueError(f"monai:{name}: no pretrained weights here (use a timm model for pretrained=True)")
    params = inspect.signature(build).parameters
    if "in_channels" in params and "out_channels" in params:  # DenseNet, UNet and similar
        args = {"in_channels": in_chans, "out_channels": num_classes}
    else:  # ResNet family (resnet10(**kwargs) -> ResNet(n_input_channels, num_classes))
        args = {"n_input_channels": in_chans, "num_classes": num_classes}
    kw = {**MONAI_DEFAULTS.get(name, {}), **kw}
    return build(spatial_dims=spatial_dims, **args, **kw)


@register_family("smp")
def _smp_model(name: str, in_chans: int, num_classes: int, pretrained: bool = False, encoder: str | None = None,
               **kw: Any) -> nn.Module:
    """``<arch>[-<encoder>]``: smp architectures have no hyphen, so the first one starts the encoder name."""
    import segmentation_models_pytorch as smp

    arch, _, suffix = name.partition("-")
    if suffix and encoder and suffix != encoder:
        raise ValueError(f"smp:{name}: encoder {suffix!r} in the name and encoder={encoder!r} disagree")
    archs = sorted(smp.MODEL_ARCHITECTURES_MAPPING)
    if arch.lower() not in archs:
        raise ValueError(f"unknown segmentation-models-pytorch architecture {arch!r}; choose from {archs}")
    return smp.create_model(arch.lower(), encoder_name=suffix or encoder or "resnet18",
                            encoder_weights="imagenet" if pretrained else None, in_channels=in_chans,
                            classes=num_classes, **kw)


class SliceMIL(nn.Module):
    """One 2D timm network applied to every slice of a ``(B, S, H, W)`` stack, slice features max-pooled.

    Why: a study label says the organ is abnormal, not on which slice. Stacking slices as channels gives each
    slice its own first-layer filters and a from-scratch network fails to learn small focal lesions from ~100
    studies; a shared per-slice network sees S times as many examples, and max pooling (multiple-instance
    learning) lets one abnormal slice make the study positive. ``global_pool`` pools space inside each slice
    (``avgmax`` keeps small lesions visible); ``pool`` pools slices (``max`` or ``mean``).
    """

    def __init__(self, backbone: str = DEFAULT_MODEL, n_slices: int = 8, num_classes: int = 1, pretrained: bool = False,
                 pool: str = "max", global_pool: str = "avgmax", **kw: Any) -> None:
        import timm

        super().__init__()
        if pool not in ("max", "mean"):
            raise ValueError(f"slice pooling must be 'max' or 'mean', got {pool!r}")
        try:
            self.backbone = timm.create_model(backbone, pretrained=pretrained, in_chans=1, num_classes=0,
                                              global_pool=global_pool, **kw)
        except RuntimeError as exc:
            raise ValueError(f"unknown timm model {backbone!r}: {exc}") from exc
        self.n_slices, self.pool = int(n_slices), pool
        self.head = nn.Linear(self.backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.shape[0], x.shape[1]
        feats = self.backbone(x.reshape(b * s, 1, x.shape[2], x.shape[3])).reshape(b, s, -1)
        pooled = feats.amax(dim=1) if self.pool == "max" else feats.mean(dim=1)
        return self.head(pooled)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def checkpoint_meta(model_name: str, in_chans: int, num_classes: int, task: str,
                    label_names: list[str] | None = None, preprocessing: dict | None = None,
                    **model_kwargs: Any) -> dict:
    """The recipe part of a checkpoint (what ``fit`` takes as ``meta``)."""
    if task not in ("binary", "multiclass", "multilabel", "segmentation"):
        raise ValueError(f"task must be binary|multiclass|multilabel|segmentation, got {task!r}")
    return {"model_name": model_name, "in_chans": int(in_chans), "num_classes": int(num_classes), "task": task,
            "label_names": list(label_names or []), "preprocessing": dict(preprocessing or {}),
            "model_kwargs": dict(model_kwargs)}


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict, **state: Any) -> Path:
    """Write ``meta`` + weights (+ optional training state) atomically, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**{k: v for k, v in meta.items() if k not in TRAIN_STATE_KEYS},
               "state_dict": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, **state}
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict (weights on CPU), with a clear error for missing or corrupt files."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle/zip errors of many kinds
        raise DataError(path, f"unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in ("model_name", "in_chans", "num_classes", "state_dict") if k not in ckpt]
    if missing:
        raise DataError(path, f"not a mednb checkpoint (missing {missing})")
    return ckpt


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    builder: Callable[..., nn.Module] | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights; returns ``(model.eval(), meta)``.

    ``builder(name, in_chans, num_classes, **model_kwargs)`` overrides ``create_model`` for non-timm
    networks (e.g. segmentation models).
    """
    ckpt = read_checkpoint(path)
    build = builder or create_model
    model = build(ckpt["model_name"], in_chans=ckpt["in_chans"], num_classes=ckpt["num_classes"],
                  **ckpt.get("model_kwargs", {}))
    model.load_state_dict(ckpt["state_dict"])
    meta = {k: v for k, v in ckpt.items() if k not in TRAIN_STATE_KEYS}
    model = model.to(device).eval()
    to_channels_last(model)
    return model, meta


def inference_model(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A forward-only copy of ``model`` for scoring many inputs shaped like ``example``, on CPU: traced and
    optimised by TorchScript (BatchNorm folded into the convolutions, oneDNN kernels), about 1.4x faster than
    eager for the k-fold CNN. Outputs equal the model's up to float rounding; it has no gradients or hooks and
    does not follow later changes to the weights, so Grad-CAM and training keep the eager model. Building it
    costs about as much as 100 forward passes, so it pays off for occlusion and deletion curves, not one batch.
    On a GPU, or for a network that cannot be traced, the model itself is returned.
    """
    if example.device.type != "cpu":
        return model
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(copy.deepcopy(model).eval(), example, check_trace=False)
            return torch.jit.optimize_for_inference(traced)
    except (RuntimeError, TypeError, ValueError):  # data-dependent control flow, non-tensor outputs...
        return model


def to_channels_last(model: nn.Module) -> bool:
    """Store a 2D network's weights channels-last (in place); returns whether it did (3D networks stay NCHW).

    Why: oneDNN on CPU (and cuDNN with AMP) run small 2D convolutions and max pooling fastest in this layout;
    a model loaded for inference (k-fold predictions, explanations, export) is ~1.7x faster on CPU than in
    NCHW. Outputs are the same up to float rounding.
    """
    if any(p.dim() == 5 for p in model.parameters()):
        return False
    model.to(memory_format=torch.channels_last)
    return True
