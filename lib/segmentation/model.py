"""Segmentation networks by name and their losses.

MONAI networks come from the repository's model factory ``lib.models.create_model`` (``monai:<class>``, here 2D);
``segmentation_models_pytorch`` architectures (``fpn``, ``unet``, ... with any smp or ``tu-<timm>`` encoder) are
built here. ``build_model`` has ``lib.models.load_checkpoint``'s ``builder`` signature, so a checkpoint rebuilds
its network from the recipe alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

SMP_ARCHS = ("fpn", "unet", "unetplusplus", "deeplabv3plus", "linknet", "pspnet", "manet")
MONAI_ARCHS = ("monai-unet", "monai-flexunet")
DEFAULT_MODEL, DEFAULT_ENCODER = "fpn", "resnet18"
LOSSES = ("dicece", "dice+bce", "dicefocal", "bce")


def build_model(name: str = DEFAULT_MODEL, in_chans: int = 1, num_classes: int = 1, encoder: str = DEFAULT_ENCODER,
                pretrained: bool = False, **kw: Any) -> nn.Module:
    """A 2D segmentation network by name: smp architectures (``fpn``, ``unet``, ...; encoder = smp name or
    ``tu-<timm name>``) or ``monai-unet`` / ``monai-flexunet`` (MONAI ``UNet`` / ``FlexibleUNet`` through
    ``lib.models.create_model``)."""
    if name in SMP_ARCHS:
        import segmentation_models_pytorch as smp

        return smp.create_model(name, encoder_name=encoder, encoder_weights="imagenet" if pretrained else None,
                                in_channels=in_chans, classes=num_classes, **kw)
    from lib.models import create_model

    if name == "monai-unet":
        return create_model("monai:UNet", in_chans, num_classes, spatial_dims=2,
                            channels=tuple(kw.get("channels", (16, 32, 64, 128))), strides=(2, 2, 2),
                            num_res_units=int(kw.get("num_res_units", 2)))
    if name == "monai-flexunet":
        backbone = encoder if encoder.startswith(("efficientnet", "resnet")) else "resnet18"
        return create_model("monai:FlexibleUNet", in_chans, num_classes, pretrained, spatial_dims=2,
                            backbone=backbone)
    raise ValueError(f"model must be one of {SMP_ARCHS + MONAI_ARCHS}, got {name!r}")


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
