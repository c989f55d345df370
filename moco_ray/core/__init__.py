"""The MoCo core: pure PyTorch (no Ray or MLflow imports), usable and testable on its own."""

from moco_ray.core.encoders import build_backbone, build_mlp_head, torchvision_backbone
from moco_ray.core.loss import contrastive_accuracy, info_nce
from moco_ray.core.methods import MoCo, build_method
from moco_ray.core.moco_v3 import MoCoV3, QueryEncoder, ctr_loss
from moco_ray.core.momentum import momentum_update
from moco_ray.core.queue import KeyQueue
from moco_ray.core.simclr import SimCLR, nt_xent

__all__ = [
    "KeyQueue",
    "MoCo",
    "MoCoV3",
    "QueryEncoder",
    "SimCLR",
    "build_backbone",
    "build_method",
    "build_mlp_head",
    "contrastive_accuracy",
    "ctr_loss",
    "info_nce",
    "momentum_update",
    "nt_xent",
    "torchvision_backbone",
]
