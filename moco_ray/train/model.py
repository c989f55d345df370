"""Build the self-supervised method named in the config around a torchvision encoder (config -> core modules)."""

from __future__ import annotations

import torch.nn as nn

from moco_ray.config import Config
from moco_ray.core.backbone_io import backbone_of
from moco_ray.core.encoders import build_encoder
from moco_ray.core.moco import MoCo
from moco_ray.core.moco_v3 import MoCoV3, build_query_encoder
from moco_ray.core.shuffle_bn import split_bn_factory
from moco_ray.core.simclr import SimCLR


def build_method(cfg: Config) -> nn.Module:
    """The method's module. Its ``forward(im_q, im_k)`` returns a dict with ``loss`` and ``acc1``."""
    m, mo = cfg.model, cfg.moco
    bn_mode = cfg.bn_mode
    norm = split_bn_factory(mo.bn_splits) if bn_mode == "split" and mo.bn_splits > 1 else None
    if mo.method in ("moco_v1", "moco_v2"):
        head = "linear" if m.head == "linear" else "mlp"
        enc = build_encoder(
            m.arch,
            m.small_stem,
            head,
            m.dim,
            m.hidden_dim,
            norm_layer=norm,
            head_bn=m.head_bn,
            zero_init_residual=m.zero_init_residual,
        )
        return MoCo(
            enc,
            dim=m.dim,
            queue_size=mo.queue_size,
            momentum=mo.momentum,
            temperature=mo.temperature,
            symmetric=mo.symmetric,
            bn_mode=bn_mode,
        )
    # MoCo v3 and SimCLR use plain BN (the papers use SyncBN across workers): their negatives are the other
    # samples of the same batch, encoded by the same BN call, so no sample's positive is singled out by batch
    # statistics the way MoCo's key (same batch) is against its queue negatives (earlier batches).
    if mo.method == "moco_v3":
        if m.head != "mlp":
            raise ValueError(f"model.head: {m.head!r} is not supported by moco_v3; use mlp")
        enc = build_query_encoder(
            m.arch,
            m.small_stem,
            m.dim,
            m.hidden_dim,
            m.pred_hidden_dim,
            proj_layers=m.proj_layers,
            zero_init_residual=m.zero_init_residual,
        )
        return MoCoV3(enc, momentum=mo.momentum, temperature=mo.temperature, symmetric=mo.symmetric)
    if mo.method == "simclr":
        enc = build_encoder(m.arch, m.small_stem, m.head, m.dim, m.hidden_dim, zero_init_residual=m.zero_init_residual)
        return SimCLR(enc, temperature=mo.temperature)
    raise ValueError(f"moco.method: {mo.method!r} is not one of moco_v1, moco_v2, moco_v3, simclr")


__all__ = ["backbone_of", "build_method"]
