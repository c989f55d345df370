"""Checkpoints in the official MoCo layouts, built from torchvision models (no download).

As facebookresearch/moco's main_moco.py saves them (v1/v2: ``module.encoder_q.*`` with the head in ``fc``,
``module.encoder_k.*``, ``module.queue``, ``module.queue_ptr``) and moco-v3's main_moco.py (``module.base_encoder.*``
with the BN projector in ``fc``, ``module.momentum_encoder.*``, ``module.predictor.*``), plus ``epoch``, ``arch``
and an ``optimizer`` state dict.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision


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
            if k.startswith(prefix) and not k.startswith(prefix + "fc."):
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
