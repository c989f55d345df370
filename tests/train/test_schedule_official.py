"""MoCo v3's LARS and momentum schedule, and the per-epoch cosine of MoCo v2 / the CIFAR demo, against
computations written out here from the official code's formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from moco_ray.config import load_config
from moco_ray.train.lars import LARS
from moco_ray.train.schedule import lr_at, momentum_at
from moco_ray.train.step import build_optimizer


def test_momentum_cosine_schedule_values():
    # adjust_moco_momentum: m = 1 - 0.5 * (1 + cos(pi * epoch / epochs)) * (1 - moco_m), epoch = ep + i / iters
    cfg = load_config({"moco": {"method": "moco_v3"}})
    mo = cfg.moco
    assert momentum_at(mo, 0, 0, 10, 100) == pytest.approx(0.99)
    assert momentum_at(mo, 50, 0, 10, 100) == pytest.approx(0.995)
    assert momentum_at(mo, 25, 5, 10, 100) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi * 25.5 / 100)) * 0.01)
    assert momentum_at(mo, 99, 9, 10, 100) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi * 99.9 / 100)) * 0.01)
    assert momentum_at(load_config(None).moco, 50, 3, 10, 100) == 0.999  # v1/v2: constant


def test_v3_lr_warmup_then_cosine_per_step():
    cfg = load_config({"moco": {"method": "moco_v3"}})
    base = cfg.lr
    # warm-up: linear in the fractional epoch, lr x t / warmup as moco-v3's adjust_learning_rate
    assert lr_at(cfg.optim, base, 4, 5, 10, 100) == pytest.approx(base * 4.5 / 10)
    t = 55.5  # cosine over the 90 epochs after warm-up, per step
    want = base * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90))
    assert lr_at(cfg.optim, base, 55, 5, 10, 100) == pytest.approx(want)


def test_per_epoch_cosine_of_moco_v2_and_the_cifar_demo():
    v2 = load_config(None)
    for step in (0, 7):  # main_moco.py: lr * 0.5 * (1 + cos(pi * epoch / epochs)), the same all epoch
        assert lr_at(v2.optim, 0.03, 10, step, 20, 200) == pytest.approx(
            0.03 * 0.5 * (1 + math.cos(math.pi * 10 / 200))
        )
    demo = load_config(None, ["optim.first_epoch=1"])  # the demo's loop runs epoch = 1 .. epochs
    assert lr_at(demo.optim, 0.06, 0, 3, 20, 200) == pytest.approx(0.06 * 0.5 * (1 + math.cos(math.pi / 200)))
    assert lr_at(demo.optim, 0.06, 199, 3, 20, 200) == pytest.approx(0.0, abs=1e-12)
    v1 = load_config({"moco": {"method": "moco_v1"}})
    assert [lr_at(v1.optim, 0.03, e, 5, 10, 200) for e in (119, 120, 160)] == pytest.approx([0.03, 0.003, 0.0003])


def _lars_reference(w, b, gw, gb, lr, wd, mom, eta, steps):
    """Written out: 2-D weight -> (g + wd w) * eta ||w|| / ||g + wd w||; 1-D bias -> raw g; then mu = mom mu + d,
    p -= lr mu."""
    w, b = w.clone(), b.clone()
    mw, mb = torch.zeros_like(w), torch.zeros_like(b)
    for _ in range(steps):
        d = gw + wd * w
        d = d * (eta * w.norm() / d.norm())
        mw = mom * mw + d
        w = w - lr * mw
        mb = mom * mb + gb
        b = b - lr * mb
    return w, b


def test_lars_step_matches_a_written_out_computation():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    gw, gb = torch.randn(3, 5), torch.randn(3)
    opt = LARS(lin.parameters(), lr=0.5, weight_decay=0.1, momentum=0.9)
    for _ in range(3):
        lin.weight.grad, lin.bias.grad = gw.clone(), gb.clone()
        opt.step()
    w, b = _lars_reference(w0, b0, gw, gb, 0.5, 0.1, 0.9, 0.001, 3)
    torch.testing.assert_close(lin.weight.detach(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lin.bias.detach(), b, rtol=1e-5, atol=1e-6)


def test_lars_zero_weight_takes_the_plain_update_and_build_optimizer_picks_it():
    p = nn.Parameter(torch.zeros(2, 2))
    p.grad = torch.ones(2, 2)
    LARS([p], lr=1.0, weight_decay=0.0, momentum=0.0).step()  # ||w|| = 0: trust ratio 1
    assert torch.equal(p.detach(), -torch.ones(2, 2))
    cfg = load_config({"moco": {"method": "moco_v3"}}, ["model.small_stem=true", "model.dim=8", "model.hidden_dim=8"])
    opt = build_optimizer(cfg, nn.Linear(2, 2))
    assert isinstance(opt, LARS) and opt.defaults["weight_decay"] == 1e-6 and opt.defaults["lr"] == cfg.lr
