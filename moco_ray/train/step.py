"""The optimizer the training step steps, and its learning rate: used by the Ray Train loop and the benchmarks.

The step itself (:func:`~moco_ray.core.step.train_step`) is pure PyTorch and lives in the core, where the core's
tests use it too; it is re-exported here so the loop, the benchmarks and the tests import step and optimizer from
one place. ``build_optimizer`` stays here because it reads the config.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moco_ray.config import Config
from moco_ray.core.step import train_step, trainable_parameters
from moco_ray.train.lars import LARS

__all__ = ["build_optimizer", "set_lr", "train_step", "trainable_parameters"]


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (or MoCo v3's LARS, ``optim.optimizer: lars``) with the config's momentum and weight decay at the
    batch-scaled learning rate ``cfg.lr``."""
    o = cfg.optim
    if o.optimizer == "lars":
        return LARS(trainable_parameters(model), lr=cfg.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    return torch.optim.SGD(trainable_parameters(model), lr=cfg.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
