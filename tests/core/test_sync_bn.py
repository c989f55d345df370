"""Synchronised BatchNorm on two real gloo processes against one BatchNorm over the global batch."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from moco_helpers import free_port
from torch import nn

from moco_ray.core.sync_bn import GlobalBatchNorm, convert_sync_bn

WORLD = 2
B = 6  # per-rank batch


def _net() -> nn.Sequential:
    torch.manual_seed(0)  # the same weights in every process
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5, affine=False),  # MoCo v3's last projector BN
    )


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(WORLD * B, 3, 8, 8, generator=g) * 3 + 1  # off-centre: a wrong mean shows


def _steps(net: nn.Module, x: torch.Tensor, steps: int = 2) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Two forward/backward passes (the running stats move twice); the output and the grads of the last."""
    for _ in range(steps):
        net.zero_grad()
        y = net(x)
        (y.square().mean() + y[:, 0].mean()).backward()
    return y.detach(), [p.grad.clone() for p in net.parameters()]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        net = convert_sync_bn(_net(), "cpu")
        y, grads = _steps(net, _batch()[rank * B : (rank + 1) * B])
        for g in grads:  # what DDP does: the mean of the ranks' gradients
            dist.all_reduce(g)
            g /= WORLD
        # importing torch.distributed.nn in a process with a group makes its exit abort (SIGABRT, now and then)
        loaded_dist_nn = "torch.distributed.nn" in sys.modules
        torch.save(
            {"y": y, "grads": grads, "state": net.state_dict(), "dist_nn": loaded_dist_nn}, f"{out_dir}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_normalise_with_the_global_batch(tmp_path):
    """Outputs, running stats and the DDP-averaged gradients of two ranks with half the batch each equal one
    process's plain BatchNorm over the whole batch. Mutations caught: statistics not all-reduced (per-rank BN:
    outputs differ); the all-reduce made non-differentiable (``dist.all_reduce`` on a detached copy: gradients
    differ); running variance biased (running_var differs); the count left out of the reduction (mean x2);
    torch.distributed.nn's all_reduce back in (its import made the workers' exit abort in ~1 of 3 runs here and
    failed CI: caught every time by ``dist_nn``)."""
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ref = _net()
    y_ref, g_ref = _steps(ref, _batch())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y_ref, rtol=1e-4, atol=1e-5)
    assert not any(r["dist_nn"] for r in ranks)
    for r in ranks:
        for g, want in zip(r["grads"], g_ref):
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)
        assert r["state"].keys() == ref.state_dict().keys()  # checkpoints and exports keep BatchNorm's names
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-4, atol=1e-6)


def test_conversion_by_device_keeps_parameters_and_names():
    """CUDA gets torch's SyncBatchNorm (the official conversion), anything else GlobalBatchNorm; the same
    Parameter objects stay in place (an optimizer built before the conversion still updates them) and one process
    without a group is plain BatchNorm. Mutation caught: new Parameters instead of the originals."""
    net = _net()
    weight = net[1].weight
    assert isinstance(convert_sync_bn(_net(), "cuda")[1], nn.SyncBatchNorm)
    conv = convert_sync_bn(net, "cpu")
    assert isinstance(conv[1], GlobalBatchNorm) and isinstance(conv[5], GlobalBatchNorm)
    assert conv[1].weight is weight and conv[5].weight is None
    x = _batch()
    plain = _net()
    torch.testing.assert_close(conv(x), plain(x))  # no process group: BatchNorm's own path, same running stats
    torch.testing.assert_close(conv.state_dict(), plain.state_dict())
    with pytest.raises(ValueError, match="at least 2D"):
        GlobalBatchNorm(3)(torch.zeros(3))
