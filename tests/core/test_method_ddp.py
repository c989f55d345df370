"""Two real gloo processes: MoCo v3 and SimCLR gather the global batch, so 2 x N/2 equals 1 x N.

The same global batch is split across the ranks. Modules are in eval mode so BN uses running statistics and each
embedding depends only on its own image; what remains is the cross-worker part: keys / embeddings gathered from
both ranks (SimCLR with gradient), the per-rank label offset, and DDP's gradient averaging.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from moco_helpers import free_port
from torch.nn.parallel import DistributedDataParallel as DDP

from moco_ray.core import MoCoV3, QueryEncoder, SimCLR
from moco_ray.core.encoders import Encoder, build_mlp_head

WORLD = 2
B = 4  # per-rank batch


def _global_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    im1 = torch.randn(WORLD * B, 3, 8, 8, generator=g)
    # second view: a perturbed copy, so positives are findable and acc1 is not trivially 0
    return im1, im1 + 0.5 * torch.randn(WORLD * B, 3, 8, 8, generator=g)


def _backbone() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)  # identical weights on every rank and in the single-process reference
    v3 = QueryEncoder(
        _backbone(), build_mlp_head(8, 32, 16, num_layers=3, last_bn=True), build_mlp_head(16, 24, 16, 2, True)
    )
    models = {
        "moco_v3": MoCoV3(v3, momentum=0.9, temperature=0.2),
        "simclr": SimCLR(Encoder(_backbone(), build_mlp_head(8, 32, 16)), temperature=0.5),
    }
    for model in models.values():
        model.eval()
    return models


def _step(model: nn.Module, im1: torch.Tensor, im2: torch.Tensor) -> dict[str, torch.Tensor]:
    out = model(im1, im2)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.query_module.named_parameters()}
    return {"loss": out["loss"].detach(), "acc1": out["acc1"], "grads": grads}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        im1, im2 = _global_data()
        mine = slice(rank * B, (rank + 1) * B)
        results = {}
        for name, model in _models().items():
            model.wrap_trainable(DDP)  # what the training loop does
            results[name] = _step(model, im1[mine], im2[mine])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(WORLD)]
    im1, im2 = _global_data()
    for name, model in _models().items():
        full = _step(model, im1, im2)
        per_rank = [r[name] for r in ranks]
        # each rank's rows see the negatives of the whole global batch: the mean over ranks is the full loss
        mean_loss = sum(r["loss"] for r in per_rank) / WORLD
        torch.testing.assert_close(mean_loss, full["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sum(r["acc1"] for r in per_rank) / WORLD, full["acc1"])
        assert not torch.allclose(per_rank[0]["loss"], per_rank[1]["loss"])  # the ranks really saw other data
        # after DDP's averaging every rank holds the gradient of the full-batch loss
        for r in per_rank:
            assert r["grads"].keys() == full["grads"].keys()
            for key, g in full["grads"].items():
                torch.testing.assert_close(r["grads"][key], g, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")
