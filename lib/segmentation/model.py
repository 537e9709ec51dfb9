"""Segmentation networks by name and their losses.

Networks come from the repository's one model factory ``lib.models.create_model``, in its one name syntax:
``smp:<arch>-<encoder>`` (segmentation-models-pytorch, e.g. ``smp:fpn-resnet18``, ``smp:unet-tu-resnet10t``) or
``monai:<net>`` (a 2D MONAI network, e.g. ``monai:UNet``, ``monai:FlexibleUNet``). ``build_model`` has
``lib.models.load_checkpoint``'s ``builder`` signature, so a checkpoint rebuilds its network from the recipe alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_SEGMENTER = "smp:fpn-resnet18"
LOSSES = ("dicece", "dice+bce", "dicefocal", "bce")


def network_kwargs(name: str) -> dict[str, Any]:
    """Constructor keywords a segmentation network needs beyond ``create_model``'s defaults (MONAI nets are 3D
    unless told): stored in the checkpoint so ``lib.models.load_checkpoint`` rebuilds the same 2D network."""
    from lib.models import parse_name

    family, _ = parse_name(name)
    if family not in ("smp", "monai"):
        raise ValueError(f"{name!r} is not a segmentation network: write smp:<arch>-<encoder> (e.g. "
                         "smp:fpn-resnet18) or monai:<net> (e.g. monai:UNet, monai:FlexibleUNet)")
    return {"spatial_dims": 2} if family == "monai" else {}


def build_model(name: str = DEFAULT_SEGMENTER, in_chans: int = 1, num_classes: int = 1, pretrained: bool = False,
                **kw: Any) -> nn.Module:
    """A 2D segmentation network by its ``lib.models`` name (``smp:...`` or ``monai:...``)."""
    from lib.models import create_model

    return create_model(name, in_chans, num_classes, pretrained, **{**network_kwargs(name), **kw})


def init_output_bias(model: nn.Module, foreground: float) -> float:
    """Set the bias of the network's output convolution to the log-odds of the foreground fraction (the prior
    initialisation of focal-loss detectors); returns that bias.

    Why: from a zero bias every pixel starts at probability 0.5, the BCE term then spends most of a short
    schedule lowering the background (Adam moves the bias about ``lr`` per step) before the Dice term takes
    over, and whether the lesions cross the 0.5 threshold by the last epoch is down to chance: on the demo TRUS
    set two of four folds still predicted empty masks everywhere at their last epoch.
    """
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Conv3d))
             and m.out_channels == 1 and m.bias is not None]
    if not convs:
        raise ValueError(f"{type(model).__name__}: no one-channel output convolution with a bias to initialise")
    p = min(max(float(foreground), 1e-4), 0.5)
    bias = math.log(p / (1 - p))
    with torch.no_grad():
        convs[-1].bias.fill_(bias)
    return bias


def make_seg_loss(name: str = "dicece") -> Callable[[Tensor, Tensor], Tensor]:
    """Binary segmentation loss on logits: MONAI ``DiceCELoss`` (Dice + BCE), smp Dice + soft BCE, Dice + focal.

    Dice terms are computed over the whole batch (MONAI ``batch=True``, smp's default): with per-image Dice,
    small lesions and lesion-free images made the network collapse to empty masks on the demo sets.
    """
    if name == "dicece":
        from monai.losses import DiceCELoss

        loss = DiceCELoss(sigmoid=True, batch=True)  # batch Dice: lesion-free images do not pull towards empty
    elif name == "dice+bce":
        import segmentation_models_pytorch as smp

        dice, bce = smp.losses.DiceLoss("binary", from_logits=True), smp.losses.SoftBCEWithLogitsLoss()
        loss = lambda logits, y: dice(logits, y) + bce(logits, y)
    elif name == "dicefocal":
        from monai.losses import DiceFocalLoss

        loss = DiceFocalLoss(sigmoid=True, batch=True)
    elif name == "bce":
        loss = nn.BCEWithLogitsLoss()
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    return lambda logits, targets: loss(logits.float(), targets.float())
