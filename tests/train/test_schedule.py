"""Learning-rate schedules: cosine with warm-up, MoCo v1's steps, and the linear scaling with the global batch."""

from __future__ import annotations

import pytest

from moco_ray.config import OptimConfig, load_config
from moco_ray.train.schedule import lr_at


def test_cosine_with_warmup():
    o = OptimConfig(schedule="cosine", warmup_epochs=2)
    assert lr_at(o, 1.0, 0, 0, 10, 12) == pytest.approx(0.1 / 2)  # first step of warmup
    assert lr_at(o, 1.0, 1, 9, 10, 12) == pytest.approx(1.0)  # last warmup step reaches the base lr
    assert lr_at(o, 1.0, 2, 0, 10, 12) == pytest.approx(1.0)
    assert lr_at(o, 1.0, 7, 0, 10, 12) == pytest.approx(0.5)  # half way through the cosine
    assert lr_at(o, 1.0, 11, 9, 10, 12) < 0.01


def test_step_schedule_of_moco_v1():
    o = OptimConfig(schedule="step", milestones=[120, 160])
    assert [lr_at(o, 0.03, e, 0, 5, 200) for e in (0, 119, 120, 159, 160, 199)] == pytest.approx(
        [0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003]
    )


def test_lr_scales_linearly_with_global_batch():
    cfg = load_config(None, ["optim.lr=0.03", "train.batch_size=1024", "moco.queue_size=4096"])
    assert cfg.lr == pytest.approx(0.12)
