"""Learning-rate schedules: cosine with warm-up, MoCo v1's steps, and the linear scaling with the global batch."""

from __future__ import annotations

import math

import pytest

from moco_ray.config import OptimConfig, load_config
from moco_ray.train.schedule import lr_at


def test_cosine_with_warmup():
    o = OptimConfig(schedule="cosine", warmup_epochs=2)
    assert lr_at(o, 1.0, 0, 0, 10, 12) == 0.0  # first step of warmup: moco-v3's lr x t / warmup at t = 0
    assert lr_at(o, 1.0, 1, 9, 10, 12) == pytest.approx(0.95)  # last warmup step, one step short of the base lr
    assert lr_at(o, 1.0, 2, 0, 10, 12) == pytest.approx(1.0)
    assert lr_at(o, 1.0, 7, 0, 10, 12) == pytest.approx(0.5)  # half way through the cosine
    assert lr_at(o, 1.0, 11, 9, 10, 12) < 0.01


def _moco_v3_adjust_learning_rate(lr: float, epoch: float, warmup_epochs: int, epochs: int) -> float:
    """moco-v3 main_moco.py's ``adjust_learning_rate``, transcribed (called with ``epoch + i / iters_per_epoch``)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_per_step_schedule_is_moco_v3s_value_for_value():
    """Every step of a 10-epoch run with 3 warm-up epochs, against the official function. Mutation caught: the
    previous warm-up, ``lr x (t + 1 / iters) / warmup`` (one step ahead), fails at every warm-up step."""
    o = load_config(None, ["moco.method=moco_v3", "optim.warmup_epochs=3", "train.epochs=10"]).optim
    assert o.schedule == "cosine" and o.schedule_unit == "step"
    iters = 7
    ours = [lr_at(o, 2.0, e, i, iters, 10) for e in range(10) for i in range(iters)]
    official = [_moco_v3_adjust_learning_rate(2.0, e + i / iters, 3, 10) for e in range(10) for i in range(iters)]
    assert ours == pytest.approx(official, rel=1e-12, abs=1e-15)


def test_per_epoch_warmup_trains_in_its_first_epoch():
    o = OptimConfig(schedule="cosine", schedule_unit="epoch", warmup_epochs=2)
    assert [lr_at(o, 1.0, e, 5, 10, 12) for e in (0, 1, 2)] == pytest.approx([0.5, 1.0, 1.0])


def test_step_schedule_of_moco_v1():
    o = OptimConfig(schedule="step", milestones=[120, 160])
    assert [lr_at(o, 0.03, e, 0, 5, 200) for e in (0, 119, 120, 159, 160, 199)] == pytest.approx(
        [0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003]
    )


def test_lr_scales_linearly_with_global_batch():
    cfg = load_config(None, ["optim.lr=0.03", "train.batch_size=1024", "moco.queue_size=4096"])
    assert cfg.lr == pytest.approx(0.12)
