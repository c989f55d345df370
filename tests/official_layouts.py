"""Checkpoints in the official MoCo layouts, built from torchvision models (no download).

As facebookresearch/moco's main_moco.py saves them (v1/v2: ``module.encoder_q.*`` with the head in ``fc``,
``module.encoder_k.*``, ``module.queue``, ``module.queue_ptr``) and moco-v3's main_moco.py (``module.base_encoder.*``
with the BN projector in ``fc``, ``module.momentum_encoder.*``, ``module.predictor.*``), plus ``epoch``, ``arch``
and an ``optimizer`` state dict. moco-v3's ViTs (``MoCo_ViT``): the same with timm key names, the 3-layer projector
in ``base_encoder.head`` and an AdamW state, built from timm's ``VisionTransformer`` with vits.py's arguments.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torchvision
from timm.models.vision_transformer import VisionTransformer

# vits.py: vit_small / vit_base = VisionTransformerMoCo(patch_size=16, embed_dim=384 | 768, depth=12, num_heads=12,
# mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
VITS_PY = {"vit_small": 384, "vit_base": 768}


def vits_py_model(arch: str, num_classes: int = 1000) -> nn.Module:
    """The module moco-v3 builds for ``arch`` (its key names; initialisation skipped: the tests fill it)."""
    return VisionTransformer(
        patch_size=16, embed_dim=VITS_PY[arch], depth=12, num_heads=12, mlp_ratio=4, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=num_classes, weight_init="skip",
    )  # fmt: skip


def official_vit_checkpoint(arch: str = "vit_small", epoch: int = 300, seed: int = 0, mlp_dim: int = 256) -> dict:
    """A moco-v3 ViT checkpoint as main_moco.py saves it (``--moco-mlp-dim`` is 4096 there; ``mlp_dim`` keeps the
    dropped heads small here): base encoder with the projector _build_mlp(3, width, mlp, 256) as ``head``, the
    momentum encoder (other values), the predictor _build_mlp(2, 256, mlp, 256), an AdamW state and a scaler."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # the key structure; the values are drawn below (cheaper than building twice)
        q = vits_py_model(arch, num_classes=mlp_dim)
        q.head = _mlp([VITS_PY[arch], mlp_dim, mlp_dim, 256], bn=True)
    base = {n: torch.randn(t.shape, generator=g).to(t.dtype) for n, t in q.state_dict().items()}
    sd = {f"module.base_encoder.{n}": t for n, t in base.items()}
    sd.update({f"module.momentum_encoder.{n}": t + 1 for n, t in base.items()})
    sd.update({f"module.predictor.{n}": t for n, t in _mlp([256, mlp_dim, 256], bn=True).state_dict().items()})
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.5e-4, weight_decay=0.1)
    return {"epoch": epoch, "arch": arch, "state_dict": sd, "optimizer": opt.state_dict(), "scaler": {"scale": 1.0}}


def v3_main_lincls_load_vit(ckpt: dict, arch: str) -> tuple[nn.Module, set[str]]:
    """moco-v3 main_lincls.py's loading code for a ViT, as written there: (model, missing keys)."""
    model = vits_py_model(arch)
    linear_keyword = "head"
    state_dict = dict(ckpt["state_dict"])
    for k in list(state_dict.keys()):
        # retain only base_encoder up to before the embedding layer
        if k.startswith("module.base_encoder") and not k.startswith("module.base_encoder.%s" % linear_keyword):  # noqa: UP031
            # remove prefix
            state_dict[k[len("module.base_encoder.") :]] = state_dict[k]
        # delete renamed or unused k
        del state_dict[k]
    msg = model.load_state_dict(state_dict, strict=False)
    assert not msg.unexpected_keys, msg.unexpected_keys
    return model, set(msg.missing_keys)


def _mlp(dims: list[int], bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=not bn))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(dims[i + 1])] if bn else []
            layers.append(nn.ReLU(inplace=True))
        elif bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))
    return nn.Sequential(*layers)


def _encoder(arch: str, method: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=128)
    feat = net.fc.in_features
    if method == "v2":
        net.fc = nn.Sequential(nn.Linear(feat, feat), nn.ReLU(), nn.Linear(feat, 128))
    elif method == "v3":
        net.fc = _mlp([feat, 4096, 256], bn=True)
    with torch.no_grad():  # non-default BN statistics, so a lost buffer shows
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(1234)
    return net


def official_checkpoint(method: str, arch: str = "resnet18", epoch: int = 200, seed: int = 0) -> dict:
    """A checkpoint dict as the official script saves it; ``method`` in v1 | v2 | v3."""
    q = _encoder(arch, method, seed)
    k = _encoder(arch, method, seed + 1)
    if method == "v3":
        sd = {f"module.base_encoder.{n}": t for n, t in q.state_dict().items()}
        sd.update({f"module.momentum_encoder.{n}": t for n, t in k.state_dict().items()})
        sd.update({f"module.predictor.{n}": t for n, t in _mlp([256, 4096, 256], bn=True).state_dict().items()})
    else:
        sd = {f"module.encoder_q.{n}": t for n, t in q.state_dict().items()}
        sd.update({f"module.encoder_k.{n}": t for n, t in k.state_dict().items()})
        sd["module.queue"] = torch.randn(128, 64)
        sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    opt = torch.optim.SGD(q.parameters(), lr=0.03, momentum=0.9)
    return {"epoch": epoch, "arch": arch, "state_dict": sd, "optimizer": opt.state_dict()}


def query_backbone(ckpt: dict) -> dict[str, torch.Tensor]:
    """The query encoder's backbone keys (prefix stripped, fc dropped): what an import must keep, exactly."""
    out = {}
    for k, v in ckpt["state_dict"].items():
        for prefix in ("module.encoder_q.", "module.base_encoder."):
            if k.startswith(prefix) and not k.startswith((prefix + "fc.", prefix + "head.")):
                out[k[len(prefix) :]] = v
    return out


def main_lincls_load(ckpt: dict, arch: str) -> tuple[nn.Module, set[str]]:
    """The official main_lincls.py's loading code, as it is written there: (model, missing keys)."""
    model = getattr(torchvision.models, arch)()
    state_dict = dict(ckpt["state_dict"])
    for k in list(state_dict.keys()):
        # retain only encoder_q up to before the embedding layer
        if k.startswith("module.encoder_q") and not k.startswith("module.encoder_q.fc"):
            # remove prefix
            state_dict[k[len("module.encoder_q.") :]] = state_dict[k]
        # delete renamed or unused k
        del state_dict[k]
    msg = model.load_state_dict(state_dict, strict=False)
    assert not msg.unexpected_keys, msg.unexpected_keys
    return model, set(msg.missing_keys)
