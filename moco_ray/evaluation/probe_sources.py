"""Where a linear probe's features come from: fixed vectors cached once, or fresh views through a frozen backbone.

The trainer (``linear.train_probe``) is the same for both; a source only says how a training epoch's batches and
the test features are produced, and whether there is a fixed training set to standardise on and to score after
each epoch (cached features) or not (fresh views differ every epoch, so the running accuracy over the epoch's
views is the train top-1, as in main_lincls).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
from torchvision.transforms.v2 import functional as TF

Batch = tuple[torch.Tensor, torch.Tensor]  # features [B, D] float on the device, labels [B] long on the device


class FeatureSource(Protocol):
    """What ``train_probe`` needs from the data."""

    def checked_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Train and test labels as long tensors; ValueError naming the problem with the inputs."""
        ...

    def to(self, device: torch.device) -> FeatureSource:
        """This source producing its batches on ``device``."""
        ...

    def test_set(self) -> Batch:
        """The test features and labels, computed once."""
        ...

    def fixed_train_set(self) -> Batch | None:
        """The training features when they do not change between epochs, else None."""
        ...

    def train_batches(self, perm: torch.Tensor, batch_size: int, g: torch.Generator) -> Iterator[Batch]:
        """One epoch of training batches in the order of ``perm``; random views draw from ``g``."""
        ...


def check_labels(feats: torch.Tensor, labels: torch.Tensor, name: str) -> torch.Tensor:
    """``labels`` as long, after checking they are non-negative integers, one per row of a non-empty [N, D]."""
    if feats.dim() != 2 or feats.shape[0] == 0:
        raise ValueError(f"linear probe: {name} features must be a non-empty [N,D], got {list(feats.shape)}")
    labels = torch.as_tensor(labels)
    if labels.shape != (feats.shape[0],) or labels.is_floating_point():
        raise ValueError(
            f"linear probe: {name} labels must be integer [{feats.shape[0]}], got {labels.dtype} {list(labels.shape)}"
        )
    if int(labels.min()) < 0:
        raise ValueError(f"linear probe: {name} labels must be >= 0 (unlabelled rows cannot be probed)")
    return labels.long()


@dataclass
class CachedFeatures:
    """Features extracted once (``features.py``): the probe trains on the same vectors every epoch."""

    train_feats: torch.Tensor
    train_labels: torch.Tensor
    test_feats: torch.Tensor
    test_labels: torch.Tensor

    def checked_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        ytr = check_labels(self.train_feats, self.train_labels, "train")
        yte = check_labels(self.test_feats, self.test_labels, "test")
        if self.train_feats.shape[1] != self.test_feats.shape[1]:
            raise ValueError(
                f"linear probe: train dim {self.train_feats.shape[1]} != test dim {self.test_feats.shape[1]}"
            )
        return ytr, yte

    def to(self, device: torch.device) -> CachedFeatures:
        """The features as float32 and the labels as long, moved to ``device`` once for all epochs."""
        return CachedFeatures(
            self.train_feats.to(device, torch.float32), torch.as_tensor(self.train_labels).long().to(device),
            self.test_feats.to(device, torch.float32), torch.as_tensor(self.test_labels).long().to(device),
        )  # fmt: skip

    def test_set(self) -> Batch:
        return self.test_feats, self.test_labels

    def fixed_train_set(self) -> Batch:
        return self.train_feats, self.train_labels

    def train_batches(self, perm: torch.Tensor, batch_size: int, g: torch.Generator) -> Iterator[Batch]:
        perm = perm.to(self.train_feats.device)
        for s in range(0, len(perm), batch_size):
            idx = perm[s : s + batch_size]
            yield self.train_feats[idx], self.train_labels[idx]


@dataclass
class FreshViews:
    """main_lincls's data: every epoch a new RandomResizedCrop + flip of each uint8 [3, H, W] training image goes
    through ``backbone`` (keep it in eval mode: ``linear.train_lincls`` does); the test images are seen once as
    Resize + CenterCrop. ``preprocess``: uint8 batch -> normalised float on the device (the run's mean/std)."""

    backbone: nn.Module
    train_images: Sequence[torch.Tensor]
    train_labels: torch.Tensor
    test_images: Sequence[torch.Tensor]
    test_labels: torch.Tensor
    preprocess: Callable[[torch.Tensor], torch.Tensor]
    image_size: int = 224
    device: torch.device = torch.device("cpu")  # where the labels go; ``preprocess`` places the images

    def checked_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        ytr = check_labels(torch.zeros(len(self.train_images), 1), self.train_labels, "train")
        yte = check_labels(torch.zeros(len(self.test_images), 1), self.test_labels, "test")
        return ytr, yte

    def to(self, device: torch.device) -> FreshViews:
        return dataclasses.replace(self, device=device)

    def test_set(self) -> Batch:
        val = torch.stack([val_view(im, self.image_size) for im in self.test_images])
        x = torch.cat([self._pooled(val[s : s + 256]) for s in range(0, len(val), 256)])
        return x, torch.as_tensor(self.test_labels).long().to(self.device)

    def fixed_train_set(self) -> None:
        return None

    def train_batches(self, perm: torch.Tensor, batch_size: int, g: torch.Generator) -> Iterator[Batch]:
        labels = torch.as_tensor(self.train_labels).long()
        for s in range(0, len(perm), batch_size):
            idx = perm[s : s + batch_size].tolist()
            views = random_views([self.train_images[i] for i in idx], self.image_size, g)
            yield self._pooled(views), labels[idx].to(self.device)

    @torch.no_grad()
    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(x)).float().flatten(1)


def _crop_box(h: int, w: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params (scale 0.08-1, ratio 3/4-4/3), drawn from ``g``: top, left, h, w."""
    area = h * w
    for _ in range(10):
        target = area * (0.08 + 0.92 * float(torch.rand((), generator=g)))
        lo, hi = math.log(3 / 4), math.log(4 / 3)
        ratio = math.exp(lo + (hi - lo) * float(torch.rand((), generator=g)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            return top, left, ch, cw
    in_ratio = w / h  # no draw fitted: central crop at the clamped ratio
    cw, ch = (
        (w, h) if 3 / 4 <= in_ratio <= 4 / 3 else ((round(h * 4 / 3), h) if in_ratio > 4 / 3 else (w, round(w * 4 / 3)))
    )
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_views(images: Sequence[torch.Tensor], size: int, g: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop(size) + horizontal flip of uint8 [3, H, W] images, drawn from ``g``."""
    out = []
    for img in images:
        v = TF.resized_crop(img, *_crop_box(*img.shape[-2:], g), [size, size], antialias=True)
        if float(torch.rand((), generator=g)) < 0.5:
            v = TF.horizontal_flip(v)
        out.append(v)
    return torch.stack(out)


def val_view(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize(size / 0.875) + CenterCrop(size): main_lincls's validation transform (256 / 224)."""
    return TF.center_crop(TF.resize(img, [int(round(size / 0.875))], antialias=True), [size, size])
