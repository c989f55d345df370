"""MoCo v3's asymmetric views and the CIFAR demo's views: distribution parameters per view, written out from the
official transforms (moco-v3 main_moco.py augmentation1 / augmentation2; moco_cifar10_demo train_transform)."""

from __future__ import annotations

import pytest
import torch

from moco_ray.data.augment import ViewAugment, aug_params, sample_params


def test_v3_per_view_parameters():
    p = aug_params("v3", 224)
    assert p.scale == pytest.approx((0.2, 1.0)) and p.jitter_p == 0.8 and p.gray_p == 0.2 and p.flip_p == 0.5
    assert (p.brightness, p.contrast, p.saturation, p.hue) == pytest.approx((0.4, 0.4, 0.2, 0.1))
    assert p.view_blur_p == (1.0, 0.1) and p.view_solarize_p == (0.0, 0.2) and p.sigma == (0.1, 2.0)
    assert not p.gray_first


def test_v3_draws_follow_the_view_of_each_row():
    n = 4000
    d = sample_params(n, aug_params("v3", 224), 256, 256, torch.Generator().manual_seed(0))
    q, k = slice(0, None, 2), slice(1, None, 2)
    assert bool(d["blur"][q].all()) and not bool(d["solarize"][q].any())  # view 1: always blurred, never solarised
    assert float(d["blur"][k].float().mean()) == pytest.approx(0.1, abs=0.02)
    assert float(d["solarize"][k].float().mean()) == pytest.approx(0.2, abs=0.025)


def test_v3_solarize_inverts_bright_pixels():
    aug = ViewAugment("v3", 64)
    img = torch.full((3, 64, 64), 200, dtype=torch.uint8)
    row = {
        "top": 0,
        "left": 0,
        "height": 64,
        "width": 64,
        "flip": False,
        "jitter": False,
        "gray": False,
        "blur": False,
        "solarize": True,
        "sigma": 1.0,
    }
    from moco_ray.data.augment import to_pil

    out = aug.view_pil(to_pil(img), row)
    assert set(out.getdata()) == {(55, 55, 55)}  # 255 - 200


def test_cifar_demo_views_and_v2_unchanged():
    c = aug_params("cifar", 32)  # RandomResizedCrop(32): scale (0.08, 1); ColorJitter(.4,.4,.4,.1) p .8; grey .2
    assert c.scale == pytest.approx((0.08, 1.0)) and c.jitter_p == 0.8 and c.gray_p == 0.2 and c.blur_p == 0.0
    assert (c.brightness, c.contrast, c.saturation, c.hue) == pytest.approx((0.4, 0.4, 0.4, 0.1))
    assert c.view_solarize_p == (0.0, 0.0)
    v2 = aug_params("v2", 224)
    assert v2.scale == pytest.approx((0.2, 1.0)) and v2.view_blur_p == (0.5, 0.5) and v2.blur_p == 0.5
