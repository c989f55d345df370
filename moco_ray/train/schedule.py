"""Learning-rate schedules, evaluated per step so warmup and cosine are smooth within an epoch."""

from __future__ import annotations

import math

from moco_ray.config import OptimConfig


def lr_at(optim: OptimConfig, base_lr: float, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The learning rate at ``step`` (0-based) of ``epoch`` (0-based).

    cosine: linear warmup for ``warmup_epochs``, then half-cosine to 0 over the remaining epochs (MoCo v2);
    step: x0.1 at each epoch in ``milestones`` (MoCo v1: 120 and 160 of 200); constant: base lr.
    """
    t = epoch + step / max(steps_per_epoch, 1)  # fractional epoch
    warmup = min(optim.warmup_epochs, max(epochs - 1, 0))  # as config.clip_warmup: a warm-up never fills the run
    if warmup > 0 and t < warmup:
        return base_lr * (t + 1.0 / max(steps_per_epoch, 1)) / warmup
    if optim.schedule == "cosine":
        span = max(epochs - warmup, 1e-8)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / span))
    if optim.schedule == "step":
        return base_lr * 0.1 ** sum(epoch >= m for m in optim.milestones)
    return base_lr
