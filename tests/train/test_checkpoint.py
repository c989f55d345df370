"""The checkpoint format: TrainState <-> state.pt (weights only, RNG states, typed history), and the dict layout of
earlier versions still loading."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from checkpoint_states import EPOCH_0, train_state

from moco_ray.config import load_config
from moco_ray.tracking.history import EpochMetrics
from moco_ray.train.checkpoint import STATE_FILE, load_state, rng_state, save_state, set_rng_state


def test_checkpoint_roundtrip_weights_only_with_rng_states(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = train_state({"w": torch.randn(3)}, 2, [rng_state()], [EpochMetrics.from_dict(EPOCH_0)])
    expected = (torch.rand(2), np.random.rand(2), random.random())
    save_state(tmp_path, state)
    loaded = load_state(tmp_path)  # torch.load(weights_only=True) inside
    assert torch.equal(loaded.model["w"], state.model["w"]) and loaded.epoch == 2
    set_rng_state(loaded.rng_of(0))
    again = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1]) and again[2] == expected[2]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="not a moco-ray checkpoint"):
        load_state(tmp_path / "missing")
    assert loaded.history == state.history and math.isfinite(loaded.history[0].loss)
    raw = torch.load(tmp_path / STATE_FILE, weights_only=True)  # on disk: a plain dict, history as plain dicts
    assert sorted(raw) == ["config", "epoch", "global_step", "history", "model", "optimizer", "rng", "run_id"]
    assert raw["history"] == [EPOCH_0]


def test_a_checkpoint_in_the_dict_layout_of_earlier_versions_loads(tmp_path):
    """Checkpoints written before TrainState existed: the same dict, saved by ``torch.save`` directly; history
    entries as plain dicts, with knn_top1 only in the epochs it ran and no data-wait figures in the oldest."""
    cfg = load_config(None, ["train.batch_size=16", "moco.queue_size=32"])
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.manual_seed(7)
    rngs = [rng_state(), rng_state()]
    after = torch.rand(2)
    old_epoch = {k: v for k, v in EPOCH_0.items() if not k.startswith("data_wait")}  # before data-wait existed
    history = [old_epoch, {**EPOCH_0, "epoch": 1, "knn_top1": 0.5}]
    layout = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 1,
        "global_step": 8,
        "rng": rngs,
        "history": history,
        "config": cfg.to_dict(),
        "run_id": "0123abcd",
    }
    tmp_path.mkdir(exist_ok=True)
    torch.save(layout, tmp_path / STATE_FILE)
    state = load_state(tmp_path)
    assert (state.epoch, state.global_step, state.run_id, state.config) == (1, 8, "0123abcd", cfg.to_dict())
    assert state.history[0].data_wait_seconds is None and state.history[0].knn_top1 is None
    assert state.scaler is None  # before fp16's GradScaler: an fp16 resume starts at the initial scale
    assert state.history[1].knn_top1 == 0.5 and state.history[1].data_wait_frac == 0.25
    assert [h.as_dict() for h in state.history] == history  # nothing added, nothing lost
    restored = torch.nn.Linear(3, 2)
    restored.load_state_dict(state.model)
    assert torch.equal(restored.weight, model.weight)
    opt2 = torch.optim.SGD(restored.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(state.optimizer)
    momentum = [o.state_dict()["state"][0]["momentum_buffer"] for o in (opt, opt2)]
    assert torch.equal(*momentum)
    set_rng_state(state.rng_of(3))  # a rank the run did not have: rank 0's states
    assert torch.equal(torch.rand(2), after)
    save_state(tmp_path / "again", state)  # and written back in the same layout
    again = torch.load(tmp_path / "again" / STATE_FILE, weights_only=True)
    assert sorted(again) == sorted(layout) and again["history"] == history and again["epoch"] == 1
