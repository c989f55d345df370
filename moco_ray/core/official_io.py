"""The official MoCo checkpoint layout (facebookresearch/moco, moco-v3) <-> a torchvision backbone state dict.

The official pretraining scripts save ``{"state_dict": ..., "epoch": N, "arch": "resnet50", "optimizer": ...}``
with the DDP model's keys: MoCo v1/v2 ``module.encoder_q.<torchvision key>`` (v1's head ``fc.weight``/``fc.bias``,
v2's MLP ``fc.0.*``/``fc.2.*``; plus ``module.encoder_k.*`` and the queue), MoCo v3 ``module.base_encoder.*``
(projector in ``base_encoder.fc.*``; plus ``module.momentum_encoder.*`` and ``module.predictor.*``). Downstream
tools (``main_lincls.py``, the detectron2 converter) take the query encoder's keys minus ``fc`` and strip the
prefix; this module does the same, checks the result against ``torchvision.models.<arch>()`` so a mismatch names
its first key, and writes the layout back (each method's own prefix, as its main_lincls.py reads it; DeiT's form).
Pure torch: no file system beyond ``torch.load``/``torch.save`` callers, no MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from moco_ray.core.backbone_spec import BackboneSpec, as_spec
from moco_ray.core.defaults import ARCHS
from moco_ray.core.encoders import plain_backbone

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
    head_keys: list[str] = field(default_factory=list)  # the encoder's fc.* (ViT: head.*) keys, not imported
    backbone: BackboneSpec | None = None  # what the weights load into (a ViT: 224 px, patch 16, the arch's size)


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


def _reference(spec: BackboneSpec) -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # shapes only: no memory, no init cost (resnet152 and vit_base included)
        return dict(plain_backbone(spec).state_dict())


def first_mismatch(state: Mapping[str, torch.Tensor], arch: str | BackboneSpec, small_stem: bool = False) -> str | None:
    """The first key (in torchvision's order) that keeps ``state`` from loading strictly into ``arch``, described
    in a few words; None when it loads."""
    spec = as_spec(arch, small_stem)
    arch = spec.arch
    ref = _reference(spec)
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
    """A loaded official checkpoint -> the query encoder's backbone in torchvision layout (a ViT: timm's), checked
    against ``arch``. ValueError (one line, naming the first mismatching key as it appears in the file) otherwise.

    A ViT (``vit_small`` / ``vit_base``, moco-v3 ``MoCo_ViT``): ``module.base_encoder.<timm key>``, the projector
    in ``base_encoder.head.*``, dropped as moco-v3 main_lincls.py and convert_to_deit.py drop it.
    """
    state = checkpoint_state_dict(ckpt)
    method, prefix = _layout(state)
    spec = as_spec(arch)
    head_prefix = VIT_HEAD if spec.is_vit else HEAD
    backbone: dict[str, torch.Tensor] = {}
    head: list[str] = []
    for k, v in state.items():
        if not k.startswith(prefix):
            continue
        key = k[len(prefix) :]
        if key.startswith(head_prefix):
            head.append(k)
        elif not isinstance(v, torch.Tensor):
            raise ValueError(f"{k}: expected a tensor, got {type(v).__name__}")
        else:
            backbone[key] = v
    conv1 = backbone.get("conv1.weight")
    small_stem = conv1 is not None and conv1.dim() == 4 and tuple(conv1.shape[-2:]) == (3, 3)
    spec = as_spec(arch, small_stem)
    bad = first_mismatch(backbone, spec)
    if bad is not None:
        fits = matching_archs(backbone, small_stem)
        hint = f"; the weights fit {', '.join(fits)}" if fits else ""
        raise ValueError(f"not a {arch} {method} checkpoint: first mismatching key {prefix}{bad}{hint}")
    return OfficialBackbone(backbone, method, prefix, small_stem, head, spec)


# Where each method's query encoder sits in its official checkpoint. SimCLR has no MoCo checkpoint of its own: its
# encoder is written in the v1/v2 layout, which facebookresearch/moco main_lincls.py (ResNets) reads, and the file's
# "method" says simclr.
OFFICIAL_PREFIX = {"moco_v1": ENCODER_Q, "moco_v2": ENCODER_Q, "simclr": ENCODER_Q, "moco_v3": BASE_ENCODER}
VIT_HEAD = "head."  # a timm ViT's classifier: convert_to_deit.py and moco-v3 main_lincls.py drop base_encoder.head


def to_official(
    state: Mapping[str, torch.Tensor],
    arch: str,
    epoch: int = 0,
    *,
    method: str = "moco_v2",
    small_stem: bool = False,
) -> dict[str, Any]:
    """A backbone state dict -> the official checkpoint of ``method``: ``{"state_dict": {PREFIX<key>: t}, "arch",
    "epoch", "method", "small_stem"}``, PREFIX ``module.encoder_q.`` (moco_v1, moco_v2, simclr) or
    ``module.base_encoder.`` (moco_v3: ResNet and ViT), the prefix each method's own ``main_lincls.py`` strips.

    No ``fc`` / ``head`` keys (the backbone has none): both main_lincls.py files load with ``strict=False`` and assert
    that exactly their own linear layer is missing. ``small_stem`` is recorded because the weights' conv1 is then 3x3,
    which a stock ``torchvision.models.<arch>()`` refuses. Tensors are saved as they are (CPU, contiguous), so a round
    trip is exact; every value is a tensor, str, int or bool, so ``torch.load(weights_only=True)`` reads it.
    """
    if method not in OFFICIAL_PREFIX:
        raise ValueError(f"moco export: unknown method {method!r}; known: {', '.join(OFFICIAL_PREFIX)}")
    prefix = OFFICIAL_PREFIX[method]
    out = {f"{prefix}{k}": v.detach().to("cpu").contiguous() for k, v in state.items()}
    return {"state_dict": out, "arch": arch, "epoch": int(epoch), "method": method, "small_stem": bool(small_stem)}


def to_deit(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A ViT backbone state dict -> ``{"model": {timm key: t}}``, what moco-v3 convert_to_deit.py writes from a v3
    checkpoint (``module.base_encoder.*`` minus ``head``, prefix stripped) for DeiT's ``--finetune``.

    ValueError for a state without ViT keys (a ResNet): DeiT builds a timm ViT and would find nothing to load.
    """
    if "cls_token" not in state or "pos_embed" not in state:
        first = next(iter(state), "<empty>")
        raise ValueError(
            f"deit export: not a Vision Transformer state dict (no cls_token / pos_embed; first key {first!r})"
        )
    model = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if not k.startswith(VIT_HEAD)}
    return {"model": model}
