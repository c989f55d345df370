"""The official MoCo checkpoint layout (facebookresearch/moco, moco-v3) <-> a torchvision backbone state dict.

The official pretraining scripts save ``{"state_dict": ..., "epoch": N, "arch": "resnet50", "optimizer": ...}``
with the DDP model's keys: MoCo v1/v2 ``module.encoder_q.<torchvision key>`` (v1's head ``fc.weight``/``fc.bias``,
v2's MLP ``fc.0.*``/``fc.2.*``; plus ``module.encoder_k.*`` and the queue), MoCo v3 ``module.base_encoder.*``
(projector in ``base_encoder.fc.*``; plus ``module.momentum_encoder.*`` and ``module.predictor.*``). Downstream
tools (``main_lincls.py``, the detectron2 converter) take the query encoder's keys minus ``fc`` and strip the
prefix; this module does the same, checks the result against ``torchvision.models.<arch>()`` so a mismatch names
its first key, and writes the layout back (the encoder_q form, which every one of those tools reads).
Pure torch: no file system beyond ``torch.load``/``torch.save`` callers, no MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from moco_ray.core.defaults import ARCHS
from moco_ray.core.encoders import torchvision_backbone

ENCODER_Q = "module.encoder_q."  # MoCo v1 / v2 query encoder
BASE_ENCODER = "module.base_encoder."  # MoCo v3 base (query) encoder
HEAD = "fc."  # the projection head inside the encoder: dropped on import, as main_lincls.py drops it


@dataclass
class OfficialBackbone:
    """A backbone read from an official checkpoint: torchvision-layout tensors and what the file said."""

    state: dict[str, torch.Tensor]
    method: str  # moco_v1 | moco_v2 | moco_v3 (from the key layout)
    prefix: str  # the query encoder's prefix in the file
    small_stem: bool  # conv1 is 3x3 (a moco-ray small-stem run exported in this layout)
    head_keys: list[str] = field(default_factory=list)  # the encoder's fc.* keys, not imported


def checkpoint_state_dict(ckpt: Any) -> Mapping[str, Any]:
    """The model state dict of a loaded checkpoint: ``ckpt["state_dict"]`` (official), ``ckpt["model"]``, or
    ``ckpt`` itself when it already maps names to tensors; ValueError otherwise."""
    if isinstance(ckpt, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(ckpt.get(key), Mapping):
                return ckpt[key]
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return ckpt
    raise ValueError("no state dict in it (expected {'state_dict': {'module.encoder_q.*': tensor, ...}, ...})")


def _layout(state: Mapping[str, Any]) -> tuple[str, str]:
    """(method, prefix) from the keys; accepts the layouts with or without DDP's ``module.``."""
    for prefix, method in ((ENCODER_Q, "moco_v1"), (BASE_ENCODER, "moco_v3")):
        for p in (prefix, prefix.removeprefix("module.")):
            if any(k.startswith(p) for k in state):
                if method == "moco_v1" and f"{p}{HEAD}0.weight" in state:
                    method = "moco_v2"  # v2's head is an MLP (fc.0, fc.2); v1's a Linear (fc.weight)
                return method, p
    first = next(iter(state), "<empty>")
    raise ValueError(
        f"unknown checkpoint layout: no key starts with {ENCODER_Q!r} (MoCo v1/v2) or {BASE_ENCODER!r} "
        f"(MoCo v3); first key {first!r}"
    )


def _reference(arch: str, small_stem: bool) -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # shapes only: no memory, no init cost (resnet152 included)
        return dict(torchvision_backbone(arch, small_stem).state_dict())


def first_mismatch(state: Mapping[str, torch.Tensor], arch: str, small_stem: bool = False) -> str | None:
    """The first key (in torchvision's order) that keeps ``state`` from loading strictly into ``arch``, described
    in a few words; None when it loads."""
    ref = _reference(arch, small_stem)
    for k, v in ref.items():
        if k not in state:
            return f"{k} (missing)"
        if tuple(state[k].shape) != tuple(v.shape):
            return f"{k} (shape {list(state[k].shape)}, {arch} has {list(v.shape)})"
    extra = [k for k in state if k not in ref]
    return f"{extra[0]} (not in {arch})" if extra else None


def matching_archs(state: Mapping[str, torch.Tensor], small_stem: bool = False) -> list[str]:
    """The known architectures ``state`` loads into strictly (for error messages)."""
    return [a for a in ARCHS if first_mismatch(state, a, small_stem) is None]


def from_official(ckpt: Any, arch: str) -> OfficialBackbone:
    """A loaded official checkpoint -> the query encoder's backbone in torchvision layout, checked against
    ``arch``. ValueError (one line, naming the first mismatching key as it appears in the file) otherwise."""
    state = checkpoint_state_dict(ckpt)
    method, prefix = _layout(state)
    backbone: dict[str, torch.Tensor] = {}
    head: list[str] = []
    for k, v in state.items():
        if not k.startswith(prefix):
            continue
        key = k[len(prefix) :]
        if key.startswith(HEAD):
            head.append(k)
        elif not isinstance(v, torch.Tensor):
            raise ValueError(f"{k}: expected a tensor, got {type(v).__name__}")
        else:
            backbone[key] = v
    conv1 = backbone.get("conv1.weight")
    small_stem = conv1 is not None and conv1.dim() == 4 and tuple(conv1.shape[-2:]) == (3, 3)
    bad = first_mismatch(backbone, arch, small_stem)
    if bad is not None:
        fits = matching_archs(backbone, small_stem)
        hint = f"; the weights fit {', '.join(fits)}" if fits else ""
        raise ValueError(f"not a {arch} {method} checkpoint: first mismatching key {prefix}{bad}{hint}")
    return OfficialBackbone(backbone, method, prefix, small_stem, head)


def to_official(state: Mapping[str, torch.Tensor], arch: str, epoch: int = 0) -> dict[str, Any]:
    """A torchvision backbone state dict -> ``{"state_dict": {"module.encoder_q.<key>": t}, "arch", "epoch"}``.

    No ``fc`` keys (the backbone has none): ``main_lincls.py`` filters them out and initialises its own fc anyway.
    Tensors are saved as they are (CPU, contiguous), so a round trip is exact.
    """
    out = {f"{ENCODER_Q}{k}": v.detach().to("cpu").contiguous() for k, v in state.items()}
    return {"state_dict": out, "arch": arch, "epoch": int(epoch)}
