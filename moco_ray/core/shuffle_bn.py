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

from moco_ray.core.distributed import rank, world_size


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out so (and not also plain contiguous), else the contiguous format."""
    cl = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


@torch.no_grad()
def _gather_keep_format(x: torch.Tensor) -> torch.Tensor:
    """:func:`all_gather_nograd` in ``x``'s memory format: a channels_last key batch is gathered, indexed and
    encoded without two layout copies (``all_gather_nograd`` sends ``x.contiguous()``, which is NCHW)."""
    if world_size() == 1:
        return x
    x = x.contiguous(memory_format=_memory_format(x))
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)


@torch.no_grad()
def batch_shuffle_ddp(x: torch.Tensor, generator: torch.Generator | None = None):
    """Gather x from all workers, shuffle with rank 0's permutation, return (this worker's slice, unshuffle idx).

    Requires equal per-worker batch sizes (the data stream guarantees it with drop_last).
    """
    local_b = x.shape[0]
    x_all = _gather_keep_format(x)
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
    x_all = _gather_keep_format(x)
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
        if _memory_format(x) == torch.channels_last:
            return self._forward_channels_last(x)
        g = self.num_splits
        rm = self.running_mean.repeat(g)
        rv = self.running_var.repeat(g)
        out = F.batch_norm(
            x.reshape(n // g, c * g, h, w),
            rm,
            rv,
            None if self.weight is None else self.weight.repeat(g),
            None if self.bias is None else self.bias.repeat(g),
            True,
            self.momentum,
            self.eps,
        ).reshape(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(rm.view(g, c).mean(dim=0))
            self.running_var.copy_(rv.view(g, c).mean(dim=0))
            self.num_batches_tracked += 1
        return out

    def _forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """The same normalisation without leaving channels_last (the reshape above would copy to NCHW and back).

        Sample ``i * g + j`` belongs to split ``j`` in both paths; ``x.unflatten(0, (n // g, g))`` is a view in
        channels_last, so the statistics and the affine map (one fused ``addcmul``) keep the input's layout.
        Statistics of a bf16/fp16 input are computed in fp32, as cuDNN's batch norm does.
        """
        n, c, h, w = x.shape
        g = self.num_splits
        x5 = x.unflatten(0, (n // g, g))  # [n/g, g, c, h, w], strides still channels_last
        xf = x5.float() if x5.dtype in (torch.float16, torch.bfloat16) else x5
        var, mean = torch.var_mean(xf, dim=(0, 3, 4), correction=0, keepdim=True)  # [1, g, c, 1, 1]
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.view(1, 1, c, 1, 1)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.view(1, 1, c, 1, 1)
        out = torch.addcmul(shift, xf, scale).to(x.dtype).flatten(0, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                count = (n // g) * h * w
                unbiased = var.view(g, c) * (count / max(count - 1, 1))
                self.running_mean.lerp_(mean.view(g, c).mean(dim=0).to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.mean(dim=0).to(self.running_var.dtype), m)
        return out


def split_bn_factory(num_splits: int):
    """A ``norm_layer`` for torchvision constructors."""

    def make(num_features: int) -> SplitBatchNorm:
        return SplitBatchNorm(num_features, num_splits)

    return make
