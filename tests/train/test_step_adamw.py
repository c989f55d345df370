"""build_optimizer's AdamW (moco-v3's ViT optimizer) and the ViT method built from the config (train/model.py)."""

from __future__ import annotations

import pytest
import torch

from moco_ray.config import load_config
from moco_ray.core.vits import VisionTransformerMoCo
from moco_ray.train.model import build_method
from moco_ray.train.step import build_optimizer

TINY_VIT = [
    "moco.method=moco_v3", "model.arch=vit_small", "aug.image_size=16", "model.patch_size=4", "model.vit_width=32",
    "model.vit_depth=1", "model.vit_heads=2", "model.stop_grad_conv1=true", "model.proj_layers=3", "model.dim=16",
    "model.hidden_dim=32", "model.pred_hidden_dim=32", "optim.optimizer=adamw", "optim.lr=1.5e-4",
    "optim.weight_decay=0.1", "train.batch_size=1024", "optim.warmup_epochs=0",
]  # fmt: skip


def test_adamw_is_main_moco_pys():
    """main_moco.py: ``torch.optim.AdamW(model.parameters(), args.lr, weight_decay=args.weight_decay)``, lr already
    x batch / 256; torch's default betas and eps; the decay on every parameter (one group, no exclusions).
    Mutation checked: building SGD for ``adamw`` fails here."""
    cfg = load_config(None, TINY_VIT)
    model = build_method(cfg)
    opt = build_optimizer(cfg, model)
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 1
    g = opt.param_groups[0]
    assert g["lr"] == pytest.approx(1.5e-4 * 1024 / 256) and g["weight_decay"] == 0.1
    assert g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 and not g["amsgrad"]
    stepped = {id(p) for p in g["params"]}
    named = dict(model.named_parameters())
    frozen = {"encoder_q.backbone.pos_embed", "encoder_q.backbone.patch_embed.proj.weight"}
    assert all(id(named[n]) not in stepped for n in frozen)  # fixed / stop-grad: never stepped
    assert all(id(p) not in stepped for n, p in named.items() if n.startswith("encoder_k."))  # the EMA copy
    assert id(named["encoder_q.predictor.0.weight"]) in stepped and id(named["encoder_q.head.0.weight"]) in stepped


def test_config_builds_the_moco_v3_vit():
    model = build_method(load_config(None, TINY_VIT))
    bb = model.encoder_q.backbone
    assert isinstance(bb, VisionTransformerMoCo) and bb.embed_dim == 32 and len(bb.blocks) == 1
    assert bb.patch_embed.grid_size == (4, 4) and not bb.patch_embed.proj.weight.requires_grad
    assert model.encoder_q.head[0].in_features == 32 and len(model.encoder_q.head) == 8  # 3-layer projector
    out = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    assert torch.isfinite(out["loss"])
