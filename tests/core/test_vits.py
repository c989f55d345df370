"""moco-v3's Vision Transformers (core/vits.py) and MoCo_ViT's heads: built as facebookresearch/moco-v3 builds them.

Expected values are written out from moco-v3's vits.py and moco/builder.py, not read from moco-ray. Tiny ViTs
(width 32-64, depth 1-2, 16-32 px) keep every test on the CPU under a second or two.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from moco_ray.core.backbone_io import torchvision_state_dict
from moco_ray.core.backbone_spec import BackboneSpec
from moco_ray.core.moco_v3 import MoCoV3, build_query_encoder
from moco_ray.core.vits import build_vit, sincos_position_embedding


def _tiny(stop_grad_conv1: bool = False, width: int = 64) -> BackboneSpec:
    return BackboneSpec.resolve("vit_small", False, 32, 8, width, 2, 4, stop_grad_conv1)


def test_vit_small_is_vits_py():
    # vits.vit_small: patch 16, embed 384, depth 12, num_heads 12 (timm's own has 6), mlp_ratio 4, qkv_bias, LN 1e-6
    net = build_vit(BackboneSpec.resolve("vit_small"))
    assert net.patch_embed.proj.kernel_size == (16, 16) and net.patch_embed.grid_size == (14, 14)
    assert net.embed_dim == 384 and len(net.blocks) == 12
    blk = net.blocks[0]
    assert blk.attn.num_heads == 12 and blk.attn.head_dim == 32
    assert blk.mlp.fc1.out_features == 4 * 384 and blk.attn.qkv.bias is not None
    assert net.norm.eps == 1e-6 and blk.norm1.eps == 1e-6
    assert isinstance(net.head, nn.Identity) and net.pos_embed.shape == (1, 197, 384)
    assert net(torch.zeros(1, 3, 224, 224)).shape == (1, 384)  # the class token, what the projector reads


def test_vit_base_is_vits_py():
    with torch.device("meta"):  # shapes only
        net = VisionTransformer(**BackboneSpec.resolve("vit_base").timm_kwargs())
    assert net.embed_dim == 768 and len(net.blocks) == 12 and net.blocks[0].attn.num_heads == 12
    assert sum(p.numel() for p in net.parameters()) == 85_798_656  # ViT-B/16 without a classifier


def test_sincos_position_embedding_is_moco_v3s_formula():
    """A loop over moco-v3's build_2d_sincos_position_embedding: meshgrid(grid_w, grid_h) ('ij'), token m = i*h + j
    for i over w and j over h; channels [sin(i w_d), cos(i w_d), sin(j w_d), cos(j w_d)], w_d = 1 / 1e4^(d / (D/4)).
    Mutation checked: meshgrid with indexing="xy" (a transposed grid) fails here."""
    h, w, dim = 3, 5, 16
    got = sincos_position_embedding((h, w), dim)
    pd = dim // 4
    want = torch.zeros(1, 1 + h * w, dim)
    for i in range(w):
        for j in range(h):
            for d in range(pd):
                omega = 1.0 / 10000.0 ** (d / pd)
                row = 1 + i * h + j
                want[0, row, d], want[0, row, pd + d] = math.sin(i * omega), math.cos(i * omega)
                want[0, row, 2 * pd + d], want[0, row, 3 * pd + d] = math.sin(j * omega), math.cos(j * omega)
    torch.testing.assert_close(got, want)


def test_position_embedding_is_fixed_and_keeps_timms_key():
    """Mutation checked: dropping ``pos_embed.requires_grad_(False)`` fails here."""
    net = build_vit(_tiny())
    assert not net.pos_embed.requires_grad and "pos_embed" in dict(net.named_parameters())
    torch.testing.assert_close(net.pos_embed.detach(), sincos_position_embedding((4, 4), 64))


def test_initialisation_is_moco_v3s():
    """qkv: uniform +-sqrt(6 / (dim + dim)) (Q, K, V as three matrices); other Linear: xavier-uniform; biases 0;
    cls token N(0, 1e-6); patch projection uniform +-sqrt(6 / (3 p^2 + dim)), bias 0.
    Mutation checked: xavier over the whole [3 dim, dim] qkv matrix fails the qkv bound check."""
    torch.manual_seed(0)
    net = build_vit(_tiny())
    dim = 64
    qkv = net.blocks[0].attn.qkv.weight
    bound = math.sqrt(6.0 / (dim + dim))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.95 * bound
    fc1 = net.blocks[1].mlp.fc1.weight
    xav = math.sqrt(6.0 / (fc1.shape[0] + fc1.shape[1]))
    assert fc1.abs().max() <= xav and fc1.abs().max() > 0.95 * xav
    assert all(m.bias.abs().max() == 0 for m in net.modules() if isinstance(m, nn.Linear))
    assert 0 < net.cls_token.abs().max() < 1e-5
    proj = net.patch_embed.proj
    pb = math.sqrt(6.0 / (3 * 8 * 8 + dim))
    assert proj.weight.abs().max() <= pb and proj.weight.abs().max() > 0.9 * pb and proj.bias.abs().max() == 0


def _kinds(seq: nn.Sequential) -> list[str]:
    out = []
    for m in seq:
        if isinstance(m, nn.BatchNorm1d):
            out.append("BN" if m.affine else "BN-")
        else:
            out.append(type(m).__name__)
    return out


def test_vit_heads_are_moco_vits_and_resnet_heads_unchanged():
    """MoCo_ViT: projector _build_mlp(3, width, mlp, dim) and predictor _build_mlp(2, dim, mlp, dim) both end in an
    affine-free BN; MoCo_ResNet's predictor ends in a Linear. No Linear has a bias.
    Mutation checked: ``last_bn=False`` for the ViT predictor fails here."""
    enc = build_query_encoder(_tiny(), False, dim=16, hidden_dim=32, pred_hidden_dim=32, proj_layers=3)
    assert _kinds(enc.head) == ["Linear", "BN", "ReLU", "Linear", "BN", "ReLU", "Linear", "BN-"]
    assert enc.head[0].in_features == 64  # the class token's width
    assert _kinds(enc.predictor) == ["Linear", "BN", "ReLU", "Linear", "BN-"]
    assert all(m.bias is None for seq in (enc.head, enc.predictor) for m in seq if isinstance(m, nn.Linear))
    res = build_query_encoder("resnet18", True, dim=16, hidden_dim=32, pred_hidden_dim=32)
    assert _kinds(res.predictor) == ["Linear", "BN", "ReLU", "Linear"]


@pytest.mark.parametrize("stop_grad", [True, False])
def test_stop_grad_conv1_freezes_the_patch_projection_through_adamw_steps(stop_grad):
    """Two MoCo v3 steps with AdamW (wd 0.1, as the recipe): the frozen patch projection and the fixed position
    embedding do not move (AdamW's decoupled decay skips parameters without a gradient); the blocks do.
    Mutation checked: not freezing the projection under stop_grad_conv1 fails the True case."""
    torch.manual_seed(0)
    enc = build_query_encoder(_tiny(stop_grad), False, dim=16, hidden_dim=32, pred_hidden_dim=32, proj_layers=3)
    model = MoCoV3(enc, momentum=0.99, temperature=0.2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    bb = model.encoder_q.backbone
    before = {k: v.detach().clone() for k, v in bb.state_dict().items()}
    for _ in range(2):
        out = model(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = bb.state_dict()
    assert torch.equal(after["pos_embed"], before["pos_embed"])
    assert torch.equal(after["patch_embed.proj.weight"], before["patch_embed.proj.weight"]) == stop_grad
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])


def test_backbone_weights_load_strictly_into_plain_timm():
    """What the exported encoder promises: ``VisionTransformer(**encoder.json's timm_kwargs)`` from timm itself,
    ``strict=True``, same outputs."""
    spec = _tiny(stop_grad_conv1=True)
    net = build_vit(spec).eval()
    plain = VisionTransformer(**spec.to_info()["timm_kwargs"]).eval()
    plain.load_state_dict(torchvision_state_dict(net, spec), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(x), net(x))
