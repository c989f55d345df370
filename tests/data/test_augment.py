"""CPU view augmentations: preset parameters, the shared sampler's distributions, and the CPU path's outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from moco_ray.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewAugment,
    aug_params,
    blur_kernel_size,
    build_view_augment,
    eval_view,
    normalize_on_device,
    resize_for_gpu,
    sample_params,
    source_size,
    to_pil,
)

N = 4000  # samples per statistical check: a probability p is measured within +-0.03 (> 4 standard errors)


pytestmark = pytest.mark.usefixtures("one_thread")


def colour_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth, saturated uint8 RGB image with a few hard edges (so every op visibly changes it)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0]
    x[:, : h // 3, : w // 4] = torch.tensor([0.9, 0.1, 0.2]).view(3, 1, 1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def from_pil(im: Image.Image) -> torch.Tensor:
    """PIL RGB or L image -> uint8 [3, H, W]."""
    return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def ks_stat(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (max distance between the empirical CDFs)."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b]).unique()
    fa = torch.searchsorted(a, grid, right=True).double() / len(a)
    fb = torch.searchsorted(b, grid, right=True).double() / len(b)
    return float((fa - fb).abs().max())


# ---------------------------------------------------------------------------------------------- preset parameters


def test_preset_parameters_at_strength_one_match_moco():
    v1, v2 = aug_params("v1", 224, 1.0), aug_params("v2", 224, 1.0)
    for p in (v1, v2):
        assert p.scale == pytest.approx((0.2, 1.0))
        assert p.ratio == pytest.approx((3 / 4, 4 / 3))
        assert p.flip_p == 0.5 and p.gray_p == pytest.approx(0.2)
        assert (p.brightness, p.contrast, p.saturation) == pytest.approx((0.4, 0.4, 0.4))
    assert v1.hue == pytest.approx(0.4) and v1.jitter_p == 1.0 and v1.blur_p == 0.0 and v1.gray_first
    assert v2.hue == pytest.approx(0.1) and v2.jitter_p == 0.8 and v2.blur_p == 0.5 and not v2.gray_first
    assert v2.sigma == (0.1, 2.0) and v2.blur_kernel == 23  # 10% of 224 -> 22 -> odd 23
    assert blur_kernel_size(64) == 7 and blur_kernel_size(96) == 9
    # the official CIFAR demo has no blur: none below 64 px
    assert aug_params("v2", 32).blur_p == 0.0 and aug_params("v2", 63).blur_kernel == 0
    assert aug_params("v2", 64).blur_p == 0.5


def test_strength_scales_every_distortion():
    half, double = aug_params("v1", 32, 0.5), aug_params("v1", 32, 2.0)
    assert half.scale[0] == pytest.approx(0.6) and double.scale[0] == pytest.approx(0.02)  # 1 - 2*0.8 clipped
    assert half.ratio == pytest.approx((math.exp(-0.5 * math.log(4 / 3)), math.exp(0.5 * math.log(4 / 3))))
    assert (
        half.brightness == pytest.approx(0.2) and half.hue == pytest.approx(0.2) and half.gray_p == pytest.approx(0.1)
    )
    assert double.hue == 0.5 and double.brightness == pytest.approx(0.8) and double.gray_p == pytest.approx(0.4)
    assert aug_params("v2", 64, 0.5).blur_p == pytest.approx(0.25) and aug_params("v2", 64, 2.0).blur_p == 1.0
    zero = aug_params("v2", 64, 0.0)
    assert zero.scale == (1.0, 1.0) and zero.ratio == (1.0, 1.0)
    assert zero.flip_p == zero.jitter_p == zero.gray_p == zero.blur_p == 0.0


@pytest.mark.parametrize(
    "args, match",
    [(("v4", 32, 1.0), "aug.preset"), (("v2", 4, 1.0), "aug.image_size"), (("v2", 32, 2.5), "aug.strength")],
)
def test_bad_parameters_raise_one_line_errors(args, match):
    with pytest.raises(ValueError, match=match):
        aug_params(*args)


# ---------------------------------------------------------------------------------------- sampled distributions


@pytest.mark.parametrize("hw, strength", [((32, 32), 1.0), ((28, 40), 1.0), ((40, 28), 0.5), ((8, 8), 1.0)])
def test_crop_boxes_follow_random_resized_crop(hw, strength):
    """Vectorised boxes vs torchvision's own RandomResizedCrop.get_params, marginal by marginal (KS test)."""
    H, W = hw
    p = aug_params("v2", 32, strength)
    n = 3000
    s = sample_params(n, p, H, W, torch.Generator().manual_seed(0))
    top, left, h, w = (s[k].double() for k in ("top", "left", "height", "width"))
    assert bool(((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0) & (top + h <= H) & (left + w <= W)).all())
    torch.manual_seed(0)  # get_params draws from the global RNG
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(3, H, W), p.scale, p.ratio) for _ in range(n)])
    rt, rl, rh, rw = ref.double().unbind(1)
    for mine, theirs, what in [
        (h * w / (H * W), rh * rw / (H * W), "area"),
        (torch.log(w / h), torch.log(rw / rh), "log aspect"),
        (top, rt, "top"),
        (left, rl, "left"),
    ]:
        d = ks_stat(mine, theirs)
        assert d < 0.06, f"{what}: KS distance {d:.3f} to torchvision's RandomResizedCrop"
    if (H, W) == (32, 32):  # enough pixels for the continuous bounds to show
        area = h * w / (H * W)
        assert area.min() < p.scale[0] + 0.03 and area.min() > p.scale[0] - 0.03 and area.max() == 1.0


def _fraction(mask: torch.Tensor) -> float:
    return float(mask.double().mean())


@pytest.mark.parametrize("preset", ["v1", "v2"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_probabilities_and_factor_ranges(preset, strength):
    p = aug_params(preset, 64, strength)  # 64 px: blur is on for v2
    s = sample_params(N, p, 64, 64, torch.Generator().manual_seed(1))
    for key, prob in [("flip", 0.5), ("jitter", p.jitter_p), ("gray", p.gray_p), ("blur", p.blur_p)]:
        assert _fraction(s[key]) == pytest.approx(prob, abs=0.03), key
    expected_gray = 0.2 * strength
    assert p.gray_p == pytest.approx(expected_gray)
    assert p.blur_p == pytest.approx(0.5 * strength if preset == "v2" else 0.0)
    # independent draws, not one uniform reused
    assert _fraction(s["flip"] & s["gray"]) == pytest.approx(0.5 * p.gray_p, abs=0.03)
    magnitude = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4}
    for key, m in magnitude.items():
        lo, hi = 1 - m * strength, 1 + m * strength
        v = s[key]
        width = hi - lo
        assert float(v.min()) >= lo - 1e-6 and float(v.max()) <= hi + 1e-6, key
        assert float(v.min()) < lo + 0.01 * width and float(v.max()) > hi - 0.01 * width, key
        assert float(v.mean()) == pytest.approx(1.0, abs=0.02 * width), key
    h = (0.4 if preset == "v1" else 0.1) * strength
    hue = s["hue"]
    assert float(hue.abs().max()) <= h + 1e-6 and float(hue.abs().max()) > 0.98 * h
    assert float(hue.mean()) == pytest.approx(0.0, abs=0.02 * h)
    assert float(s["sigma"].min()) >= 0.1 and float(s["sigma"].max()) <= 2.0
    assert float(s["sigma"].mean()) == pytest.approx(1.05, abs=0.03)
    order = s["order"]
    assert bool((order.sort(dim=1).values == torch.arange(4)).all()), "each row must be a permutation"
    freq = torch.stack([(order == op).double().mean(0) for op in range(4)])  # [op, position]
    assert bool(((freq - 0.25).abs() < 0.03).all()), freq


def test_sampler_rejects_bad_sizes():
    p = aug_params("v2", 32)
    with pytest.raises(ValueError, match="heights"):
        sample_params(3, p, [32, 32], 32)
    with pytest.raises(ValueError, match="widths"):
        sample_params(2, p, 32, [32, 0])


# ------------------------------------------------------------------------------------------------ the CPU views


def test_views_shapes_dtypes_and_odd_inputs():
    aug = build_view_augment("v2", 32, 1.0)
    g = torch.Generator().manual_seed(0)
    for hw in [(40, 28), (28, 40), (8, 8), (32, 32)]:
        out = aug(colour_image(*hw), g)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8 and out.is_contiguous()
        q, k = aug.pair(colour_image(*hw), g)
        assert q.shape == k.shape == (3, 32, 32)
    mixed = aug.views([colour_image(40, 28), colour_image(8, 8), colour_image(33, 17)], g)
    assert mixed.shape == (3, 3, 32, 32) and mixed.dtype == torch.uint8
    blur = build_view_augment("v2", 64, 2.0)  # blur always on
    assert blur(colour_image(8, 8), g).shape == (3, 64, 64)
    assert aug.views([], g).shape == (0, 3, 32, 32)


def test_bad_images_raise_value_errors():
    aug = build_view_augment("v1", 32)
    with pytest.raises(ValueError, match="uint8 tensor"):
        aug(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="uint8 tensor"):
        aug(torch.zeros(1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="eval_view"):
        eval_view(torch.zeros(32, 32, 3, dtype=torch.uint8).numpy(), 32)


@pytest.mark.parametrize("preset", ["v1", "v2"])
def test_strength_zero_gives_identical_undistorted_views(preset):
    aug = build_view_augment(preset, 32, 0.0)
    g = torch.Generator().manual_seed(0)
    square = colour_image(32, 32)
    for _ in range(5):
        q, k = aug.pair(square, g)
        assert torch.equal(q, k) and torch.equal(q, square)
    tall = colour_image(40, 28)
    q, k = aug.pair(tall, g)
    assert torch.equal(q, k)
    # the central square, resized to the output size (Pillow's bilinear resize of that box)
    assert torch.equal(q, from_pil(to_pil(tall).resize((32, 32), Image.Resampling.BILINEAR, box=(0, 6, 28, 34))))
    ref = TF.resized_crop(tall, 6, 0, 28, 28, [32, 32], antialias=True)  # torchvision's tensor op: nearly equal
    assert float((q.float() - ref.float()).abs().mean()) < 1.0


def test_same_seed_same_views_and_different_seeds_differ():
    aug = build_view_augment("v2", 64, 1.0)
    img = colour_image(48, 40)
    a = aug.pair(img, torch.Generator().manual_seed(7))
    b = aug.pair(img, torch.Generator().manual_seed(7))
    c = aug.pair(img, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1]), "the two views of a pair must be drawn independently"
    assert not torch.equal(a[0], c[0])


def test_apply_honours_each_drawn_parameter():
    """Hand-set parameters: each op is applied exactly when its mask says so.

    The views are made with Pillow (as MoCo's official pipeline): each op is pinned to a written-out Pillow
    reference (torchvision's own PIL ops where they exist, i.e. ImageEnhance for brightness, contrast and
    saturation), and checked to stay within a few grey levels of torchvision's uint8 tensor ops.
    """
    aug = ViewAugment("v2", 64, 1.0)
    img = colour_image(64, 64)
    base = sample_params(1, aug.params, 64, 64, torch.Generator().manual_seed(0))
    off = {
        **base,
        "top": torch.tensor([8]),
        "left": torch.tensor([4]),
        "height": torch.tensor([40]),
        "width": torch.tensor([48]),
        **{k: torch.tensor([False]) for k in ("flip", "jitter", "gray", "blur")},
    }
    crop_pil = to_pil(img).resize((64, 64), Image.Resampling.BILINEAR, box=(4, 8, 52, 48))
    crop = from_pil(crop_pil)
    assert torch.equal(aug.apply([img], off)[0], crop)
    assert float((crop.float() - TF.resized_crop(img, 8, 4, 40, 48, [64, 64], antialias=True).float()).abs().mean()) < 1
    flipped = aug.apply([img], {**off, "flip": torch.tensor([True])})[0]
    assert torch.equal(flipped, crop.flip(-1))
    gray = aug.apply([img], {**off, "gray": torch.tensor([True])})[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert torch.equal(gray[0], from_pil(crop_pil.convert("L"))[0])
    blurred = aug.apply([img], {**off, "blur": torch.tensor([True]), "sigma": torch.tensor([1.5])})[0]
    assert torch.equal(blurred, from_pil(crop_pil.filter(ImageFilter.GaussianBlur(float(torch.tensor(1.5))))))
    assert float((blurred.float() - TF.gaussian_blur(crop, [7, 7], [1.5, 1.5]).float()).abs().mean()) < 1.5
    jit = {**off, "jitter": torch.tensor([True]), "order": torch.tensor([[3, 0, 2, 1]])}
    jit.update(brightness=torch.tensor([1.3]), contrast=torch.tensor([0.7]), saturation=torch.tensor([1.2]))
    jit["hue"] = torch.tensor([0.08])
    b, c, sat, h = (float(jit[k][0]) for k in ("brightness", "contrast", "saturation", "hue"))  # float32 values
    # hue: Pillow's HSV, hue channel shifted by round(h * 255) mod 255 (255 is a full turn in Pillow's HSV)
    hh, s, v = crop_pil.convert("HSV").split()
    hh = Image.fromarray(((np.asarray(hh).astype(np.int64) + round(h * 255)) % 255).astype(np.uint8), "L")
    x = Image.merge("HSV", (hh, s, v)).convert("RGB")
    x = ImageEnhance.Contrast(ImageEnhance.Color(ImageEnhance.Brightness(x).enhance(b)).enhance(sat)).enhance(c)
    got = aug.apply([img], jit)[0]
    assert torch.equal(got, from_pil(x))
    want = TF.adjust_contrast(TF.adjust_saturation(TF.adjust_brightness(TF.adjust_hue(crop, h), b), sat), c)
    assert float((got.float() - want.float()).abs().mean()) < 2.0
    assert float((got.float() - crop.float()).abs().mean()) > 8.0  # the jitter did something


def test_output_level_grayscale_rate_matches_preset():
    """End to end: the fraction of grey views (r == g == b) is the preset's grayscale probability."""
    aug = build_view_augment("v1", 8, 1.0)
    imgs = [colour_image(12, 12, seed=i % 4) for i in range(1000)]
    views = aug.views(imgs, torch.Generator().manual_seed(3))
    grey = (views[:, 0] == views[:, 1]).flatten(1).all(1) & (views[:, 1] == views[:, 2]).flatten(1).all(1)
    assert _fraction(grey) == pytest.approx(0.2, abs=0.04)


# ---------------------------------------------------------------------------------------- eval / gpu-source views


def test_eval_view_and_resize_for_gpu():
    assert source_size(32) == 32 and source_size(224) == 256 and source_size(96) == 110
    small = colour_image(32, 32)
    assert torch.equal(eval_view(small, 32), small)  # small images are not resized
    assert eval_view(colour_image(40, 28), 32).shape == (3, 32, 32)
    big = colour_image(120, 150)
    ev = eval_view(big, 96)
    assert ev.shape == (3, 96, 96) and ev.dtype == torch.uint8
    ref = TF.center_crop(TF.resize(big, [110], antialias=True), [96, 96])
    assert torch.equal(ev, ref)
    src = resize_for_gpu(big, 96)
    assert src.shape == (3, 110, 110) and torch.equal(src, TF.center_crop(TF.resize(big, [110], antialias=True), 110))
    assert resize_for_gpu(colour_image(8, 8), 32).shape == (3, 32, 32)


def test_normalize_on_device():
    x = torch.stack([colour_image(16, 16, seed=i) for i in range(4)])
    out = normalize_on_device(x, "cpu")
    ref = TF.normalize(x.float() / 255.0, list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)
    bf = normalize_on_device(x, torch.device("cpu"), dtype=torch.bfloat16, channels_last=True)
    assert bf.dtype == torch.bfloat16 and bf.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(bf.float(), ref, atol=0.02)
    with pytest.raises(ValueError, match="uint8"):
        normalize_on_device(x.float(), "cpu")
