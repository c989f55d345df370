"""Linear probes on frozen backbones: the fast cached-feature protocol and the official ``main_lincls`` one.

Cached features (:func:`train_linear_probe`, ``paper`` / ``small`` presets): features are extracted once (centre
view, see ``features.py``) and the probe trains on those fixed vectors. ~``epochs`` times cheaper than the official
protocol, deterministic given the seed; it gives up the gain that crop augmentation brings to a linear head, so
numbers can sit slightly below the paper's.

``lincls`` (:func:`train_lincls`): facebookresearch/moco ``main_lincls.py`` exactly: every epoch fresh
RandomResizedCrop(224) + horizontal-flip views through the frozen backbone (kept in eval mode, BN statistics
untouched), fc initialised N(0, 0.01) / 0, SGD lr 30 x batch/256, momentum 0.9, weight decay 0, batch 256, 100
epochs, x0.1 at 60 and 80; validation on Resize(256) + CenterCrop(224). Pure torch, in-process: for small data.

Both report the last epoch's top-1 (``top1``) and the best epoch's (``best_top1``, what main_lincls prints as
``best_acc1``; picked on the test split, so it is optimistic).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LinearProtocol:
    """Hyper-parameters of a linear probe; ``run(...)`` trains one with them."""

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

    def run(
        self,
        train_feats: torch.Tensor,
        train_labels: torch.Tensor,
        test_feats: torch.Tensor,
        test_labels: torch.Tensor,
        num_classes: int | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
    ) -> LinearProbeResult:
        kw = asdict(self)
        return train_linear_probe(
            train_feats, train_labels, test_feats, test_labels, num_classes, device=device, seed=seed,
            on_epoch=on_epoch, **kw,
        )  # fmt: skip


@dataclass
class LinearProbeResult:
    top1: float  # final-epoch test accuracy in [0, 1]
    top5: float  # top-min(5, classes)
    train_top1: float
    history: list[dict[str, float]]  # per epoch: epoch, lr, loss, train_top1, test_top1
    classifier: nn.Module | None = field(default=None, repr=False)  # (standardiser +) Linear, in eval mode
    best_top1: float = 0.0  # the best epoch's test top-1 (main_lincls's best_acc1; selected on the test split)
    best_epoch: int = 0


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


def _check_inputs(feats: torch.Tensor, labels: torch.Tensor, name: str) -> torch.Tensor:
    if feats.dim() != 2 or feats.shape[0] == 0:
        raise ValueError(f"train_linear_probe: {name} features must be a non-empty [N,D], got {list(feats.shape)}")
    labels = torch.as_tensor(labels)
    if labels.shape != (feats.shape[0],) or labels.is_floating_point():
        raise ValueError(
            f"train_linear_probe: {name} labels must be integer [{feats.shape[0]}], got "
            f"{labels.dtype} {list(labels.shape)}"
        )
    if int(labels.min()) < 0:
        raise ValueError(f"train_linear_probe: {name} labels must be >= 0 (unlabelled rows cannot be probed)")
    return labels.long()


def _probe_checks(
    train_feats, train_labels, test_feats, test_labels, num_classes, epochs, lr, batch_size, wd, schedule
):
    """The probe's inputs checked (one ValueError naming the problem); returns the labels and the class count."""
    train_labels = _check_inputs(train_feats, train_labels, "train")
    test_labels = _check_inputs(test_feats, test_labels, "test")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"train_linear_probe: train dim {train_feats.shape[1]} != test dim {test_feats.shape[1]}")
    if epochs < 1 or lr <= 0 or batch_size < 1 or wd < 0:
        raise ValueError(
            f"train_linear_probe: need epochs >= 1, lr > 0, batch_size >= 1, weight_decay >= 0; got "
            f"epochs={epochs}, lr={lr}, batch_size={batch_size}, weight_decay={wd}"
        )
    if schedule not in ("cosine", "step"):
        raise ValueError(f"train_linear_probe: schedule {schedule!r} is not one of cosine, step")
    max_label = int(max(train_labels.max(), test_labels.max()))
    if num_classes is None:
        num_classes = max_label + 1
    elif max_label >= num_classes:
        raise ValueError(f"train_linear_probe: num_classes={num_classes} but labels go up to {max_label}")
    return train_labels, test_labels, num_classes


def _probe_lr(schedule: str, lr: float, epoch: int, step: int, total: int, milestones: Sequence[int]) -> float:
    """cosine: per step, to 0 over ``total`` steps; step: x0.1 at each epoch in ``milestones``."""
    if schedule == "step":
        return lr * 0.1 ** sum(epoch >= m for m in milestones)
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


def train_linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    schedule: Literal["cosine", "step"] = "cosine",
    milestones: Sequence[int] = (60, 80),
    momentum: float = 0.9,
    standardize: bool = True,
    device: torch.device | str = "cpu",
    seed: int = 0,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> LinearProbeResult:
    """Train a linear classifier (SGD, cross-entropy) on frozen features; report test top-1/top-5.

    ``schedule``: ``cosine`` (per step, to 0) or ``step`` (x0.1 at each epoch in ``milestones``). The head is
    initialised as in the official code (weights N(0, 0.01), bias 0). Deterministic given ``seed``.
    ``on_epoch``: called with each epoch's history entry (progress lines for long probes).
    """
    train_labels, test_labels, num_classes = _probe_checks(
        train_feats, train_labels, test_feats, test_labels, num_classes, epochs, lr, batch_size, weight_decay, schedule
    )

    device = torch.device(device)
    xtr, ytr = train_feats.to(device, torch.float32), train_labels.to(device)
    xte, yte = test_feats.to(device, torch.float32), test_labels.to(device)
    g = torch.Generator().manual_seed(seed)
    dim = xtr.shape[1]
    linear = nn.Linear(dim, num_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(num_classes, dim, generator=g) * 0.01)
        linear.bias.zero_()
    layers: list[nn.Module] = [_standardizer(xtr)] if standardize else []
    model = nn.Sequential(*layers, linear.to(device))
    opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    n = xtr.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    history: list[dict[str, Any]] = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        loss_sum = 0.0
        for s in range(0, n, batch_size):
            cur = _probe_lr(schedule, lr, epoch, step, total, milestones)
            for group in opt.param_groups:
                group["lr"] = cur
            idx = perm[s : s + batch_size]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * idx.shape[0]
            step += 1
        train_top1, _ = _evaluate(model, xtr, ytr)
        test_top1, _ = _evaluate(model, xte, yte)
        history.append(
            {"epoch": epoch, "lr": cur, "loss": loss_sum / n, "train_top1": train_top1, "test_top1": test_top1}
        )
        if on_epoch is not None:
            on_epoch(history[-1])
    top1, top5 = _evaluate(model, xte, yte)
    best = max(history, key=lambda h: h["test_top1"])
    return LinearProbeResult(
        top1, top5, history[-1]["train_top1"], history, model.eval(), best["test_top1"], int(best["epoch"])
    )


SMALL_IMAGE_MAX = 96  # image_size up to this -> the `small` linear protocol by default


def linear_protocol(preset: str | None, image_size: int, epochs: int | None = None):
    """``small`` for CIFAR-sized images (<= 96 px), ``paper`` otherwise, unless ``preset`` says; ``epochs``
    overrides, with step milestones scaled to the new length (60/80 of 100 -> 6/8 of 10)."""
    name = preset or ("small" if image_size <= SMALL_IMAGE_MAX else "paper")
    if name not in ("small", "paper"):
        raise ValueError(f"linear protocol preset {name!r} is not one of small, paper")
    proto = LinearProtocol.small() if name == "small" else LinearProtocol.paper()
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f"linear probe epochs {epochs} is out of range; allowed: >= 1")
        ms = tuple(max(1, round(m * epochs / proto.epochs)) for m in proto.milestones)
        proto = dataclasses.replace(proto, epochs=epochs, milestones=ms)
    return name, proto


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


def _lincls_views(images: Sequence[torch.Tensor], size: int, g: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop(size) (scale 0.08-1, ratio 3/4-4/3) + horizontal flip of uint8 [3, H, W] images."""
    from torchvision.transforms.v2 import functional as TF

    out = []
    for img in images:
        h, w = img.shape[-2:]
        area = h * w
        box = None
        for _ in range(10):  # torchvision RandomResizedCrop.get_params, drawn from ``g``
            target = area * (0.08 + 0.92 * float(torch.rand((), generator=g)))
            lo, hi = math.log(3 / 4), math.log(4 / 3)
            ratio = math.exp(lo + (hi - lo) * float(torch.rand((), generator=g)))
            cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (), generator=g))
                left = int(torch.randint(0, w - cw + 1, (), generator=g))
                box = (top, left, ch, cw)
                break
        if box is None:  # central crop at the clamped ratio
            in_ratio = w / h
            cw, ch = (
                (w, h)
                if 3 / 4 <= in_ratio <= 4 / 3
                else ((round(h * 4 / 3), h) if in_ratio > 4 / 3 else (w, round(w * 4 / 3)))
            )
            box = ((h - ch) // 2, (w - cw) // 2, ch, cw)
        v = TF.resized_crop(img, *box, [size, size], antialias=True)
        if float(torch.rand((), generator=g)) < 0.5:
            v = TF.horizontal_flip(v)
        out.append(v)
    return torch.stack(out)


def _val_view(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize(size / 0.875) + CenterCrop(size): main_lincls's validation transform (256 / 224)."""
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(TF.resize(img, [int(round(size / 0.875))], antialias=True), [size, size])


@torch.no_grad()
def _pooled(backbone: nn.Module, x: torch.Tensor, prep: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return backbone(prep(x)).float().flatten(1)


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
    """The official linear classification protocol on a frozen ``backbone`` (see the module docstring).

    ``*_images``: uint8 [3, H, W] tensors (any sizes); ``preprocess``: uint8 batch -> normalised float on
    ``device`` (the run's mean/std, e.g. ``core.normalize.Normalizer``). The backbone stays in eval mode; its
    train/eval mode is restored afterwards. Deterministic given ``seed``.
    """
    p = protocol or LinclsProtocol()
    ytr = _check_inputs(torch.zeros(len(train_images), 1), train_labels, "train")
    yte = _check_inputs(torch.zeros(len(test_images), 1), test_labels, "test")
    num_classes = num_classes or int(max(ytr.max(), yte.max())) + 1
    device, g = torch.device(device), torch.Generator().manual_seed(seed)
    was_training = backbone.training
    backbone.eval()  # main_lincls: model.eval() while training, so BN running statistics stay frozen
    try:
        val = torch.stack([_val_view(im, p.image_size) for im in test_images])
        xte = torch.cat([_pooled(backbone, val[s : s + 256], preprocess) for s in range(0, len(val), 256)])
        fc = nn.Linear(xte.shape[1], num_classes).to(device)
        with torch.no_grad():
            fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) * 0.01)
            fc.bias.zero_()
        lr0 = p.lr * p.batch_size / 256
        opt = torch.optim.SGD(fc.parameters(), lr=lr0, momentum=p.momentum, weight_decay=p.weight_decay)
        history: list[dict[str, Any]] = []
        yte_d = yte.to(device)
        for epoch in range(p.epochs):
            lr = lr0 * 0.1 ** sum(epoch >= m for m in p.milestones)
            for group in opt.param_groups:
                group["lr"] = lr
            perm = torch.randperm(len(train_images), generator=g)
            loss_sum = correct = 0.0
            for s in range(0, len(perm), p.batch_size):
                idx = perm[s : s + p.batch_size].tolist()
                feats = _pooled(backbone, _lincls_views([train_images[i] for i in idx], p.image_size, g), preprocess)
                y = ytr[idx].to(device)
                logits = fc(feats)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.item() * len(idx)
                correct += _topk_correct(logits.detach(), y, 1)
            test_top1, _ = _evaluate(fc, xte, yte_d)
            n = len(perm)
            history.append(
                {"epoch": epoch, "lr": lr, "loss": loss_sum / n, "train_top1": correct / n, "test_top1": test_top1}
            )
        top1, top5 = _evaluate(fc, xte, yte_d)
    finally:
        backbone.train(was_training)
    best = max(history, key=lambda h: h["test_top1"])
    return LinearProbeResult(
        top1, top5, history[-1]["train_top1"], history, fc.eval(), best["test_top1"], int(best["epoch"])
    )
