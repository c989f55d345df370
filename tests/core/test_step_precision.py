"""``train_step`` in fp16 with a ``GradScaler`` (MoCo v3's official AMP), on the CPU (fp16 autocast and the scaler
exist there): the scaled gradients are unscaled before the optimizer steps, a step whose fp16 gradients overflow
is skipped while the scale backs off, and a clean step counts toward the scale's growth.

Mutations checked by hand (each failed here): ``scaler.step(opt)`` replaced by ``opt.step()`` (the update came out
256 times the fp32 one: gradients never unscaled); ``scaler.update()`` dropped (the scale did not back off).
"""

from __future__ import annotations

import copy

import torch
from moco_helpers import TINY_MODEL

from moco_ray.config import load_config
from moco_ray.train.model import build_method
from moco_ray.train.step import build_optimizer, set_lr, train_step, trainable_parameters


def _model_and_views():
    cfg = load_config(None, {**TINY_MODEL, "moco.queue_size": 32, "train.batch_size": 8, "moco.bn_splits": 2})
    torch.manual_seed(0)
    model = build_method(cfg).train()
    views = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    return cfg, model, views


def _step(cfg, model, views, **precision):
    opt = build_optimizer(cfg, model)
    set_lr(opt, 0.5)  # a step large enough to compare against rounding
    before = [p.detach().clone() for p in trainable_parameters(model)]
    torch.manual_seed(1)  # the same in-batch key shuffle for the runs compared
    out = train_step(model, opt, *views, **precision)
    moved = [p.detach() - b for p, b in zip(trainable_parameters(model), before, strict=True)]
    return out, opt, moved


def test_an_fp16_step_with_the_scaler_updates_as_the_fp32_step_does():
    cfg, model, views = _model_and_views()
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    out16, _, moved16 = _step(cfg, model, views, autocast=torch.float16, scaler=scaler)
    out32, _, moved32 = _step(cfg, twin, views)
    u16, u32 = (torch.cat([m.flatten() for m in moved]) for moved in (moved16, moved32))
    assert u32.norm() > 1e-3  # the step did move the weights
    # fp16 rounding only (a random-init net, tiny BN groups): unscaled, the update would be 256x
    assert 0.8 < u16.norm() / u32.norm() < 1.25
    assert torch.nn.functional.cosine_similarity(u16, u32, dim=0) > 0.9
    assert torch.isfinite(out16["loss"]) and abs(out16["loss"] - out32["loss"]) < 0.05
    assert scaler.get_scale() == 2.0**8  # a clean step: no backoff (growth only after growth_interval steps)


def test_a_step_whose_fp16_gradients_overflow_is_skipped_and_the_scale_backs_off():
    cfg, model, views = _model_and_views()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # loss x 2^40 overflows fp16 (max 65504)
    out, opt, moved = _step(cfg, model, views, autocast=torch.float16, scaler=scaler)
    assert all(torch.equal(m, torch.zeros_like(m)) for m in moved)  # the optimizer step was skipped
    assert opt.state_dict()["state"] == {}  # no momentum buffer was made either
    assert scaler.get_scale() == 2.0**39  # backoff_factor 0.5
    assert torch.isfinite(out["loss"])  # the forward itself was fine


def test_clean_fp16_steps_grow_the_scale_after_growth_interval():
    cfg, model, views = _model_and_views()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)
    _, _, moved = _step(cfg, model, views, autocast=torch.float16, scaler=scaler)
    assert any(m.abs().sum() > 0 for m in moved)
    assert scaler.get_scale() == 2.0**5  # growth_factor 2 after one clean step
