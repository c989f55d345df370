"""GPU contract, memory formats: channels_last survives every norm layer (no NCHW round trip per BN layer).

Values and gradients of the channels_last path are checked against the NCHW path; the whole small-stem ResNet-18
with split BN is checked with forward hooks on every BatchNorm. (Shuffle-BN's cross-rank gather is covered on two
processes in tests/train/test_gpu_contract_collectives.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from moco_helpers import TINY_MODEL

from moco_ray.config import load_config
from moco_ray.core.shuffle_bn import SplitBatchNorm
from moco_ray.train.model import build_method

CL = torch.channels_last


def _is_cl(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


@pytest.mark.parametrize("affine", [True, False])
def test_split_bn_channels_last_matches_nchw(affine):
    torch.manual_seed(0)
    nchw = SplitBatchNorm(5, num_splits=4, affine=affine).double()
    if affine:
        with torch.no_grad():
            nchw.weight.uniform_(0.5, 2.0)
            nchw.bias.uniform_(-1.0, 1.0)
    cl = copy.deepcopy(nchw)
    x = (torch.randn(16, 5, 6, 7, dtype=torch.float64) * 3 + 1).requires_grad_()
    x_cl = x.detach().contiguous(memory_format=CL).requires_grad_()
    gy = torch.randn(16, 5, 6, 7, dtype=torch.float64).contiguous(memory_format=CL)
    y, y_cl = nchw(x), cl(x_cl)
    assert _is_cl(y_cl)
    torch.testing.assert_close(y_cl, y, rtol=0, atol=1e-12)
    params = [x] + ([nchw.weight, nchw.bias] if affine else [])
    params_cl = [x_cl] + ([cl.weight, cl.bias] if affine else [])
    for g, g_cl in zip(torch.autograd.grad(y, params, gy), torch.autograd.grad(y_cl, params_cl, gy), strict=True):
        torch.testing.assert_close(g_cl, g, rtol=0, atol=1e-10)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(cl, name), getattr(nchw, name), rtol=0, atol=1e-12)
    assert _is_cl(torch.autograd.grad(cl(x_cl), x_cl, gy)[0])  # the backward stays channels_last too


def test_split_bn_encoder_keeps_channels_last_through_every_norm_layer():
    cfg = load_config(None, {**TINY_MODEL, "moco.queue_size": 32, "train.batch_size": 16})
    torch.manual_seed(0)
    model = build_method(cfg).to(memory_format=CL)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(isinstance(m, SplitBatchNorm) for m in norms)
    seen: list[bool] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(_is_cl(out))) for m in norms]
    x = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8).float().contiguous(memory_format=CL)
    out = model(x, x.clone())  # query encoder, and the key encoder on the in-batch shuffled keys
    for h in hooks:
        h.remove()
    assert len(seen) == len(norms) and all(seen)  # each BN of both encoders ran once
    assert torch.isfinite(out["loss"])
