"""Keeping BatchNorm from leaking batch statistics between query and key (the "cheating" of MoCo §3.3).

Two faithful implementations:
- ``batch_shuffle_ddp`` / ``batch_unshuffle_ddp``: shuffle-BN across DDP workers. The key batch is gathered from
  all workers, permuted with a permutation that rank 0 draws and broadcasts, and each worker encodes a slice of it,
  so the keys' BN statistics come from a different sub-batch than their queries'.
- ``SplitBatchNorm``: for one process, BN over ``num_splits`` groups of the batch (the official CIFAR demo), with
  an in-batch shuffle of the keys, which mimics shuffle-BN over ``num_splits`` simulated workers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moco_ray.core.distributed import all_gather_nograd, rank, world_size


@torch.no_grad()
def batch_shuffle_ddp(x: torch.Tensor, generator: torch.Generator | None = None):
    """Gather x from all workers, shuffle with rank 0's permutation, return (this worker's slice, unshuffle idx).

    Requires equal per-worker batch sizes (the data stream guarantees it with drop_last).
    """
    local_b = x.shape[0]
    x_all = all_gather_nograd(x)
    n_all = x_all.shape[0]
    perm = torch.randperm(n_all, device=x.device, generator=generator) if rank() == 0 else None
    if perm is None:
        perm = torch.empty(n_all, dtype=torch.long, device=x.device)
    if world_size() > 1:
        dist.broadcast(perm, src=0)
    unshuffle = torch.argsort(perm)
    r = rank()
    return x_all[perm[r * local_b : (r + 1) * local_b]], unshuffle


@torch.no_grad()
def batch_unshuffle_ddp(x: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`batch_shuffle_ddp`: gather the encoded slices and take back this worker's own rows."""
    local_b = x.shape[0]
    x_all = all_gather_nograd(x)
    r = rank()
    return x_all[unshuffle[r * local_b : (r + 1) * local_b]]


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises each of ``num_splits`` equal groups of the batch separately.

    Same parameters and buffers as ``nn.BatchNorm2d`` (so state dicts load into plain torchvision models); the
    running statistics are the average over the groups. In eval mode it is an ordinary BatchNorm2d.
    """

    def __init__(self, num_features: int, num_splits: int = 8, **kw) -> None:
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        if n % self.num_splits:
            raise ValueError(f"SplitBatchNorm: batch {n} is not divisible by num_splits={self.num_splits}")
        g = self.num_splits
        rm = self.running_mean.repeat(g)
        rv = self.running_var.repeat(g)
        out = F.batch_norm(
            x.reshape(n // g, c * g, h, w),
            rm,
            rv,
            self.weight.repeat(g),
            self.bias.repeat(g),
            True,
            self.momentum,
            self.eps,
        ).reshape(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(rm.view(g, c).mean(dim=0))
            self.running_var.copy_(rv.view(g, c).mean(dim=0))
            self.num_batches_tracked += 1
        return out


def split_bn_factory(num_splits: int):
    """A ``norm_layer`` for torchvision constructors."""

    def make(num_features: int) -> SplitBatchNorm:
        return SplitBatchNorm(num_features, num_splits)

    return make
