"""Learning-rate schedules and the checkpoint format (pure, no Ray)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from moco_ray.config import OptimConfig, load_config
from moco_ray.jobs.resolve import latest_checkpoint
from moco_ray.train.checkpoint import STATE_FILE, is_complete, load_state, rng_state, save_state, set_rng_state
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


def test_checkpoint_roundtrip_weights_only_with_rng_states(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = {"model": {"w": torch.randn(3)}, "epoch": 2, "history": [{"epoch": 0.0, "loss": 1.5}], "rng": [rng_state()]}
    expected = (torch.rand(2), np.random.rand(2), random.random())
    save_state(tmp_path, state)
    loaded = load_state(tmp_path)  # torch.load(weights_only=True) inside
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 2
    set_rng_state(loaded["rng"][0])
    again = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1]) and again[2] == expected[2]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="not a moco-ray checkpoint"):
        load_state(tmp_path / "missing")
    assert math.isfinite(loaded["history"][0]["loss"])


def test_resume_skips_a_checkpoint_cut_short_while_being_copied(tmp_path, capsys):
    """A Ctrl-C while Ray copies a reported checkpoint into the run's storage leaves a truncated state.pt in the
    newest checkpoint directory (seen in CI: resume then died in torch.load). Resume takes the newest whole one."""
    state = {"model": {"w": torch.randn(64, 64)}, "epoch": 0}
    old = save_state(tmp_path / "checkpoint_2026-12-03_00-00-00.000000", state)
    new = save_state(tmp_path / "checkpoint_2026-12-03_00-00-09.000000", {**state, "epoch": 1})
    whole = new.read_bytes()
    assert is_complete(old) and is_complete(new)
    assert latest_checkpoint(str(tmp_path)) == str(new.parent)
    for cut in (1, 21, 22, 100, len(whole) // 2, len(whole) - 1):  # inside the end record, the directory, the data
        new.write_bytes(whole[: len(whole) - cut])
        assert not is_complete(new), cut
        assert latest_checkpoint(str(tmp_path)) == str(old.parent)
        assert f"skipping {new.parent.name}: its {STATE_FILE} is incomplete" in capsys.readouterr().out
    assert load_state(latest_checkpoint(str(tmp_path)))["epoch"] == 0
    old.write_bytes(b"")
    assert latest_checkpoint(str(tmp_path)) is None  # nothing whole: the caller's "no checkpoint found"
