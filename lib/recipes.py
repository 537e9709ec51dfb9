"""Training knobs by name: losses, composable augmentation flags, and models from a user's own ``.py`` file.

Why: a study changes the loss (focal for rare findings, label smoothing for noisy report labels), picks
augmentations one by one (an inverted or equalised MRI is plausible, a flipped chest X-ray's heart is not) or
brings its own network, without editing the training loop. Each name maps onto a maintained implementation
(PyTorch losses, torchvision's focal loss, MONAI's focal loss and transforms).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import Tensor, nn

#: Loss names (``auto``: the task's default, BCE or cross-entropy with imbalance weights).
CLASSIFIER_LOSSES = ("auto", "cross-entropy", "bce", "focal", "label-smoothing")
_ALIASES = {"ce": "cross-entropy", "crossentropy": "cross-entropy", "cross_entropy": "cross-entropy",
            "label_smoothing": "label-smoothing", "smoothing": "label-smoothing", "focal_loss": "focal"}
#: Label smoothing factor of the ``label-smoothing`` loss.
SMOOTHING = 0.1
#: Focusing parameter of the ``focal`` loss.
FOCAL_GAMMA = 2.0

#: Augmentation flags, composable as ``"flip+rotate+contrast"`` (or a list); presets stay in ``lib.datasets``.
AUGMENT_FLAGS = ("flip", "rotate", "brightness", "contrast", "sharpness", "equalize", "invert")
PRESETS = ("none", "light", "medium", "elastic")


def loss_name(name: str) -> str:
    """The canonical loss name, or a ValueError listing the choices."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in CLASSIFIER_LOSSES:
        raise ValueError(f"loss must be one of {', '.join(CLASSIFIER_LOSSES)}, got {name!r}")
    return key


def named_loss(name: str, task: str, weight: Tensor | None = None, uncertain: str = "ignore"
               ) -> Callable[[Tensor, Tensor], Tensor] | None:
    """The loss ``name`` for ``task`` (None for ``auto``: the caller keeps its default).

    ``weight``: class weights (multiclass) or ``pos_weight`` (binary/multilabel) from the training rows. Binary
    and multilabel losses skip missing and (policy ``ignore``) uncertain targets, like the default loss.
    """
    from lib.train import apply_uncertain_policy

    name = loss_name(name)
    if name == "auto":
        return None
    if task == "multiclass":
        if name == "bce":
            raise ValueError("loss 'bce' is for binary/multilabel tasks; multiclass uses cross-entropy or focal")
        if name == "focal":
            from monai.losses import FocalLoss

            focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=FOCAL_GAMMA,
                              weight=weight if weight is not None else None)

            def multiclass_focal(logits: Tensor, targets: Tensor) -> Tensor:
                focal.to(logits.device)
                return focal(logits.float(), targets.long().view(-1, 1))

            return multiclass_focal
        ce = nn.CrossEntropyLoss(weight=weight, label_smoothing=SMOOTHING if name == "label-smoothing" else 0.0)

        def multiclass_ce(logits: Tensor, targets: Tensor) -> Tensor:
            ce.to(logits.device)
            return ce(logits.float(), targets.long().view(-1))

        return multiclass_ce
    if name == "cross-entropy":
        name = "bce"  # one output per label: cross-entropy is the binary one

    def masked(logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float().reshape(len(logits), -1)
        y, valid = apply_uncertain_policy(targets.reshape(len(targets), -1).to(logits.device), uncertain)
        if name == "focal":
            from torchvision.ops import sigmoid_focal_loss

            per = sigmoid_focal_loss(logits, y, alpha=-1, gamma=FOCAL_GAMMA, reduction="none")
        else:
            if name == "label-smoothing":
                y = y * (1 - SMOOTHING) + SMOOTHING / 2
            pw = weight.to(logits.device) if weight is not None else None
            per = nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=pw, reduction="none")
        valid = valid.float()
        return (per * valid).sum() / valid.sum().clamp(min=1)

    return masked


def augment_flags(spec: str | Sequence[str] | None) -> list[str] | None:
    """The flags of ``spec`` (``"flip+invert"``, ``["flip", "invert"]``), or None when ``spec`` is a preset."""
    if spec is None or (isinstance(spec, str) and spec in PRESETS):
        return None
    flags = [f.strip().lower() for f in (spec.replace(",", "+").split("+") if isinstance(spec, str) else spec)]
    flags = [f for f in flags if f]
    unknown = sorted(set(flags) - set(AUGMENT_FLAGS))
    if unknown or not flags:
        raise ValueError(f"augment must be a preset ({', '.join(PRESETS)}) or flags joined by '+' from "
                         f"{', '.join(AUGMENT_FLAGS)}; unknown {unknown or spec!r}")
    return list(dict.fromkeys(flags))


def _invert(x: Tensor) -> Tensor:
    """Intensity inversion of an input scaled to [0, 1] (module-level: DataLoader workers pickle transforms)."""
    return 1.0 - x


def build_augment(spec: str | Sequence[str] | None = "light", spatial_dims: int = 2, seed: int = 0
                 ) -> Callable | None:
    """A preset (``lib.datasets.make_augment``) or a composition of flags, each applied with probability 0.5
    (flip, rotate +-0.2 rad, brightness shift, contrast gamma, Gaussian sharpening, histogram equalisation,
    inversion), as seeded MONAI transforms on plain tensors."""
    from lib import datasets

    flags = augment_flags(spec)
    if flags is None:
        return datasets.make_augment(spec, spatial_dims, seed)
    from monai import transforms as mt

    build = {
        "flip": lambda: mt.RandFlip(prob=0.5, spatial_axis=spatial_dims - 1),
        "rotate": lambda: (mt.RandRotate(range_x=0.2, prob=0.5, padding_mode="zeros") if spatial_dims == 2
                           else mt.RandRotate(range_z=0.2, prob=0.5, padding_mode="zeros")),
        "brightness": lambda: mt.RandShiftIntensity(offsets=0.1, prob=0.5),
        "contrast": lambda: mt.RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5)),
        "sharpness": lambda: mt.RandGaussianSharpen(prob=0.5),
        "equalize": lambda: mt.RandLambda(func=mt.HistogramNormalize(num_bins=256, min=0, max=1), prob=0.5,
                                                   track_meta=False),
        "invert": lambda: mt.RandLambda(func=_invert, prob=0.5, track_meta=False),
    }
    compose = mt.Compose([build[f]() for f in flags], lazy=False)
    compose.set_random_state(seed=seed)
    return datasets._PlainTensor(compose)


def is_model_file(name: str) -> bool:
    """True for ``path/to/net.py`` or ``path/to/net.py:factory`` model names."""
    return str(name).split(":", 1)[0].endswith(".py")


def model_from_file(name: str, in_chans: int, num_classes: int, **kw) -> nn.Module:
    """A network from a user's ``.py`` file: ``net.py:factory`` calls ``factory(in_chans=, num_classes=, **kw)``
    (default factory name ``create_model``), which must return a ``torch.nn.Module``."""
    path_text, _, factory = str(name).partition(":")
    path = Path(path_text).expanduser().resolve()
    factory = factory or "create_model"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    module_name = f"mednb_user_model_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ValueError(f"{path}: importing it failed ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, factory, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"{path}: no function {factory!r} (callables defined: {names})")
    model = fn(in_chans=in_chans, num_classes=num_classes, **kw)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{path}:{factory} returned {type(model).__name__}, not a torch.nn.Module")
    return model


__all__ = ["AUGMENT_FLAGS", "CLASSIFIER_LOSSES", "augment_flags", "build_augment", "is_model_file", "loss_name",
           "model_from_file", "named_loss"]
