"""The view augmentations of ``augment``, batched on whatever device the images are on (``aug.device=gpu``).

Parameters come from the same :func:`moco_ray.data.augment.sample_params` as the CPU path, so the distributions
are identical by construction; only the application differs:

- crop + resize: ``torchvision.ops.roi_align`` (aligned, adaptive ``sampling_ratio``): each output pixel averages
  ceil(crop/size)^2 bilinear samples over its footprint, a box-filter approximation of torchvision's antialiased
  resize (the same where the crop is upsampled, which is plain bilinear there). At the crop's edge roi_align
  reads the true neighbouring pixels where resized_crop repeats the crop's own edge pixel: sub-pixel differences.
- colour jitter, grayscale, blur and flip in float32 in [0, 1], per-sample factors, clamped after every op as
  torchvision's blend does. torchvision's uint8 kernels truncate to uint8 after each op; here values stay float
  and are rounded once at the end, so outputs differ by about a grey level on average (tested).

No Python loop over samples: per-sample choices are masks and factor tensors; the only loop is over the 4 jitter
op positions (the op order is random per sample, so each position applies brightness/contrast/saturation as one
blend with a per-sample target, and hue where that sample's op is hue). Hue is computed for the whole batch at
each position and kept where selected (no data-dependent shapes, so no device sync): 4 RGB<->HSV round trips.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from moco_ray.data.augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    AugParams,
    aug_params,
    resize_for_gpu,
    sample_params,
    source_size,
)
from moco_ray.data.decode import decode_batch_on

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _col(mask_or_factor: torch.Tensor) -> torch.Tensor:
    return mask_or_factor.view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] luma."""
    r, g, b = x.unbind(1)
    return (r * _GRAY[0] + g * _GRAY[1] + b * _GRAY[2]).unsqueeze(1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-sample hue shift (``shift`` [N] in [-0.5, 0.5]) of float RGB [N, 3, H, W] in [0, 1] via HSV,
    torchvision's formulas (Pillow's RGB->HSV; closed-form HSV->RGB)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    eqc = delta == 0
    ones = torch.ones_like(maxc)
    s = delta / torch.where(eqc, ones, maxc)
    d = torch.where(eqc, ones, delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = (h / 6.0 + 1.0).fmod(1.0)
    h = (h + shift.view(-1, 1, 1)).remainder(1.0)
    # HSV -> RGB: c_n = v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6 with n = 5, 3, 1 for r, g, b
    n = (5.0 - 2.0 * torch.arange(3, device=x.device, dtype=x.dtype)).view(1, 3, 1, 1)  # no host-to-device copy
    k = (n + 6.0 * h.unsqueeze(1)).remainder(6.0)
    v, s = maxc.unsqueeze(1), s.unsqueeze(1)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def color_jitter(x: torch.Tensor, p: dict[str, torch.Tensor], with_hue: bool = True) -> torch.Tensor:
    """ColorJitter with per-sample factors, apply mask (``p["jitter"]``) and op order (``p["order"]``)."""
    active = p["jitter"]
    one = torch.ones_like(p["brightness"])
    for pos in range(4):
        op = p["order"][:, pos]
        # brightness, contrast and saturation are all blends f*x + (1-f)*target; f = 1 leaves x exactly unchanged
        f = torch.where(op == BRIGHTNESS, p["brightness"], one)
        f = torch.where(op == CONTRAST, p["contrast"], f)
        f = torch.where(op == SATURATION, p["saturation"], f)
        f = _col(torch.where(active, f, one))
        gray = _gray(x)
        mean = gray.mean(dim=(-2, -1), keepdim=True)
        target = torch.where(_col(op == CONTRAST), mean, gray)
        target = torch.where(_col(op == BRIGHTNESS), torch.zeros_like(target), target)
        x = (f * x + (1.0 - f) * target).clamp(0.0, 1.0)
        if with_hue:
            is_hue = active & (op == HUE)
            x = torch.where(_col(is_hue), adjust_hue(x, torch.where(is_hue, p["hue"], 0.0 * one)), x)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample Gaussian blur (``sigma`` [N]) of [N, C, H, W]: separable grouped conv, reflect padding."""
    n, c, H, W = x.shape
    half = kernel_size // 2
    t = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - half
    ker = torch.exp(-(t * t) / (2.0 * sigma.to(x.dtype).view(-1, 1) ** 2))
    ker = (ker / ker.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [N*C, k]
    y = F.pad(x.reshape(1, n * c, H, W), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, ker.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, ker.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, H, W)


class GpuViewAugment:
    """Batched random views: imgs uint8 (or float in [0, 1]) [B, 3, H, W] on any device -> [B, 3, S, S].

    Output is uint8 by default (feed it to ``normalize_on_device`` like the CPU path's views); pass
    ``out_dtype=torch.float32`` for floats in [0, 1]. Without a generator, parameters are drawn with the global
    CPU RNG (see :meth:`sample`); a generator's own device is used otherwise.
    """

    def __init__(
        self,
        preset: str,
        image_size: int,
        strength: float = 1.0,
        out_dtype: torch.dtype = torch.uint8,
        crop_min: float = 0.0,
    ) -> None:
        self.params: AugParams = aug_params(preset, image_size, strength, crop_min)
        self.out_dtype = out_dtype

    @classmethod
    def from_config(cls, aug, out_dtype: torch.dtype = torch.uint8) -> GpuViewAugment:  # aug: AugConfig
        return cls(aug.preset, aug.image_size, aug.strength, out_dtype, aug.crop_min)

    @property
    def image_size(self) -> int:
        return self.params.image_size

    def __call__(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(imgs)
        return self.apply(imgs, self.sample(imgs, imgs.shape[0], generator))

    def pair(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent views of each image, drawn as one batch of 2B crops from the same source tensor."""
        _check_batch(imgs)
        B = imgs.shape[0]
        idx = torch.arange(B, device=imgs.device)
        views = self.apply(imgs, self.sample(imgs, 2 * B, generator), source_index=torch.cat([idx, idx]))
        return views[:B], views[B:]

    def sample(self, imgs: torch.Tensor, n: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Parameters of ``n`` views, drawn on the generator's device, else with the global CPU RNG.

        Not on the images' device: ``sample_params`` turns the image size into a CPU tensor and copies it to the
        draws' device, a blocking host-to-device copy (a stream sync) per call on a GPU. The CPU draws (a few
        hundred numbers) reach the images' device in :meth:`apply`, pinned and non-blocking.
        """
        device = generator.device if generator is not None else torch.device("cpu")
        return sample_params(n, self.params, imgs.shape[-2], imgs.shape[-1], generator, device)

    def apply(
        self, imgs: torch.Tensor, p: dict[str, torch.Tensor], source_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Apply drawn parameters; view i is cut from ``imgs[source_index[i]]`` (default: ``imgs[i]``)."""
        _check_batch(imgs)
        P, S = self.params, self.params.image_size
        dev = imgs.device
        p = {k: _to_device(v, dev) for k, v in p.items()}
        n = p["top"].shape[0]
        src = imgs.float() / 255.0 if imgs.dtype == torch.uint8 else imgs.float()
        if source_index is None:
            if n != imgs.shape[0]:
                raise ValueError(f"GpuViewAugment.apply: {n} parameter rows for {imgs.shape[0]} images")
            source_index = torch.arange(n, device=dev)
        # roi_align boxes: (source index, x1, y1, x2, y2) in pixel-edge coordinates (aligned=True)
        box = [p[k].to(src.dtype) for k in ("left", "top", "width", "height")]
        boxes = torch.stack([source_index.to(dev, src.dtype), box[0], box[1], box[0] + box[2], box[1] + box[3]], 1)
        x = roi_align(src, boxes, output_size=(S, S), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        if P.gray_p > 0 and P.gray_first:
            x = torch.where(_col(p["gray"]), _gray(x).expand_as(x), x)
        if P.jitter_p > 0:
            x = color_jitter(x, p, with_hue=P.hue > 0)
        if P.gray_p > 0 and not P.gray_first:
            x = torch.where(_col(p["gray"]), _gray(x).expand_as(x), x)
        if P.blur_p > 0 and P.blur_kernel:
            x = torch.where(_col(p["blur"]), gaussian_blur(x, p["sigma"], P.blur_kernel), x)
        if P.flip_p > 0:
            x = torch.where(_col(p["flip"]), x.flip(-1), x)
        if self.out_dtype == torch.uint8:
            return x.mul(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)
        return x.to(self.out_dtype)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without blocking the host: a CPU tensor bound for a GPU is pinned first (a non-blocking
    copy from pageable memory is staged synchronously)."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _check_batch(imgs: torch.Tensor) -> None:
    ok = isinstance(imgs, torch.Tensor) and imgs.ndim == 4 and imgs.shape[1] == 3
    if not ok or not (imgs.dtype == torch.uint8 or imgs.is_floating_point()):
        got = f"{imgs.dtype} {tuple(imgs.shape)}" if isinstance(imgs, torch.Tensor) else type(imgs).__name__
        raise ValueError(f"GpuViewAugment: expected uint8 or float images [B, 3, H, W], got {got}")
    if imgs.shape[0] == 0 or imgs.shape[2] < 1 or imgs.shape[3] < 1:
        raise ValueError(f"GpuViewAugment: empty batch {tuple(imgs.shape)}")


def sources_from_bytes(
    images: list[bytes | None], image_size: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded images -> the ``aug.device=gpu`` source batch on `device`: decoded there (batched nvJPEG on CUDA,
    see `moco_ray.data.decode.decode_batch_on`), each shorter side -> ``source_size``, centre square (exactly
    `resize_for_gpu`, now on the device), stacked uint8 [B, 3, P, P]; plus the corrupt flags int64 [B] (CPU).

    Images already P x P (CIFAR at 32 px) are stacked as they are; the others are resized one by one (sizes differ).
    """
    if not images:
        raise ValueError("sources_from_bytes: empty batch")
    imgs, corrupt = decode_batch_on(images, device)
    P = source_size(image_size)
    same = all(tuple(t.shape[1:]) == (P, P) for t in imgs)
    return torch.stack(imgs if same else [resize_for_gpu(t, image_size) for t in imgs]), corrupt
