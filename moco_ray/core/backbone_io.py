"""A backbone's weights in torchvision layout, and back: what checkpoints, artifacts and exports hold.

The torchvision state dict is the reference format: its keys are exactly those of ``torchvision.models.<arch>()``
minus ``fc.*``, so it loads with ``strict=True`` into a plain torchvision model (``fc = Identity``, plus the small
stem when the encoder was trained with one). ``SplitBatchNorm`` is a ``BatchNorm2d`` subclass with the same
parameters and buffers, so training-time modules do not leak into it. A ViT's state dict is the same idea in timm's
layout: it loads strictly into a plain ``timm`` ``VisionTransformer(**spec.timm_kwargs())``. Each function takes
a :class:`BackboneSpec` (or the older ``arch, small_stem`` pair, which names every ResNet). Wrapper prefixes
(DDP's ``module.``, torch.compile's ``_orig_mod.``) are stripped here and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from moco_ray.core.backbone_spec import BackboneSpec, as_spec
from moco_ray.core.encoders import plain_backbone

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


_WRAPPER_PARTS = frozenset(p.rstrip(".") for p in _WRAPPER_PREFIXES)


def unwrap_key(key: str) -> str:
    """``encoder_q._orig_mod.module.backbone.conv1.weight`` -> ``encoder_q.backbone.conv1.weight``."""
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_PARTS)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict without wrapper prefixes, on the CPU: loads into the unwrapped model."""
    return {unwrap_key(k): v.detach().cpu() for k, v in model.state_dict().items()}


def torchvision_state_dict(
    backbone: nn.Module, arch: str | BackboneSpec | None = None, small_stem: bool = False
) -> dict[str, torch.Tensor]:
    """The backbone's weights in torchvision layout: wrapper prefixes stripped, ``fc.*`` dropped, CPU, contiguous.

    With ``arch`` the result is also checked against ``torchvision.models.<arch>()`` (keys and shapes).
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in backbone.state_dict().items():
        k = unwrap_key(k)
        if k.startswith("fc."):
            continue
        out[k] = v.detach().to("cpu", copy=True).contiguous()
    if arch is not None:
        check_state_dict(out, arch, small_stem)
    return out


def check_state_dict(state: Mapping[str, torch.Tensor], arch: str | BackboneSpec, small_stem: bool = False) -> None:
    """Raise a one-line ValueError when ``state`` does not load strictly into the plain ``arch`` backbone."""
    spec = as_spec(arch, small_stem)
    with torch.device("meta"):  # shapes only
        ref = plain_backbone(spec).state_dict()
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(ref[k].shape)}"
        for k in ref
        if k in state and tuple(state[k].shape) != tuple(ref[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        raise ValueError(f"state dict does not match {_describe(spec)}: {'; '.join(parts)}")


def _describe(spec: BackboneSpec) -> str:
    if spec.is_vit:
        return f"{spec.arch} ({', '.join(f'{k}={v}' for k, v in spec.timm_kwargs().items() if k != 'num_classes')})"
    return f"{spec.arch} (small_stem={spec.small_stem})"


def load_torchvision_backbone_from_state(
    state: Mapping[str, torch.Tensor], arch: str | BackboneSpec, small_stem: bool = False
) -> nn.Module:
    """A plain backbone (torchvision with fc = Identity, or timm's ViT) holding ``state``, loaded strictly, in eval
    mode."""
    state = {unwrap_key(k): v for k, v in state.items()}
    check_state_dict(state, arch, small_stem)
    net = plain_backbone(arch, small_stem)
    net.load_state_dict(state, strict=True)
    return net.eval()


def load_torchvision_backbone(path: str | os.PathLike, arch: str | BackboneSpec, small_stem: bool = False) -> nn.Module:
    """Load an exported torchvision state dict (``torch.load(weights_only=True)``) into a plain backbone."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder state dict not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, a TorchScript archive, a truncated file...
        raise ValueError(f"{path}: not a weights-only torch state dict ({type(e).__name__})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return load_torchvision_backbone_from_state(state, arch, small_stem)


def backbone_of(model: nn.Module) -> nn.Module:
    """The query-side backbone (no head, no DDP wrapper): what is evaluated and exported."""
    enc = getattr(model, "query_module", None) or model.encoder_q
    return getattr(enc, "module", enc).backbone
