"""The lincls preset for a ViT: moco-v3 main_lincls.py's values (CONFIG.md ``-a vit_small|vit_base --lr=3``)."""

from __future__ import annotations

import pytest

from moco_ray.evaluation.linear import LinclsProtocol


@pytest.mark.parametrize("arch", ["vit_small", "vit_base"])
def test_vit_lincls_is_moco_v3s(arch):
    """moco-v3 main_lincls.py: -b 1024, --epochs 90, --momentum 0.9, --wd 0, init_lr = lr x batch / 256, cosine
    ``init_lr * 0.5 * (1 + cos(pi * epoch / epochs))``; CONFIG.md: --lr=3 for both ViTs.
    Mutation checked: for_arch returning the ResNet defaults for every arch fails here."""
    p = LinclsProtocol.for_arch(arch, image_size=224)
    assert (p.lr, p.batch_size, p.epochs, p.momentum, p.weight_decay) == (3.0, 1024, 90, 0.9, 0.0)
    probe = p.probe()
    assert probe.schedule == "cosine" and probe.lr == pytest.approx(3.0 * 1024 / 256) and not probe.standardize


def test_resnet_lincls_keeps_main_lincls_defaults():
    p = LinclsProtocol.for_arch("resnet50")
    assert p == LinclsProtocol() and p.probe().schedule == "step" and p.probe().milestones == (60, 80)
