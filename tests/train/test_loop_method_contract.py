"""The Worker's steps drive a method only through its contract: the momentum is scheduled where the method has one,
and left alone where it has none (SimCLR). The Worker's own ``_train_steps``, without Ray (one process, CPU)."""

from __future__ import annotations

import types

import pytest
import torch
from moco_helpers import TINY_MODEL

from moco_ray.config import load_config
from moco_ray.train.hooks import FaultHooks
from moco_ray.train.loop import Worker
from moco_ray.train.model import build_method
from moco_ray.train.schedule import momentum_at
from moco_ray.train.step import MixedPrecision, build_optimizer

STEPS = 2


def _steps(method: str):
    over = {**TINY_MODEL, "moco.method": method, "model.pred_hidden_dim": 24, "train.batch_size": 8, "train.epochs": 2}
    if method == "moco_v3":
        over["moco.momentum_schedule"] = "cosine"
    cfg = load_config(None, over)
    torch.manual_seed(0)
    model = build_method(cfg)
    w = types.SimpleNamespace(
        cfg=cfg, spec=types.SimpleNamespace(steps_per_epoch=STEPS, hooks=FaultHooks(), run_id="r"),
        device=torch.device("cpu"), progress=None, model=model, opt=build_optimizer(cfg, model), autocast=None,
        precision=MixedPrecision(),
        views=lambda b: (b["q"], b["k"]), global_step=0, rank=0,
    )  # fmt: skip
    size = cfg.aug.image_size
    batches = [{"q": torch.randn(8, 3, size, size), "k": torch.randn(8, 3, size, size)} for _ in range(STEPS)]
    sums, lr = Worker._train_steps(w, 0, iter(batches))
    assert w.global_step == STEPS and sums.shape == (3,) and torch.isfinite(sums[:2]).all() and lr > 0
    return cfg, model


@pytest.mark.parametrize("method", ["moco_v3", "moco_v2"])
def test_the_momentum_of_a_method_with_a_momentum_encoder_follows_the_schedule(method):
    cfg, model = _steps(method)
    assert model.momentum == momentum_at(cfg.moco, 0, STEPS - 1, STEPS, cfg.train.epochs)
    if method == "moco_v3":  # cosine: raised above its start value within the first epoch
        assert model.momentum > cfg.moco.momentum


def test_a_method_without_a_momentum_encoder_gets_no_momentum():
    _, model = _steps("simclr")
    assert model.momentum is None and "m" not in vars(model)
