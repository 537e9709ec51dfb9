"""A ``RawSet`` prepared into the shared in-memory dataset, and the training items drawn from it.

``prepare`` returns a ``lib.datasets.CachedDataset`` with task ``segmentation`` (``x`` images, ``y`` masks
``(N, 1, S, S)``), the type ``lib.kfold.run_kfold`` folds and scores. ``SegDataset`` gives a fold's training
items: the image and its mask moved together by ``lib.datasets.make_augment`` (the classification augmentation,
run on the image and mask stacked as channels, the mask thresholded back to 0/1), whole images or lesion-aware
patches.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lib.datasets import CachedDataset, make_augment
from lib.segmentation.data import RawSet
from lib.segmentation.preprocess import Preprocess, preprocess_image, preprocess_mask


def prepare_dataset(raw: RawSet, pre: Preprocess, target: str = "lesion") -> CachedDataset:
    """Preprocess every image/mask pair of a raw set into tensors; the recipe (``Preprocess`` with the set's CT
    window, plus the channel names) travels in ``preprocessing`` into every checkpoint."""
    p = pre if raw.window is None else replace(pre, window=raw.window)
    xs, ys = [], []
    for img, mask in zip(raw.images, raw.masks, strict=True):
        x, geom = preprocess_image(img, p)
        xs.append(x)
        ys.append(preprocess_mask(mask, geom, p.size))
    y = np.stack(ys)[:, None].astype(np.float32)
    table = raw.table.reset_index(drop=True).assign(has_lesion=(y.reshape(len(y), -1).max(1) > 0).astype(int))
    recipe = {**p.to_dict(), "channel_names": list(raw.channels)}
    return CachedDataset(torch.as_tensor(np.stack(xs)), torch.as_tensor(y), table, [target], "segmentation",
                         preprocessing=recipe, skipped=raw.skipped)


class SegDataset(Dataset):
    """(image, mask) items of a prepared set with joint augmentation (re-seeded every epoch by ``fit``).

    With ``patch_size`` > 0 every item is a ``patch_size`` square patch instead of the whole image (lesion-aware
    sampling for small lesions, as MONAI ``RandCropByPosNegLabeld``): with probability ``pos_fraction`` a patch
    is centred on a foreground pixel of a random image that has foreground, otherwise on a random in-field pixel
    (image > 0 in any channel) of any image. Why: MS lesions cover ~0.1-0.5 % of a slice, so whole slices give
    the loss almost no lesion pixels; patches raise that share while the fully convolutional network still
    runs on whole images at validation and inference. Item ``i`` is drawn from its own generator seeded by
    ``(seed, i)``, so the patches of an epoch do not depend on loader order or workers; ``len`` is
    ``samples_per_epoch`` (default: the number of images).
    """

    def __init__(self, data: CachedDataset, augment: str | None = "light", seed: int = 0, patch_size: int = 0,
                 pos_fraction: float = 0.5, samples_per_epoch: int = 0) -> None:
        self.x, self.y = data.x, data.y
        self.transform = make_augment(augment, spatial_dims=2, seed=seed)
        self.patch_size, self.pos_fraction, self.seed = int(patch_size), float(pos_fraction), int(seed)
        self.n = int(samples_per_epoch) or len(self.x)
        if not 0.0 <= self.pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
        if self.patch_size:
            from monai.transforms import RandCropByPosNegLabeld

            if self.patch_size > min(self.x.shape[-2:]):
                raise ValueError(f"patch_size {self.patch_size} exceeds the image size {tuple(self.x.shape[-2:])}")
            self.with_fg = np.flatnonzero(self.y.reshape(len(self.y), -1).amax(1).numpy() > 0.5)
            kw = {"keys": ["image", "label"], "label_key": "label", "spatial_size": (self.patch_size,) * 2,
                  "num_samples": 1, "image_key": "image", "image_threshold": 0.0}
            self.crops = {True: RandCropByPosNegLabeld(pos=1.0, neg=0.0, **kw),
                          False: RandCropByPosNegLabeld(pos=0.0, neg=1.0, **kw)}

    def __len__(self) -> int:
        return self.n if self.patch_size else len(self.x)

    def draw(self, i: int) -> tuple[int, bool, int]:
        """Which image item ``i`` comes from, whether its patch is centred on foreground, and the crop's seed."""
        rng = np.random.default_rng([self.seed % 2**32, int(i)])
        positive = len(self.with_fg) > 0 and rng.random() < self.pos_fraction
        j = int(rng.choice(self.with_fg)) if positive else int(rng.integers(len(self.x)))
        return j, bool(positive), int(rng.integers(2**31))

    def sample(self, i: int) -> tuple[Tensor, Tensor]:
        """Item ``i`` before augmentation: the whole image, or a patch drawn as ``draw(i)`` says."""
        if not self.patch_size:
            return self.x[i], self.y[i]
        j, positive, crop_seed = self.draw(i)
        crop = self.crops[positive]
        crop.set_random_state(seed=crop_seed)
        with warnings.catch_warnings():  # an image without foreground in-field: MONAI warns, then samples background
            warnings.simplefilter("ignore")
            out = crop({"image": self.x[j], "label": self.y[j]})[0]
        return torch.as_tensor(out["image"]).float(), torch.as_tensor(out["label"]).float()

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.sample(i)
        if self.transform is None:
            return x, y
        out = self.transform(torch.cat([x, y]))
        return out[:-1].float(), (out[-1:] > 0.5).float()

    def set_random_state(self, seed: int) -> None:
        self.seed = int(seed)
        if self.transform is not None:
            self.transform.set_random_state(seed=seed % 2**32)
