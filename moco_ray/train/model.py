"""Build the self-supervised method named in the config around its backbone (config -> core modules).

The backbone (torchvision ResNet or moco-v3 ViT) comes from ``cfg.backbone``, the one typed description of it.

``METHODS`` maps ``moco.method`` to a builder; core's methods take plain arguments (core does not know the config),
so this is where a config's fields become a method's constructor arguments. A new method is one builder here and
one :class:`~moco_ray.core.method.ContrastiveMethod` implementation in core.
"""

from __future__ import annotations

from collections.abc import Callable

from moco_ray.config import Config
from moco_ray.core.encoders import build_encoder
from moco_ray.core.method import ContrastiveMethod
from moco_ray.core.moco import MoCo
from moco_ray.core.moco_v3 import MoCoV3, build_query_encoder
from moco_ray.core.shuffle_bn import split_bn_factory
from moco_ray.core.simclr import SimCLR
from moco_ray.core.sync_bn import convert_sync_bn


def _moco(cfg: Config) -> MoCo:
    """MoCo v1/v2: the queue's keys need de-leaked BN (``cfg.bn_mode``: shuffle-BN across workers, or split BN)."""
    m, mo = cfg.model, cfg.moco
    norm = split_bn_factory(mo.bn_splits) if cfg.bn_mode == "split" and mo.bn_splits > 1 else None
    head = "linear" if m.head == "linear" else "mlp"
    enc = build_encoder(
        cfg.backbone,
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
        bn_mode=cfg.bn_mode,
    )


# MoCo v3 and SimCLR use plain BN (the papers use SyncBN across workers): their negatives are the other samples of
# the same batch, encoded by the same BN call, so no sample's positive is singled out by batch statistics the way
# MoCo's key (same batch) is against its queue negatives (earlier batches).


def _moco_v3(cfg: Config) -> MoCoV3:
    m, mo = cfg.model, cfg.moco
    if m.head != "mlp":
        raise ValueError(f"model.head: {m.head!r} is not supported by moco_v3; use mlp")
    enc = build_query_encoder(
        cfg.backbone,
        m.small_stem,
        m.dim,
        m.hidden_dim,
        m.pred_hidden_dim,
        proj_layers=m.proj_layers,
        zero_init_residual=m.zero_init_residual,
    )
    return MoCoV3(enc, momentum=mo.momentum, temperature=mo.temperature, symmetric=mo.symmetric)


def _simclr(cfg: Config) -> SimCLR:
    m = cfg.model
    enc = build_encoder(
        cfg.backbone, m.small_stem, m.head, m.dim, m.hidden_dim, zero_init_residual=m.zero_init_residual
    )
    return SimCLR(enc, temperature=cfg.moco.temperature)


METHODS: dict[str, Callable[[Config], ContrastiveMethod]] = {
    "moco_v1": _moco,
    "moco_v2": _moco,
    "moco_v3": _moco_v3,
    "simclr": _simclr,
}


def build_method(cfg: Config) -> ContrastiveMethod:
    """The method's module (an ``nn.Module``). Its ``forward(im_q, im_k)`` returns a dict with ``loss`` and ``acc1``."""
    builder = METHODS.get(cfg.moco.method)
    if builder is None:
        raise ValueError(f"moco.method: {cfg.moco.method!r} is not one of {', '.join(METHODS)}")
    return builder(cfg)


def sync_batchnorm(model: ContrastiveMethod, cfg: Config, device_type: str, world: int) -> ContrastiveMethod:
    """With ``model.sync_bn`` and more than one rank: every BatchNorm of the method (query and momentum encoders,
    heads) normalised over the global batch, converted before DDP wraps it (as moco-v3's main_moco.py does)."""
    if not cfg.model.sync_bn or world <= 1:
        return model
    return convert_sync_bn(model, device_type)


__all__ = ["METHODS", "build_method", "sync_batchnorm"]
