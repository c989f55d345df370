"""Batched (device) view augmentations: each op against torchvision's, the whole path against the CPU path on the
same drawn parameters, seeding, shapes, and CUDA when present (the tests run on CPU tensors everywhere else)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from moco_ray.data.augment import ViewAugment, apply_color_jitter, resize_for_gpu, sample_params
from moco_ray.data.gpu_augment import GpuViewAugment, adjust_hue, color_jitter, gaussian_blur

pytestmark = pytest.mark.usefixtures("one_thread")


def colour_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(h, w), mode="bicubic")[0]
    x[:, : h // 3, : w // 4] = torch.tensor([0.9, 0.1, 0.2]).view(3, 1, 1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def real_images(image_root: Path) -> torch.Tensor:
    """16 real training images (CIFAR-10 when present, else digits), resized to 32 x 32 uint8."""
    files = sorted(p for p in (image_root / "train").rglob("*") if p.is_file())[::7][:16]
    return torch.stack([resize_for_gpu(decode_image(str(f), mode=ImageReadMode.RGB), 32) for f in files])


def test_adjust_hue_matches_torchvision_per_sample():
    x = torch.rand(6, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    x[0, :, :3] = 0.5  # grey pixels (undefined hue)
    x[1, :, :, :2] = 0.0  # black
    shift = torch.tensor([-0.5, -0.3, -0.01, 0.0, 0.2, 0.5])
    ref = torch.stack([TF.adjust_hue(x[i], float(shift[i])) for i in range(6)])
    assert torch.allclose(adjust_hue(x, shift), ref, atol=1e-5)


def test_color_jitter_matches_torchvision_op_by_op_in_float():
    """Per-sample factors and random op order, vs torchvision's ops applied one sample at a time."""
    aug = ViewAugment("v1", 16, 1.5)  # wide ranges, hue included
    n = 24
    x = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    p = sample_params(n, aug.params, 16, 16, torch.Generator().manual_seed(2))
    p["jitter"][:4] = False  # some samples untouched
    rows = [{k: v[i].tolist() for k, v in p.items()} for i in range(n)]
    ref = torch.stack([apply_color_jitter(x[i], rows[i]) if rows[i]["jitter"] else x[i] for i in range(n)])
    out = color_jitter(x, p)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.equal(out[:4], x[:4])
    assert (out[4:] - x[4:]).abs().mean() > 0.02  # the jitter did something


def test_gaussian_blur_matches_torchvision_per_sample():
    x = torch.rand(5, 3, 20, 18, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    ref = torch.stack([TF.gaussian_blur(x[i], [7, 7], [float(sigma[i])] * 2) for i in range(5)])
    assert torch.allclose(gaussian_blur(x, sigma, 7), ref, atol=1e-5)


@pytest.mark.parametrize("preset, size, strength", [("v1", 32, 1.0), ("v2", 32, 1.0), ("v2", 64, 1.0)])
def test_same_params_give_the_same_views_as_the_cpu_path(real_images, preset, size, strength):
    """CPU path (torchvision uint8 ops) and batched path agree for the same drawn parameters.

    They differ only by interpolation (roi_align's box average vs antialiased resize; at the crop border roi_align
    reads the true neighbours where resized_crop repeats the edge) and by torchvision truncating to uint8 after
    each colour op: a grey level or two on average, against tens for views with different parameters (a
    reversed jitter order or a negated hue shift already fails the bounds).
    """
    colour = torch.stack([colour_image(32, 32, seed=s) for s in range(8)])
    src = torch.cat([real_images, colour])
    if size > 32:  # the 64 px preset (blur on) draws from its 73 px source square, as with aug.device=gpu
        src = torch.stack([resize_for_gpu(TF.resize(im, [80], antialias=True), size) for im in src])
    cpu, dev = ViewAugment(preset, size, strength), GpuViewAugment(preset, size, strength)
    p = sample_params(len(src), cpu.params, src.shape[-2], src.shape[-1], torch.Generator().manual_seed(4))
    if size > 32:
        assert p["blur"].any() and not p["blur"].all()
    a = cpu.apply(list(src), p).float()
    b = dev.apply(src, p)
    assert b.dtype == torch.uint8 and b.shape == (len(src), 3, size, size)
    diff = (a - b.float()).abs()
    assert float(diff.mean()) < 2.0, float(diff.mean())  # measured 1.3-1.6 (CIFAR), mostly the uint8 truncation
    assert float(diff.flatten().quantile(0.99)) <= 6, float(diff.flatten().quantile(0.99))  # measured 3-5
    other = cpu.apply(list(src), sample_params(len(src), cpu.params, src.shape[-2], src.shape[-1]))
    assert float((a - other.float()).abs().mean()) > 8 * float(diff.mean())  # the check can tell views apart
    # geometry alone: closer still
    geo = {**p, **{k: torch.zeros_like(p[k]) for k in ("jitter", "gray", "blur")}}
    g_diff = (cpu.apply(list(src), geo).float() - dev.apply(src, geo).float()).abs()
    assert float(g_diff.mean()) < 1.0


def test_pair_shapes_seeding_and_float_output():
    imgs = torch.stack([colour_image(36, 36, seed=s) for s in range(6)])
    aug = GpuViewAugment("v2", 32, 1.0)
    q, k = aug.pair(imgs, torch.Generator().manual_seed(0))
    q2, k2 = aug.pair(imgs, torch.Generator().manual_seed(0))
    assert q.shape == k.shape == (6, 3, 32, 32) and q.dtype == torch.uint8
    assert torch.equal(q, q2) and torch.equal(k, k2)
    assert not torch.equal(q, k)
    q3, _ = aug.pair(imgs, torch.Generator().manual_seed(1))
    assert not torch.equal(q, q3)
    # pair == views drawn with 2B parameters from one generator, the first B for q
    p = sample_params(12, aug.params, 36, 36, torch.Generator().manual_seed(0))
    assert torch.equal(aug.apply(torch.cat([imgs, imgs]), p), torch.cat([q, k]))
    f = GpuViewAugment("v2", 32, 1.0, out_dtype=torch.float32)(imgs, torch.Generator().manual_seed(0))
    assert f.dtype == torch.float32 and float(f.min()) >= 0.0 and float(f.max()) <= 1.0
    single = aug(colour_image(28, 40)[None])  # non-square source, global RNG
    assert single.shape == (1, 3, 32, 32)
    tiny = GpuViewAugment("v1", 32, 1.0)(torch.stack([colour_image(8, 8)] * 3))  # 8 px upsampled to 32
    assert tiny.shape == (3, 3, 32, 32)


def test_strength_zero_views_are_identical_and_undistorted():
    imgs = torch.stack([colour_image(32, 32, seed=s) for s in range(4)])
    q, k = GpuViewAugment("v2", 32, 0.0).pair(imgs, torch.Generator().manual_seed(0))
    assert torch.equal(q, k) and torch.equal(q, imgs)


def test_output_level_rates_match_the_preset():
    """End to end on the batched path: ~20% grey views (v2 sampler) and ~50% mirrored views."""
    n = 1500
    src = colour_image(12, 12, seed=5)[None].expand(n, 3, 12, 12)
    views = GpuViewAugment("v2", 8, 1.0)(src, torch.Generator().manual_seed(6))
    grey = (views[:, 0] == views[:, 1]).flatten(1).all(1) & (views[:, 1] == views[:, 2]).flatten(1).all(1)
    assert float(grey.double().mean()) == pytest.approx(0.2, abs=0.035)
    # mirrored views, with the crop fixed to the whole image and no colour ops
    flips = GpuViewAugment("v1", 12, 1.0)
    pf = sample_params(n, flips.params, 12, 12, torch.Generator().manual_seed(9))
    pf.update(top=torch.zeros(n, dtype=torch.long), left=torch.zeros(n, dtype=torch.long))
    pf.update(height=torch.full((n,), 12), width=torch.full((n,), 12))
    pf.update(jitter=torch.zeros(n, dtype=torch.bool), gray=torch.zeros(n, dtype=torch.bool))
    mirrored = (flips.apply(src, pf) == src.flip(-1)).flatten(1).all(1)
    assert float(mirrored.double().mean()) == pytest.approx(0.5, abs=0.04)
    assert torch.equal(mirrored, pf["flip"])


def test_bad_batches_raise_value_errors():
    aug = GpuViewAugment("v2", 32)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        aug(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        aug(torch.zeros(2, 3, 32, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="parameter rows"):
        aug.apply(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), sample_params(3, aug.params, 32, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_tensors():
    imgs = torch.stack([colour_image(73, 73, seed=s) for s in range(8)])
    aug = GpuViewAugment("v2", 64, 1.0, out_dtype=torch.float32)
    p = sample_params(8, aug.params, 73, 73, torch.Generator().manual_seed(0))
    on_cpu = aug.apply(imgs, p)
    on_gpu = aug.apply(imgs.cuda(), p)
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=2e-3)
    q, k = GpuViewAugment("v2", 64).pair(imgs.cuda())  # drawn with the CPU RNG, copied pinned to the device
    assert q.device.type == "cuda" and q.dtype == torch.uint8 and not torch.equal(q, k)
