"""GPU contract, collectives: what NCCL requires, checked on two real CPU processes.

What is real and what is emulated:
- NCCL's "no CPU backend" rule is real here: a group initialised as ``cuda:gloo`` has gloo registered for CUDA
  tensors only, and torch rejects a CPU tensor in any collective with the error a multi-GPU run would raise
  ("No backend type associated with device type cpu"). The old epoch path (CPU ``sums``) and a CPU model in
  ``broadcast_state`` fail exactly so.
- CUDA tensors do not exist on this machine, so the production functions are also run on ``meta`` tensors (a
  device that is not the host) through a thin seam: ``dist.all_reduce`` / ``dist.broadcast`` record the device of
  each tensor and skip the communication for ``meta`` ones (standing in for NCCL on a GPU); a CPU tensor still
  reaches the real ``cuda:gloo`` group and fails. So the test shows every collective receives a tensor on the
  training device, not that the values travel over NCCL.
- ``all_gather_object`` (the report's RNG states, the worker-node tags) serialises on the device torch picks for
  the group: the test checks torch picks CUDA for this group (Ray Train calls ``torch.cuda.set_device``), and in a
  plain gloo group that the gathered RNG states come back as CPU ByteTensors that restore the other rank's RNG.
- Start-up (issue item 3): with rank-dependent seeds, ``encoder_k``, the queue and the BN buffers differ across
  ranks after ``build_method`` (negative control) and are identical after ``broadcast_state`` (real gloo).
"""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from moco_helpers import TINY_MODEL, free_port

WORLD = 2
NO_CPU = "No backend type associated with device type cpu"


def _error(fn) -> str:
    try:
        fn()
    except RuntimeError as e:
        return str(e)
    return ""


def _cuda_only_group(rank: int, port: int) -> dict:
    from moco_ray.train import loop
    from moco_ray.train.model import build_method

    dist.init_process_group("cuda:gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    cfg = _cfg()
    out: dict = {
        "old_sums_error": _error(lambda: loop.mean_over_ranks_(torch.zeros(3, dtype=torch.float64), WORLD)),
        "cpu_model_error": _error(lambda: loop.broadcast_state(torch.nn.Linear(2, 2))),
        "object_device": str(dist.distributed_c10d._get_object_coll_device()),
    }
    seen: list[str] = []
    real = {name: getattr(dist, name) for name in ("all_reduce", "broadcast")}

    def seam(name):
        def call(t, *args, **kwargs):
            seen.append(f"{name}:{t.device.type}")
            return None if t.device.type == "meta" else real[name](t, *args, **kwargs)

        return call

    for name in real:
        setattr(dist, name, seam(name))
    try:
        sums = torch.zeros(3, dtype=torch.float64, device="meta")
        loop.mean_over_ranks_(sums, WORLD)
        model = build_method(cfg).to("meta")
        loop.broadcast_state(model)
        out["n_state"] = len(model.state_dict())
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    out["seen"] = seen
    dist.destroy_process_group()
    return out


def _gloo_group(rank: int, port: int) -> dict:
    from moco_ray.core.shuffle_bn import batch_shuffle_ddp, batch_unshuffle_ddp
    from moco_ray.train.checkpoint import set_rng_state
    from moco_ray.train.loop import broadcast_state, mean_over_ranks_, seed_everything
    from moco_ray.train.model import build_method
    from moco_ray.train.reporting import Reporter

    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    out: dict = {"mean": mean_over_ranks_(torch.tensor([1.0, 2.0]) * (rank + 1), WORLD).tolist()}
    # start-up as the Worker does it: rank-dependent seeds, build, (restore), broadcast
    seed_everything(7, rank)
    model = build_method(_cfg())
    g = torch.Generator().manual_seed(rank)
    model.encoder_k(torch.randn(4, 3, 16, 16, generator=g))  # rank-local BN statistics, as a restart could leave
    out["before"] = {k: v.clone() for k, v in model.state_dict().items()}
    broadcast_state(model)
    out["after"] = {k: v.clone() for k, v in model.state_dict().items()}
    # the report's RNG gathering: every rank's state, CPU ByteTensors, usable by set_rng_state
    states = Reporter._rng_states(types.SimpleNamespace(world=WORLD))
    out["rng_devices"] = [str(s["torch"].device) + ":" + str(s["torch"].dtype) for s in states]
    out["next_own"] = torch.rand(3)
    set_rng_state(states[1 - rank])
    out["next_other"] = torch.rand(3)
    # shuffle-BN's gather keeps channels_last (and the same values as the NCHW path)
    x = torch.randn(4, 3, 5, 6, generator=g)
    gen = torch.Generator().manual_seed(3)
    shuffled, unshuffle = batch_shuffle_ddp(x.contiguous(memory_format=torch.channels_last), gen)
    out["shuffle_cl"] = shuffled.is_contiguous(memory_format=torch.channels_last)
    back = batch_unshuffle_ddp(shuffled, unshuffle)
    out["unshuffle_cl"] = back.is_contiguous(memory_format=torch.channels_last)
    out["round_trip"] = torch.equal(back, x)
    dist.destroy_process_group()
    return out


def _cfg():
    from moco_ray.config import load_config

    return load_config(None, {**TINY_MODEL, "moco.queue_size": 32, "train.num_workers": 2, "train.batch_size": 8})


def _worker(rank: int, ports: tuple[int, int], out_dir: str) -> None:
    torch.set_num_threads(1)
    res = {"cuda_only": _cuda_only_group(rank, ports[0]), "gloo": _gloo_group(rank, ports[1])}
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    d = tmp_path_factory.mktemp("gpu_contract")
    mp.spawn(_worker, args=((free_port(), free_port()), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_cuda_only_group_rejects_cpu_tensors_like_nccl(ranks):
    """The emulation is faithful: the old epoch path (CPU sums) and a CPU model fail with NCCL's error."""
    for r in ranks:
        assert NO_CPU in r["cuda_only"]["old_sums_error"]
        assert NO_CPU in r["cuda_only"]["cpu_model_error"]


def test_epoch_reduction_and_broadcast_use_only_device_tensors(ranks):
    for r in ranks:
        seen = r["cuda_only"]["seen"]
        assert seen[0] == "all_reduce:meta"
        assert seen[1:] == ["broadcast:meta"] * r["cuda_only"]["n_state"]  # every parameter and buffer


def test_object_collectives_are_moved_to_the_gpu_by_torch(ranks):
    assert all(r["cuda_only"]["object_device"].startswith("cuda") for r in ranks)


def test_epoch_means_are_over_ranks(ranks):
    assert all(r["gloo"]["mean"] == [1.5, 3.0] for r in ranks)


def test_start_up_state_is_rank_0s_on_every_rank(ranks):
    a, b = ranks[0]["gloo"], ranks[1]["gloo"]
    # negative control: rank-dependent seeds give different key encoders, queues and BN statistics
    for key in ("encoder_k.backbone.conv1.weight", "queue.keys", "encoder_k.backbone.bn1.running_mean"):
        assert not torch.equal(a["before"][key], b["before"][key]), key
    for key, v in a["after"].items():
        assert torch.equal(v, b["after"][key]), key
        assert torch.equal(v, a["before"][key]), key  # rank 0's state


def test_gathered_rng_states_restore_the_other_rank(ranks):
    for r, other in ((ranks[0], ranks[1]), (ranks[1], ranks[0])):
        assert r["gloo"]["rng_devices"] == ["cpu:torch.uint8"] * WORLD
        assert torch.equal(r["gloo"]["next_other"], other["gloo"]["next_own"])


def test_shuffle_bn_gather_keeps_channels_last(ranks):
    for r in ranks:
        assert r["gloo"]["shuffle_cl"] and r["gloo"]["unshuffle_cl"] and r["gloo"]["round_trip"]
