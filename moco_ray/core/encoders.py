"""Backbones by :class:`BackboneSpec` (torchvision ResNets, moco-v3 ViTs on timm), and the projection / prediction
heads."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn
import torchvision

from moco_ray.core.backbone_spec import BackboneSpec, as_spec
from moco_ray.core.defaults import feature_dim
from moco_ray.core.vits import build_vit, plain_vit


def torchvision_backbone(
    arch: str,
    small_stem: bool = False,
    norm_layer: Callable[..., nn.Module] | None = None,
    zero_init_residual: bool = False,
) -> nn.Module:
    """A plain ``torchvision.models.<arch>()`` with ``fc = Identity`` (and the small stem when asked).

    This is the module an exported encoder state dict loads into with ``strict=True``: the key names are
    torchvision's, minus ``fc.*``. ``zero_init_residual``: the last BN of each residual block starts at 0
    (torchvision's option; MoCo v3's ResNet recipe turns it on).
    """
    if feature_dim(arch) and as_spec(arch).is_vit:  # feature_dim: a clear error for an unknown name
        raise ValueError(f"{arch} is a Vision Transformer, not a torchvision ResNet: use build_backbone")
    kwargs: dict = {"weights": None}
    if zero_init_residual:
        kwargs["zero_init_residual"] = True
    if norm_layer is not None:
        kwargs["norm_layer"] = norm_layer
    net = getattr(torchvision.models, arch)(**kwargs)
    if small_stem:
        # CIFAR-style stem for 32-96 px inputs: a 7x7/2 conv plus max-pool would shrink 32 px to 8 px at once.
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def plain_backbone(arch: str | BackboneSpec, small_stem: bool = False) -> nn.Module:
    """The module a user outside moco-ray builds to load an exported encoder strictly: torchvision's ResNet
    (fc = Identity) or timm's plain ``VisionTransformer(**spec.timm_kwargs())``."""
    spec = as_spec(arch, small_stem)
    return plain_vit(spec) if spec.is_vit else torchvision_backbone(spec.arch, spec.small_stem)


def build_backbone(
    arch: str | BackboneSpec,
    small_stem: bool = False,
    norm_layer: Callable[..., nn.Module] | None = None,
    zero_init_residual: bool = False,
) -> tuple[nn.Module, int]:
    """(backbone, feature width). The backbone maps [B,3,H,W] images to [B,feature width] pooled features.

    A ViT is moco-v3's (its initialisation, ``stop_grad_conv1``); ``norm_layer`` and ``zero_init_residual`` are
    ResNet options (a ViT has no BatchNorm and no residual BN).
    """
    spec = as_spec(arch, small_stem)
    if spec.is_vit:
        return build_vit(spec), spec.feature_dim
    return torchvision_backbone(spec.arch, spec.small_stem, norm_layer, zero_init_residual), spec.feature_dim


def build_mlp_head(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int = 2,
    last_bn: bool = False,
    hidden_bn: bool | None = None,
) -> nn.Sequential:
    """MLP head: (Linear -> BN? -> ReLU) x (num_layers - 1) -> Linear (-> BN without affine if last_bn).

    MoCo v2's head is ``Linear -> ReLU -> Linear`` (no BN). MoCo v3 (official ``_build_mlp``) puts BN after every
    hidden Linear, drops every Linear bias, and ends the projector in a BN without affine (``last_bn=True``) but
    the predictor in a plain Linear (``last_bn=False, hidden_bn=True``). ``hidden_bn`` defaults to ``last_bn``.
    """
    hidden_bn = last_bn if hidden_bn is None else hidden_bn
    bias = not (hidden_bn or last_bn)
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=bias)]
        if hidden_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Backbone followed by a projection head; ``backbone`` is what gets exported."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        return self.head(self.backbone(x))


def build_encoder(
    arch: str | BackboneSpec,
    small_stem: bool,
    head: str,
    dim: int,
    hidden_dim: int = 0,
    norm_layer: Callable[..., nn.Module] | None = None,
    head_bn: bool = False,
    zero_init_residual: bool = False,
) -> Encoder:
    """Backbone + head: ``linear`` (MoCo v1) or 2-layer ``mlp`` (MoCo v2; hidden width = feature width if 0)."""
    backbone, feat = build_backbone(arch, small_stem, norm_layer, zero_init_residual)
    if head == "linear":
        proj: nn.Module = nn.Linear(feat, dim)
    elif head == "mlp":
        proj = build_mlp_head(feat, hidden_dim or feat, dim, num_layers=2, last_bn=head_bn)
    else:
        raise ValueError(f"model.head: {head!r} is not one of linear, mlp")
    return Encoder(backbone, proj)
