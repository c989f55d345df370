"""Linear probes on frozen backbones: one trainer (:func:`train_probe`), two feature sources (``probe_sources.py``).

Cached features (``CachedFeatures``, ``paper`` / ``small`` presets of :class:`LinearProtocol`): features are
extracted once (centre view, see ``features.py``) and the probe trains on those fixed vectors. ~``epochs`` times
cheaper than the official protocol, deterministic given the seed; it gives up the gain that crop augmentation brings
to a linear head, so numbers can sit slightly below the paper's.

``lincls`` (:func:`train_lincls` on ``FreshViews``): facebookresearch/moco ``main_lincls.py`` exactly: every epoch
fresh RandomResizedCrop(224) + horizontal-flip views through the frozen backbone (kept in eval mode, BN statistics
untouched), fc initialised N(0, 0.01) / 0, SGD lr 30 x batch/256, momentum 0.9, weight decay 0, batch 256, 100
epochs, x0.1 at 60 and 80; validation on Resize(256) + CenterCrop(224). Pure torch, in-process: for small data.

Both report the last epoch's top-1 (``top1``) and the best epoch's (``best_top1``, what main_lincls prints as
``best_acc1``; picked on the test split, so it is optimistic).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_ray.evaluation.probe_sources import Batch, FeatureSource, FreshViews

P = TypeVar("P", "LinearProtocol", "LinclsProtocol")


@dataclass
class LinearProtocol:
    """Hyper-parameters of a linear probe (``train_probe`` trains one with them)."""

    epochs: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: tuple[int, ...] = (60, 80)
    standardize: bool = True

    @classmethod
    def paper(cls) -> LinearProtocol:
        """Official MoCo ImageNet protocol: SGD lr 30, momentum 0.9, no weight decay, 100 epochs, x0.1 at 60/80.

        lr 30 is tuned for raw (un-normalised, post-ReLU average-pooled) ResNet features and no standardisation.
        """
        return cls(
            epochs=100,
            lr=30.0,
            momentum=0.9,
            weight_decay=0.0,
            batch_size=256,
            schedule="step",
            milestones=(60, 80),
            standardize=False,
        )

    @classmethod
    def small(cls) -> LinearProtocol:
        """CIFAR-sized data on L2-normalised features: standardise, then SGD lr 0.1, cosine, 100 epochs.

        L2-normalised features have coordinates of order 1/sqrt(D), so the logits of a linear head barely move at
        ordinary learning rates; standardising each dimension (BatchNorm without affine, as in the MAE / MoCo v3
        linear probe) brings them to unit variance, after which lr 0.1 with momentum is the usual, robust choice
        and the probe no longer depends on the feature scale. No weight decay: with fixed features and 100
        epochs the probe does not over-fit enough to need it.
        """
        return cls(
            epochs=100,
            lr=0.1,
            momentum=0.9,
            weight_decay=0.0,
            batch_size=256,
            schedule="cosine",
            milestones=(),
            standardize=True,
        )


@dataclass
class LinearProbeResult:
    top1: float  # final-epoch test accuracy in [0, 1]
    top5: float  # top-min(5, classes)
    train_top1: float
    history: list[dict[str, float]]  # per epoch: epoch (its number, 1 = first), lr, loss, train_top1, test_top1
    classifier: nn.Module | None = field(default=None, repr=False)  # (standardiser +) Linear, in eval mode
    best_top1: float = 0.0  # the best epoch's test top-1 (main_lincls's best_acc1; selected on the test split)
    best_epoch: int = 0  # its number (1 = first), as the console prints epochs; history[best_epoch - 1]


def _standardizer(train_feats: torch.Tensor) -> nn.BatchNorm1d:
    """BatchNorm1d without affine holding the exact train-set mean/variance, frozen in eval mode.

    The features are fixed, so the full-data statistics are known up front; this is what a BN layer's running
    statistics converge to, without the batch-to-batch noise.
    """
    bn = nn.BatchNorm1d(train_feats.shape[1], affine=False, eps=1e-6).to(train_feats.device)
    bn.running_mean.copy_(train_feats.mean(0))
    bn.running_var.copy_(train_feats.var(0, unbiased=False))
    return bn.eval()


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return int((top == labels[:, None]).any(dim=1).sum())


@torch.no_grad()
def _evaluate(model: nn.Module, feats: torch.Tensor, labels: torch.Tensor, batch: int = 4096) -> tuple[float, float]:
    c1 = c5 = 0
    for s in range(0, feats.shape[0], batch):
        logits = model(feats[s : s + batch])
        c1 += _topk_correct(logits, labels[s : s + batch], 1)
        c5 += _topk_correct(logits, labels[s : s + batch], 5)
    n = max(feats.shape[0], 1)
    return c1 / n, c5 / n


def _probe_checks(source: FeatureSource, p: LinearProtocol, num_classes: int | None) -> tuple[int, int]:
    """The probe's inputs checked (one ValueError naming the problem); returns the train rows and the class count."""
    train_labels, test_labels = source.checked_labels()
    if p.epochs < 1 or p.lr <= 0 or p.batch_size < 1 or p.weight_decay < 0:
        raise ValueError(
            f"linear probe: need epochs >= 1, lr > 0, batch_size >= 1, weight_decay >= 0; got "
            f"epochs={p.epochs}, lr={p.lr}, batch_size={p.batch_size}, weight_decay={p.weight_decay}"
        )
    if p.schedule not in ("cosine", "step"):
        raise ValueError(f"linear probe: schedule {p.schedule!r} is not one of cosine, step")
    max_label = int(max(train_labels.max(), test_labels.max()))
    if num_classes is None:
        num_classes = max_label + 1
    elif max_label >= num_classes:
        raise ValueError(f"linear probe: num_classes={num_classes} but labels go up to {max_label}")
    return len(train_labels), num_classes


def _probe_lr(schedule: str, lr: float, epoch: int, step: int, total: int, milestones: Sequence[int]) -> float:
    """cosine: per step, to 0 over ``total`` steps; step: x0.1 at each epoch in ``milestones``."""
    if schedule == "step":
        return lr * 0.1 ** sum(epoch >= m for m in milestones)
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


def _head(dim: int, num_classes: int, fixed: Batch | None, p: LinearProtocol, g: torch.Generator) -> nn.Sequential:
    """(Standardiser +) Linear, the weights N(0, 0.01) drawn from ``g`` and the bias 0 (the official init)."""
    linear = nn.Linear(dim, num_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(num_classes, dim, generator=g) * 0.01)
        linear.bias.zero_()
    if not p.standardize:
        return nn.Sequential(linear)
    if fixed is None:
        raise ValueError("linear probe: standardize needs fixed (cached) training features")
    return nn.Sequential(_standardizer(fixed[0]), linear.to(fixed[0].device))


@dataclass
class _Steps:
    """The SGD side of the loop: sets each step's learning rate by the protocol's schedule, then steps."""

    p: LinearProtocol
    opt: torch.optim.Optimizer
    total: int
    step: int = 0
    lr: float = 0.0

    def __call__(self, epoch: int, loss: torch.Tensor) -> None:
        self.lr = _probe_lr(self.p.schedule, self.p.lr, epoch, self.step, self.total, self.p.milestones)
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1


def _epoch(model: nn.Module, data: FeatureSource, sgd: _Steps, epoch: int, n: int, g: torch.Generator):
    """One pass over a fresh permutation; returns the mean loss and the running top-1 over the epoch's batches."""
    perm = torch.randperm(n, generator=g)
    loss_sum = correct = 0.0
    for x, y in data.train_batches(perm, sgd.p.batch_size, g):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        sgd(epoch, loss)
        loss_sum += loss.item() * y.shape[0]
        correct += _topk_correct(logits.detach(), y, 1)
    return loss_sum / n, correct / n


def train_probe(
    source: FeatureSource,
    protocol: LinearProtocol,
    num_classes: int | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> LinearProbeResult:
    """Train a linear classifier (SGD, cross-entropy) on frozen features from ``source``; report test top-1/top-5.

    The learning rate follows ``protocol.schedule`` step by step; the head is initialised as in the official code
    (weights N(0, 0.01), bias 0). Train top-1 is the fixed training set scored after each epoch when the source
    has one (cached features), else the running accuracy over the epoch's views (main_lincls's). Deterministic
    given ``seed``. ``on_epoch``: called with each epoch's history entry (progress lines for long probes).
    """
    n, num_classes = _probe_checks(source, protocol, num_classes)
    device = torch.device(device)
    data, g = source.to(device), torch.Generator().manual_seed(seed)
    xte, yte = data.test_set()
    fixed = data.fixed_train_set()
    model = _head(xte.shape[1], num_classes, fixed, protocol, g).to(device)
    opt = torch.optim.SGD(
        model[-1].parameters(), lr=protocol.lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay
    )
    sgd = _Steps(protocol, opt, protocol.epochs * math.ceil(n / protocol.batch_size))
    history: list[dict[str, Any]] = []
    for epoch in range(protocol.epochs):
        loss, running_top1 = _epoch(model, data, sgd, epoch, n, g)
        train_top1 = _evaluate(model, *fixed)[0] if fixed is not None else running_top1
        test_top1, _ = _evaluate(model, xte, yte)
        number = epoch + 1  # as the console prints it
        history.append({"epoch": number, "lr": sgd.lr, "loss": loss, "train_top1": train_top1, "test_top1": test_top1})
        if on_epoch is not None:
            on_epoch(history[-1])
    top1, top5 = _evaluate(model, xte, yte)
    best = max(history, key=lambda h: h["test_top1"])
    return LinearProbeResult(
        top1, top5, history[-1]["train_top1"], history, model.eval(), best["test_top1"], int(best["epoch"])
    )


SMALL_IMAGE_MAX = 96  # image_size up to this -> the `small` linear protocol by default


def with_epochs(proto: P, epochs: int | None) -> P:
    """``proto`` lasting ``epochs`` (None: unchanged), its step milestones scaled to the new length (60/80 of 100
    -> 6/8 of 10)."""
    if epochs is None:
        return proto
    if epochs < 1:
        raise ValueError(f"linear probe epochs {epochs} is out of range; allowed: >= 1")
    ms = tuple(max(1, round(m * epochs / proto.epochs)) for m in proto.milestones)
    return dataclasses.replace(proto, epochs=epochs, milestones=ms)


def linear_protocol(preset: str | None, image_size: int, epochs: int | None = None) -> tuple[str, LinearProtocol]:
    """``small`` for CIFAR-sized images (<= 96 px), ``paper`` otherwise, unless ``preset`` says; ``epochs``
    overrides (see ``with_epochs``)."""
    name = preset or ("small" if image_size <= SMALL_IMAGE_MAX else "paper")
    if name not in ("small", "paper"):
        raise ValueError(f"linear protocol preset {name!r} is not one of small, paper")
    return name, with_epochs(LinearProtocol.small() if name == "small" else LinearProtocol.paper(), epochs)


@dataclass
class LinclsProtocol:
    """main_lincls.py's defaults (facebookresearch/moco): ``-a resnet50 --lr 30.0 -b 256 --epochs 100 --schedule 60 80
    --wd 0 --momentum 0.9``; lr scaled as lr x batch / 256."""

    epochs: int = 100
    lr: float = 30.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    milestones: tuple[int, ...] = (60, 80)
    image_size: int = 224  # RandomResizedCrop(224) for training; Resize(256) + CenterCrop(224) for validation
    schedule: Literal["cosine", "step"] = "step"

    @classmethod
    def vit(cls, image_size: int = 224) -> LinclsProtocol:
        """facebookresearch/moco-v3 main_lincls.py for a ViT (CONFIG.md ``-a vit_small|vit_base --lr=3``): lr 3
        (x batch / 256), ``-b`` 1024, ``--epochs`` 90, ``--wd`` 0, ``--momentum`` 0.9, cosine decay
        (``adjust_learning_rate``: once per epoch there, per step here). The head is the ViT's ``head``."""
        return cls(
            epochs=90,  # main_lincls.py --epochs default 90
            lr=3.0,  # CONFIG.md: --lr=3 for vit_small and vit_base
            momentum=0.9,  # --momentum default 0.9
            weight_decay=0.0,  # --wd default 0
            batch_size=1024,  # -b default 1024
            milestones=(),
            image_size=image_size,
            schedule="cosine",  # init_lr * 0.5 * (1 + cos(pi * epoch / epochs))
        )

    @classmethod
    def for_arch(cls, arch: str, image_size: int = 224) -> LinclsProtocol:
        """The official linear protocol of ``arch``: moco-v3's ViT settings for ``vit_*``, else main_lincls.py's
        ResNet defaults (facebookresearch/moco)."""
        return cls.vit(image_size) if arch.startswith("vit_") else cls(image_size=image_size)

    def probe(self) -> LinearProtocol:
        """The trainer's settings: lr x batch / 256, x0.1 at each milestone (or cosine), raw features (no
        standardisation)."""
        return LinearProtocol(
            epochs=self.epochs, lr=self.lr * self.batch_size / 256, momentum=self.momentum,
            weight_decay=self.weight_decay, batch_size=self.batch_size, schedule=self.schedule,
            milestones=self.milestones, standardize=False,
        )  # fmt: skip


def train_lincls(
    backbone: nn.Module,
    train_images: Sequence[torch.Tensor],
    train_labels: torch.Tensor,
    test_images: Sequence[torch.Tensor],
    test_labels: torch.Tensor,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int | None = None,
    protocol: LinclsProtocol | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> LinearProbeResult:
    """The official linear classification protocol on a frozen ``backbone`` (see the module docstring):
    ``train_probe`` on ``FreshViews``, with the backbone in eval mode throughout.

    ``*_images``: uint8 [3, H, W] tensors (any sizes); ``preprocess``: uint8 batch -> normalised float on
    ``device`` (the run's mean/std, e.g. ``core.normalize.Normalizer``). The backbone's train/eval mode is restored
    afterwards. Deterministic given ``seed``.
    """
    p = protocol or LinclsProtocol()
    views = FreshViews(backbone, train_images, train_labels, test_images, test_labels, preprocess, p.image_size)
    was_training = backbone.training
    backbone.eval()  # main_lincls: model.eval() while training, so BN running statistics stay frozen
    try:
        return train_probe(views, p.probe(), num_classes, device=device, seed=seed)
    finally:
        backbone.train(was_training)
