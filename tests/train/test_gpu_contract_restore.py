"""GPU contract, restore: RNG states stay CPU ByteTensors whatever the checkpoint's map location.

``map_location="meta"`` stands in for a GPU (a device that is not the host); on a GPU the old loader put the RNG
states on CUDA and ``torch.set_rng_state`` raised "RNG state must be a torch.ByteTensor". The CUDA RNG tests
replace ``torch.cuda``'s RNG functions with recorders (no GPU here) and check which state reaches them.
"""

from __future__ import annotations

import types

import pytest
import torch
from moco_helpers import TINY_MODEL

from moco_ray.config import load_config
from moco_ray.core.backbone_io import plain_state_dict
from moco_ray.tracking.history import EpochMetrics
from moco_ray.train.checkpoint import TrainState, load_state, rng_state, save_state, set_rng_state
from moco_ray.train.loop import Worker
from moco_ray.train.model import build_method
from moco_ray.train.step import MixedPrecision, build_optimizer


def _checkpoint(tmp_path) -> tuple[torch.Tensor, dict]:
    """A checkpoint written as the Reporter writes it (2 ranks' RNG states); the draws that follow each state."""
    cfg = load_config(None, {**TINY_MODEL, "moco.queue_size": 32, "train.batch_size": 8})
    model = build_method(cfg)
    rngs, nexts = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        rngs.append(rng_state())
        nexts.append(torch.rand(4))
    epoch = EpochMetrics(epoch=3, loss=1.0, acc1=0.5, lr=0.03, epoch_seconds=1.0, images_per_s=8.0, corrupt_images=0)
    state = TrainState(
        model=plain_state_dict(model),
        optimizer=build_optimizer(cfg, model).state_dict(),
        epoch=3,
        global_step=12,
        rng=rngs,
        history=[epoch],
        config=cfg.to_dict(),
        run_id="r",
    )
    save_state(tmp_path, state)
    return torch.stack(nexts), {"cfg": cfg, "state": state}


def test_rng_states_stay_on_the_cpu_for_any_map_location(tmp_path):
    nexts, _ = _checkpoint(tmp_path)
    state = load_state(tmp_path, map_location="meta")
    assert state.model["queue.keys"].device.type == "meta"  # the rest moved
    for r, rng in enumerate(state.rng):
        assert rng["torch"].device.type == "cpu" and rng["torch"].dtype == torch.uint8
        set_rng_state(rng)
        assert torch.equal(torch.rand(4), nexts[r])


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # meta copies are no-ops
def test_worker_restores_from_a_saved_checkpoint_onto_a_non_cpu_model(tmp_path):
    """The Worker's own ``_load`` with its default loader, into a model that is not on the host (meta)."""
    nexts, saved = _checkpoint(tmp_path)
    model = build_method(saved["cfg"]).to("meta")
    opt = build_optimizer(saved["cfg"], model)
    w = types.SimpleNamespace(model=model, opt=opt, precision=MixedPrecision(), rank=1, reporter=None)
    Worker._load(w, load_state(tmp_path))
    assert (w.start_epoch, w.global_step, w.history) == (4, 12, saved["state"].history)
    assert torch.equal(torch.rand(4), nexts[1])  # rank 1 continues its own stream


def _fake_cuda(monkeypatch, device: int) -> list[torch.Tensor]:
    got: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((8,), 40, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": got.append(s))
    return got


def test_cuda_rng_saved_for_this_device_only_and_restored_from_either_format(monkeypatch):
    got = _fake_cuda(monkeypatch, device=1)
    state = rng_state()
    assert torch.equal(state["cuda"], torch.full((8,), 40, dtype=torch.uint8))  # one tensor, not a list
    set_rng_state(state)
    old = dict(state, cuda=[torch.full((8,), d, dtype=torch.uint8) for d in range(3)])  # all visible devices
    set_rng_state(old)
    fewer = dict(state, cuda=[torch.zeros(8, dtype=torch.uint8)])  # resumed on more GPUs than saved
    set_rng_state(fewer)
    assert [int(s[0]) for s in got] == [40, 1, 0]
    assert all(s.device.type == "cpu" for s in got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_checkpoint_mapped_to_the_gpu_restores_rng_states(tmp_path):
    nexts, _ = _checkpoint(tmp_path)
    state = load_state(tmp_path, map_location="cuda")
    assert state.model["queue.keys"].is_cuda
    set_rng_state(state.rng[0])
    assert torch.equal(torch.rand(4), nexts[0])
    torch.cuda.init()
    set_rng_state(rng_state())  # this device's CUDA state round-trips
