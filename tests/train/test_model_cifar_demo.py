"""The CIFAR-10 demo file builds the demo's model: a small-stem ResNet-18 whose fc is Linear(512, 128), scored by the
kNN monitor on its L2-normalised output, with CIFAR-10 normalisation. Checked against a reference written out here
from the demo's ModelBase (torchvision resnet18(num_classes=128), conv1 -> 3x3 stride 1, max-pool dropped)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from moco_ray.config import load_config
from moco_ray.core.normalize import Normalizer
from moco_ray.train.knn_monitor import scored_module
from moco_ray.train.model import build_method

CIFAR = Path(__file__).resolve().parents[2] / "experiments" / "cifar10_mocov2_r18.yaml"


def _reference() -> nn.Module:
    net = torchvision.models.resnet18(num_classes=128)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def test_cifar_model_forward_matches_the_demo_reference(one_thread):
    cfg = load_config(CIFAR, ["train.batch_size=16", "moco.queue_size=32", "train.use_gpu=false"])
    torch.manual_seed(0)
    model = build_method(cfg)
    enc = model.encoder_q
    assert isinstance(enc.head, nn.Linear) and (enc.head.in_features, enc.head.out_features) == (512, 128)
    # give BN non-trivial running statistics, then copy every weight into the reference
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ref = _reference()
    state = {k: v for k, v in enc.backbone.state_dict().items()}
    state.update({"fc.weight": enc.head.weight.detach(), "fc.bias": enc.head.bias.detach()})
    ref.load_state_dict(state, strict=True)
    ref.eval()

    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = F.normalize(ref((x.float() / 255.0 - mean) / std), dim=1)  # the demo's test(): normalize(net(x))
        net = scored_module(model, cfg.eval.knn_features).eval()
        got = F.normalize(net(Normalizer(cfg.data.mean, cfg.data.std)(x)), dim=1)
    assert got.shape == (4, 128)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert scored_module(model, "backbone") is enc.backbone
