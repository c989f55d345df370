"""Synchronised BatchNorm: every BatchNorm normalises with the statistics of the global batch, across all workers.

MoCo v3 converts every BatchNorm of the model (backbone and heads) with ``SyncBatchNorm.convert_sync_batchnorm``
before DDP wrapping; per-worker BN would normalise each GPU's slice (e.g. 256 of 4096 images) on its own.
`convert_sync_bn` does that conversion: on CUDA to torch's ``SyncBatchNorm`` (its fused kernels, as official), on
CPU (gloo workers, which torch's ``SyncBatchNorm`` refuses) to `GlobalBatchNorm`, the same arithmetic written with
one differentiable all-reduce, so the CPU tests and CPU clusters run the recipe the GPUs run. Both keep the
parameter and buffer names of the BatchNorm they replace: checkpoints and exported encoders are unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from moco_ray.core.distributed import all_reduce_grad


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of a process group, for any device (gloo on CPU included).

    Training with a group of more than one rank: per-channel sum, sum of squares and count are all-reduced (one
    collective, differentiable: its backward all-reduces the gradients, as torch's SyncBatchNorm does), then the
    batch is normalised with the global mean and biased variance, and the running stats take the global unbiased
    variance. Otherwise (eval, one process): plain BatchNorm.
    """

    def __init__(self, *args, process_group: dist.ProcessGroup | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _group_size(self) -> int:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self._group_size() <= 1:
            return super().forward(input)
        c = input.size(1)
        x = input.float()  # statistics in fp32 under autocast, as torch's SyncBatchNorm computes them
        dims = [0, *range(2, x.dim())]
        count = x.new_full((1,), x.numel() // c)
        stats = all_reduce_grad(torch.cat([x.sum(dims), (x * x).sum(dims), count]), group=self.process_group)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach() * n / (n - 1).clamp_min(1.0))
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        self.running_var.mul_(1 - m).add_(unbiased_var.to(self.running_var.dtype), alpha=m)


def convert_sync_bn(module: nn.Module, device_type: str, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Every BatchNorm of ``module`` made synchronised, before DDP wrapping: torch's ``SyncBatchNorm`` when the
    model trains on CUDA, `GlobalBatchNorm` otherwise. Weights, buffers and their names are kept."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _convert_global(module, process_group)


def _convert_global(module: nn.Module, process_group: dist.ProcessGroup | None) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm | nn.SyncBatchNorm):
        out = GlobalBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group=process_group,
        )
        if module.affine:  # the same Parameter objects (as torch's convert_sync_batchnorm): optimizer, freezing
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_global(child, process_group))
    return out


__all__ = ["GlobalBatchNorm", "convert_sync_bn"]
