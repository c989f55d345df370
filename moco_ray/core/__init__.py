"""The MoCo core: pure PyTorch (no Ray or MLflow imports), usable and testable on its own.

Names are imported lazily, so ``moco_ray.core.defaults`` (plain Python) can be read without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ContrastiveMethod": "method",
    "KeyQueue": "queue",
    "MoCo": "moco",
    "MoCoV3": "moco_v3",
    "QueryEncoder": "moco_v3",
    "SimCLR": "simclr",
    "build_backbone": "encoders",
    "build_mlp_head": "encoders",
    "contrastive_accuracy": "loss",
    "ctr_loss": "moco_v3",
    "info_nce": "loss",
    "momentum_update": "momentum",
    "nt_xent": "simclr",
    "torchvision_backbone": "encoders",
    "train_step": "step",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"moco_ray.core.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'moco_ray.core' has no attribute {name!r}")
