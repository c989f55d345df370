"""Vision Transformers as facebookresearch/moco-v3 ``vits.py`` builds them, on timm's ``VisionTransformer``.

moco-v3 subclasses timm's model (``VisionTransformerMoCo``) and changes only its initialisation: a fixed 2-D
sin-cos position embedding (a non-trainable parameter, so the key is still ``pos_embed``), the class token
N(0, 1e-6), xavier-uniform Linear weights with Q, K and V treated as three matrices, zero biases, a xavier-uniform
patch projection, and with ``stop_grad_conv1`` that projection frozen. Subclassing keeps every parameter name
timm's, so the weights load strictly into a plain ``VisionTransformer(**spec.timm_kwargs())`` and official
checkpoints load into this one. The head is an Identity (``num_classes=0``): the projector reads the class token.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from moco_ray.core.backbone_spec import BackboneSpec


def sincos_position_embedding(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """[1, 1 + h*w, dim]: moco-v3 ``build_2d_sincos_position_embedding`` (a zero row for the class token first).

    Each quarter of the channels is sin / cos of the w / h coordinate at frequencies 1 / T^(i / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"ViT width {dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    h, w = grid
    grid_w, grid_h = torch.meshgrid(
        torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij"
    )
    pos_dim = dim // 4
    omega = 1.0 / (temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    pos = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None]
    return torch.cat([torch.zeros(1, 1, dim), pos], dim=1)


class VisionTransformerMoCo(VisionTransformer):
    """timm's ViT with moco-v3's initialisation (see the module docstring); forward returns the class token."""

    def __init__(self, stop_grad_conv1: bool = False, **kwargs) -> None:
        # timm's own init is skipped: every tensor it would draw is drawn again below (LayerNorms keep their
        # constructor's ones / zeros, as timm's init leaves them)
        super().__init__(weight_init="skip", **kwargs)
        if self.num_prefix_tokens != 1:
            raise ValueError("moco-v3's ViT has exactly one prefix token, [cls]")
        with torch.no_grad():
            self.pos_embed.copy_(sincos_position_embedding(self.patch_embed.grid_size, self.embed_dim))
        self.pos_embed.requires_grad_(False)  # fixed, as official: a parameter that takes no gradient
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if "qkv" in name:  # Q, K and V as three separate [dim, dim] matrices
                    val = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -val, val)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=1e-6)
        if isinstance(self.patch_embed, PatchEmbed):
            proj = self.patch_embed.proj
            val = math.sqrt(6.0 / float(3 * math.prod(self.patch_embed.patch_size) + self.embed_dim))
            nn.init.uniform_(proj.weight, -val, val)
            nn.init.zeros_(proj.bias)
            if stop_grad_conv1:  # --stop-grad-conv1: the random patch projection stays as initialised
                proj.weight.requires_grad_(False)
                proj.bias.requires_grad_(False)


def build_vit(spec: BackboneSpec) -> VisionTransformerMoCo:
    """The moco-v3 ViT of ``spec`` (``vit_small`` / ``vit_base`` or a smaller one with the same recipe)."""
    return VisionTransformerMoCo(stop_grad_conv1=spec.stop_grad_conv1, **spec.timm_kwargs())


def plain_vit(spec: BackboneSpec) -> VisionTransformer:
    """The plain timm model an exported ViT encoder loads into strictly (what a user outside moco-ray builds;
    timm's init skipped: the weights are loaded into it next)."""
    return VisionTransformer(weight_init="skip", **spec.timm_kwargs())
