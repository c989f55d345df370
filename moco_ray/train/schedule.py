"""Learning-rate and key-encoder momentum schedules, evaluated per step (the loop calls them every step)."""

from __future__ import annotations

import math

from moco_ray.config import MoCoConfig, OptimConfig


def lr_at(optim: OptimConfig, base_lr: float, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The learning rate at ``step`` (0-based) of ``epoch`` (0-based).

    cosine: linear warmup for ``warmup_epochs``, then half-cosine to 0 over the remaining epochs (MoCo v2);
    the per-step warm-up is moco-v3's ``lr x t / warmup`` (its first step at lr 0); a per-epoch warm-up (no paper
    uses one) is ``lr x (epoch + 1) / warmup``, so that its first epoch trains;
    step: x0.1 at each epoch in ``milestones`` (MoCo v1: 120 and 160 of 200); constant: base lr.
    ``schedule_unit``: ``step`` moves the cosine every step (fractional epoch, MoCo v3's per-iteration
    schedule); ``epoch`` holds it for the whole epoch (MoCo v1/v2's ``adjust_learning_rate(epoch)``).
    ``first_epoch`` shifts the epoch count (the CIFAR demo calls the first epoch 1).
    """
    per_step = optim.schedule_unit == "step"
    inc = 1.0 / max(steps_per_epoch, 1) if per_step else 1.0
    t = epoch + optim.first_epoch + (step * inc if per_step else 0.0)  # (fractional) epoch
    warmup = min(optim.warmup_epochs, max(epochs - 1, 0))  # as config.clip_warmup: a warm-up never fills the run
    if warmup > 0 and t < warmup:
        return base_lr * (t if per_step else t + 1.0) / warmup
    if optim.schedule == "cosine":
        span = max(epochs - warmup, 1e-8)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / span))
    if optim.schedule == "step":
        return base_lr * 0.1 ** sum(epoch + optim.first_epoch >= m for m in optim.milestones)
    return base_lr


def momentum_at(moco: MoCoConfig, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The key encoder's EMA coefficient at ``step`` of ``epoch`` (both 0-based).

    constant: ``moco.momentum``. cosine (MoCo v3's ``adjust_moco_momentum``, per iteration):
    ``1 - (1 - m) * (1 + cos(pi * t / epochs)) / 2`` with ``t`` the fractional epoch: m at the start, 1 at the end.
    """
    if moco.momentum_schedule == "constant":
        return moco.momentum
    t = epoch + step / max(steps_per_epoch, 1)
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * t / epochs)) * (1.0 - moco.momentum)
