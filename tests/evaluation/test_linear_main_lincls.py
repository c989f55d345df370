"""The official main_lincls protocol in-process (fresh crops every epoch, frozen backbone in eval mode, best and last
epoch), and best/last epoch in the cached-feature protocol."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from moco_ray.core.normalize import Normalizer
from moco_ray.evaluation.linear import LinclsProtocol, LinearProtocol, train_lincls, train_probe
from moco_ray.evaluation.probe_sources import CachedFeatures, FreshViews


def _images(n: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two classes told apart by colour (red vs blue), on noisy backgrounds of varying size."""
    g = torch.Generator().manual_seed(seed)
    imgs, labels = [], []
    for i in range(n):
        y = i % 2
        h, w = 20 + int(torch.randint(0, 12, (), generator=g)), 20 + int(torch.randint(0, 12, (), generator=g))
        x = torch.randint(0, 80, (3, h, w), generator=g, dtype=torch.uint8)
        x[0 if y == 0 else 2] += 150
        imgs.append(x)
        labels.append(y)
    return imgs, torch.tensor(labels)


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))


def test_lincls_trains_on_fresh_crops_with_a_frozen_backbone():
    net = _backbone().train()
    before = copy.deepcopy(net.state_dict())
    xtr, ytr = _images(32, 0)
    xte, yte = _images(16, 1)
    proto = LinclsProtocol(epochs=6, lr=3.0, batch_size=16, milestones=(4,), image_size=12)
    norm = Normalizer()
    res = train_lincls(net, xtr, ytr, xte, yte, norm, protocol=proto, seed=0)
    assert net.training  # mode restored
    for k, v in net.state_dict().items():  # BN running statistics untouched (eval mode throughout)
        assert torch.equal(v, before[k]), k
    assert len(res.history) == 6
    assert [h["lr"] for h in res.history] == pytest.approx([3.0 * 16 / 256] * 4 + [3.0 * 16 / 256 * 0.1] * 2)
    assert res.top1 == res.history[-1]["test_top1"]
    assert res.best_top1 == max(h["test_top1"] for h in res.history) >= res.top1
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4, 5, 6]  # numbered as the console and MLflow steps are
    assert res.history[res.best_epoch - 1]["test_top1"] == res.best_top1
    assert res.best_top1 >= 0.9  # colour is linearly separable from the pooled features
    again = train_lincls(_backbone(), xtr, ytr, xte, yte, norm, protocol=proto, seed=0)
    assert again.history == res.history  # deterministic given the seed


def test_fresh_views_cannot_be_standardised():
    """Standardising needs the fixed training set's statistics; fresh views have none."""
    xtr, ytr = _images(4, 0)
    views = FreshViews(_backbone().eval(), xtr, ytr, xtr, ytr, Normalizer(), image_size=12)
    with pytest.raises(ValueError, match="standardize"):
        train_probe(views, LinearProtocol(epochs=1, standardize=True))


def test_lincls_defaults_are_main_lincls():
    p = LinclsProtocol()
    assert (p.epochs, p.lr, p.momentum, p.weight_decay, p.batch_size, p.milestones, p.image_size) == (
        100,
        30.0,
        0.9,
        0.0,
        256,
        (60, 80),
        224,
    )


def test_cached_probe_reports_best_and_last_epoch():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 8, generator=g), torch.randint(0, 3, (200,), generator=g)
    res = train_probe(CachedFeatures(x[:150], y[:150], x[150:], y[150:]), LinearProtocol(epochs=5, batch_size=32))
    assert res.best_top1 == max(h["test_top1"] for h in res.history) >= res.top1
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4, 5]  # numbered as the console and MLflow steps are
    assert res.history[res.best_epoch - 1]["test_top1"] == res.best_top1
