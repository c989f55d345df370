"""The optimizer the training step steps, and its learning rate: used by the Ray Train loop and the benchmarks.

The step itself (:func:`~moco_ray.core.step.train_step`) is pure PyTorch and lives in the core, where the core's
tests use it too; it is re-exported here so the loop, the benchmarks and the tests import step and optimizer from
one place. ``build_optimizer`` and :class:`MixedPrecision` stay here because they read the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from moco_ray.config import Config
from moco_ray.core.step import train_step, trainable_parameters
from moco_ray.train.lars import LARS

__all__ = ["MixedPrecision", "build_optimizer", "set_lr", "train_step", "trainable_parameters"]


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (or MoCo v3's LARS, ``optim.optimizer: lars``) with the config's momentum and weight decay at the
    batch-scaled learning rate ``cfg.lr``; ``adamw``: MoCo v3's ViT optimizer, ``torch.optim.AdamW(params, lr,
    weight_decay=wd)`` with torch's default betas and eps and the decay on every parameter (no exclusions), as
    main_moco.py builds it (frozen parameters, e.g. the stop-grad patch projection, take no step either way)."""
    o = cfg.optim
    if o.optimizer == "adamw":
        return torch.optim.AdamW(trainable_parameters(model), lr=cfg.lr, weight_decay=o.weight_decay)
    if o.optimizer == "lars":
        return LARS(trainable_parameters(model), lr=cfg.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    return torch.optim.SGD(trainable_parameters(model), lr=cfg.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


@dataclass
class MixedPrecision:
    """What ``train.precision`` means on one device: the forward's autocast dtype and fp16's loss scaler.

    Mixed precision is a GPU setting: on a CPU worker every precision trains fp32 (CPU autocast is emulated, slow,
    on most CPUs). ``fp16`` carries a ``torch.amp.GradScaler`` (moco-v3 main_moco.py's AMP), whose state travels
    in the checkpoint (:attr:`~moco_ray.train.checkpoint.TrainState.scaler`) so a resume continues its scale.
    """

    autocast: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def of(cls, precision: str, device: torch.device) -> MixedPrecision:
        if device.type != "cuda" or precision == "fp32":
            return cls()
        if precision == "bf16":
            return cls(torch.bfloat16)
        return cls(torch.float16, torch.amp.GradScaler(device.type))  # moco-v3: torch.cuda.amp.GradScaler()

    def state_dict(self) -> dict[str, Any] | None:
        """The scaler's state (plain floats and ints: reads its scale once, at a checkpoint), None without one."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore a checkpoint's scaler state; a checkpoint without one (fp32/bf16, older files) leaves the
        scaler at its initial scale, and a CPU worker (no scaler) ignores it."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
