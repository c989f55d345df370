"""View augmentations on the CPU (torchvision v2 ops on uint8 tensors), presets v1/v2 scaled by ``strength``.

One vectorised sampler, :func:`sample_params`, draws every random choice (crop box, flip, jitter factors and op
order, grayscale, blur) for both this CPU path and the batched device path in ``gpu_augment``; each path only
*applies* the drawn parameters. So "the GPU path samples the same distributions" holds by construction, and the
two can be compared output-for-output on the same parameters.

Presets (MoCo's official code):

- ``v1``: RandomResizedCrop(scale=(0.2, 1)), RandomGrayscale(p=0.2), ColorJitter(0.4, 0.4, 0.4, 0.4) always,
  horizontal flip.
- ``v2`` ("aug+"): RandomResizedCrop(scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8,
  RandomGrayscale(p=0.2), GaussianBlur(sigma in [0.1, 2]) with p=0.5, horizontal flip. The blur kernel is ~10% of
  the image size (odd). Blur is used only when ``image_size >= 64``: the official CIFAR (32 px) demo omits it,
  since a 3 px kernel on a 32 px image mostly destroys the little detail there is.
- ``v3`` (MoCo v3 ``augmentation1`` / ``augmentation2``, BYOL's asymmetric views): RandomResizedCrop(scale=(0.2, 1))
  (``--crop-min .2`` of the ResNet recipe), ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, RandomGrayscale(p=0.2),
  GaussianBlur(sigma in [0.1, 2]) with p=1.0 on view 1 and p=0.1 on view 2, Solarize (threshold 128) with p=0 on
  view 1 and p=0.2 on view 2, horizontal flip. Views alternate by row: rows 0, 2, 4... (queries, and a single
  view) use view 1's probabilities, rows 1, 3, 5... (keys) view 2's, as ``pair`` and the stream lay them out.
  Blur follows the same image-size rule as v2. CPU path only (config refuses ``aug.device=gpu`` with v3).
- ``cifar`` (the official CIFAR-10 demo's ``train_transform``): RandomResizedCrop(32) with torchvision's default
  scale (0.08, 1), horizontal flip, ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, RandomGrayscale(p=0.2), no blur
  (flip commutes with the per-pixel colour ops, so the demo's flip-first order gives the same distribution).

``strength`` s (0..2; 1 = the preset) scales the distortions: jitter magnitudes linearly (hue capped at 0.5),
the crop-scale lower bound ``1 - s * 0.8`` (clipped to [0.02, 1]), the log aspect-ratio range ``s * log(4/3)``,
and the grayscale and blur probabilities (clipped to 1). At s = 0 there is no distortion at all, flip included:
the crop is the central square at full size, so both views of an image are identical (a "no augmentation"
baseline for sweeps).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms.v2 import functional as TF

from moco_ray.core.defaults import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (re-exported for callers)
from moco_ray.core.normalize import Normalizer

PRESETS = ("v1", "v2", "v3", "cifar")
# Below this size the eval / GPU-source resize keeps the image at image_size (CIFAR-like data), and no blur is used.
SMALL_IMAGE = 64
CROP_TRIES = 10  # RandomResizedCrop's attempts before it falls back to a central crop
# Indices of the jitter ops in ``order`` (torchvision ColorJitter's fn_idx convention).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclass(frozen=True)
class AugParams:
    """The distribution parameters of one preset at one strength (what :func:`sample_params` draws from)."""

    preset: str
    image_size: int
    strength: float
    scale: tuple[float, float]  # crop area fraction range
    ratio: tuple[float, float]  # crop aspect ratio (w/h) range, sampled log-uniformly
    flip_p: float
    jitter_p: float
    brightness: float  # factor ~ U[max(0, 1 - b), 1 + b]
    contrast: float
    saturation: float
    hue: float  # shift ~ U[-hue, hue]
    gray_p: float
    gray_first: bool  # v1 greys before the jitter, v2 after
    blur_p: float
    sigma: tuple[float, float]
    blur_kernel: int  # odd; 0 when blur is off for this image size
    # per view (view 1 = even rows, view 2 = odd rows): blur and solarize probabilities (v3's asymmetric views)
    view_blur_p: tuple[float, float] = (0.0, 0.0)
    view_solarize_p: tuple[float, float] = (0.0, 0.0)

    def as_dict(self) -> dict:
        return asdict(self)


def blur_kernel_size(image_size: int) -> int:
    """Odd kernel of ~10% of the image side (SimCLR / MoCo v2), at least 3."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


# Per preset: jitter (b, c, s, h), jitter p, grayscale p, crop-scale lower bound, blur p per view, solarize p per
# view, whether grey comes before the jitter.
_PRESET_TABLE: dict[str, dict] = {
    "v1": {"jitter": (0.4, 0.4, 0.4, 0.4), "jitter_p": 1.0, "crop_min": 0.2, "blur": (0.0, 0.0)},
    "v2": {"jitter": (0.4, 0.4, 0.4, 0.1), "jitter_p": 0.8, "crop_min": 0.2, "blur": (0.5, 0.5)},
    "v3": {"jitter": (0.4, 0.4, 0.2, 0.1), "jitter_p": 0.8, "crop_min": 0.2, "blur": (1.0, 0.1), "sol": (0.0, 0.2)},
    "cifar": {"jitter": (0.4, 0.4, 0.4, 0.1), "jitter_p": 0.8, "crop_min": 0.08, "blur": (0.0, 0.0)},
}


def aug_params(preset: str, image_size: int, strength: float = 1.0, crop_min: float = 0.0) -> AugParams:
    """Distribution parameters for ``preset`` (see :data:`PRESETS`) at ``image_size`` and ``strength`` (0..2).

    ``crop_min`` (``aug.crop_min``, MoCo v3's ``--crop-min``): the crop-scale lower bound at strength 1 in place of
    the preset's (0 keeps it): the v3 views are the same for ResNets (0.2) and ViTs (0.08), only this differs."""
    if preset not in PRESETS:
        raise ValueError(f"aug.preset: {preset!r} is not one of {', '.join(PRESETS)}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"aug.image_size: {image_size!r} is out of range; allowed: an integer >= 8")
    if not (0.0 <= float(strength) <= 2.0):
        raise ValueError(f"aug.strength: {strength!r} is out of range; allowed: 0 <= strength <= 2")
    if not (0.0 <= float(crop_min) <= 1.0):
        raise ValueError(f"aug.crop_min: {crop_min!r} is out of range; allowed: 0 < crop_min <= 1, or 0 (the preset's)")
    s, row = float(strength), _PRESET_TABLE[preset]
    lower = float(crop_min) or row["crop_min"]
    jitter = row["jitter"]
    b, c, sat = (j * s for j in jitter[:3])
    hue = min(jitter[3] * s, 0.5)
    half_log_ratio = s * math.log(4.0 / 3.0)
    use_blur = max(row["blur"]) > 0 and image_size >= SMALL_IMAGE
    blur = tuple(min(p * s, 1.0) if use_blur else 0.0 for p in row["blur"])
    sol = tuple(min(p * s, 1.0) for p in row.get("sol", (0.0, 0.0)))
    return AugParams(
        preset=preset,
        image_size=image_size,
        strength=s,
        scale=(min(max(1.0 - s * (1.0 - lower), 0.02), 1.0), 1.0),
        ratio=(math.exp(-half_log_ratio), math.exp(half_log_ratio)),
        flip_p=0.5 if s > 0 else 0.0,
        jitter_p=row["jitter_p"] if s > 0 else 0.0,
        brightness=b,
        contrast=c,
        saturation=sat,
        hue=hue,
        gray_p=min(0.2 * s, 1.0),
        gray_first=preset == "v1",
        blur_p=blur[0],
        sigma=(0.1, 2.0),
        blur_kernel=blur_kernel_size(image_size) if use_blur else 0,
        view_blur_p=blur,
        view_solarize_p=sol,
    )


def _sizes(v: int | Sequence[int] | torch.Tensor, n: int, device: torch.device, what: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float64).cpu()  # checked on the CPU: no device sync in the hot path
    if t.numel() not in (1, n):
        raise ValueError(f"sample_params: {what} has {t.numel()} entries for n={n} views")
    if t.numel() and float(t.min()) < 1:
        raise ValueError(f"sample_params: image {what} must be >= 1, got {float(t.min()):g}")
    return t.reshape(-1).expand(n).to(device)


def _uniform(lo: float, hi: float, u: torch.Tensor) -> torch.Tensor:
    return lo + (hi - lo) * u


def draw_uniforms(
    n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """The raw uniform draws behind ``n`` views (what :func:`sample_params` consumes, in the same order).

    Keys: ``scale``, ``ratio`` (float64 [n, CROP_TRIES]), ``pos`` (float64 [n, 2]), ``u`` (float32 [n, 9]),
    ``order`` (float32 [n, 4]). Splitting the draws from their transformation lets a caller with one generator per
    image (the seeded stream) draw per image and transform the whole batch at once: for each image the result is
    exactly ``sample_params(n, ..., generator)``.
    """
    if n < 0:
        raise ValueError(f"sample_params: n must be >= 0, got {n}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    g, dev = generator, torch.device(device)

    def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.rand(*shape, generator=g, device=dev, dtype=dtype)

    return {
        "scale": rand(n, CROP_TRIES, dtype=torch.float64),
        "ratio": rand(n, CROP_TRIES, dtype=torch.float64),
        "pos": rand(n, 2, dtype=torch.float64),
        "u": rand(n, 9),  # flip, jitter, gray, blur, brightness, contrast, saturation, hue, sigma
        "order": rand(n, 4),
        "solarize": rand(n),  # drawn last: the draws above are those of the presets without solarize
    }


def sample_params(
    n: int,
    params: AugParams,
    heights: int | Sequence[int] | torch.Tensor,
    widths: int | Sequence[int] | torch.Tensor,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Draw the random choices of ``n`` views of images of the given sizes (scalars or one per view).

    Draws happen on ``device`` (default: the generator's device, else CPU) and always consume the same amount of
    randomness for a given ``n``, so a seeded generator reproduces the views. Keys: ``top``, ``left``,
    ``height``, ``width`` (int64 crop boxes, RandomResizedCrop's algorithm), ``flip``, ``jitter``, ``gray``,
    ``blur`` (bool masks), ``brightness``, ``contrast``, ``saturation``, ``hue``, ``sigma`` (float32), ``order``
    (int64 [n, 4], a permutation of BRIGHTNESS..HUE per view, as in ColorJitter).
    """
    return params_from_uniforms(draw_uniforms(n, generator, device), params, heights, widths)


def params_from_uniforms(
    draws: dict[str, torch.Tensor],
    params: AugParams,
    heights: int | Sequence[int] | torch.Tensor,
    widths: int | Sequence[int] | torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Turn :func:`draw_uniforms`' draws (rows may come from different generators) into view parameters."""
    n, dev = draws["u"].shape[0], draws["u"].device
    H, W = _sizes(heights, n, dev, "heights"), _sizes(widths, n, dev, "widths")
    # RandomResizedCrop.get_params, vectorised: the first of 10 tries that fits, else a central crop.
    # float64 as torchvision's Python floats, so rounding to whole pixels agrees.
    area = (H * W)[:, None]
    target = area * _uniform(*params.scale, draws["scale"])
    log_r = _uniform(math.log(params.ratio[0]), math.log(params.ratio[1]), draws["ratio"])
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first True (0 if none)
    any_fit = fits.any(dim=1)
    w = w.gather(1, first)[:, 0]
    h = h.gather(1, first)[:, 0]
    u_top, u_left = draws["pos"].unbind(1)
    top = torch.floor(u_top * (H - h + 1)).clamp_max(H - h)
    left = torch.floor(u_left * (W - w + 1)).clamp_max(W - w)
    in_ratio = W / H
    fb_w = torch.where(in_ratio > params.ratio[1], torch.round(H * params.ratio[1]), W)
    fb_h = torch.where(in_ratio < params.ratio[0], torch.round(W / params.ratio[0]), H)
    w, h = torch.where(any_fit, w, fb_w), torch.where(any_fit, h, fb_h)
    top = torch.where(any_fit, top, torch.div(H - h, 2, rounding_mode="floor"))
    left = torch.where(any_fit, left, torch.div(W - w, 2, rounding_mode="floor"))

    u = draws["u"]
    view2 = torch.arange(n, device=dev) % 2 == 1  # rows alternate view 1 (query) and view 2 (key)
    blur_p = torch.where(view2, params.view_blur_p[1], params.view_blur_p[0])
    sol_p = torch.where(view2, params.view_solarize_p[1], params.view_solarize_p[0])
    u_sol = draws.get("solarize", torch.ones(n, device=dev))
    bri = _uniform(max(0.0, 1.0 - params.brightness), 1.0 + params.brightness, u[:, 4])
    con = _uniform(max(0.0, 1.0 - params.contrast), 1.0 + params.contrast, u[:, 5])
    sat = _uniform(max(0.0, 1.0 - params.saturation), 1.0 + params.saturation, u[:, 6])
    return {
        "top": top.long(),
        "left": left.long(),
        "height": h.long(),
        "width": w.long(),
        "flip": u[:, 0] < params.flip_p,
        "jitter": u[:, 1] < params.jitter_p,
        "gray": u[:, 2] < params.gray_p,
        "blur": u[:, 3] < blur_p,
        "solarize": u_sol < sol_p,
        "brightness": bri,
        "contrast": con,
        "saturation": sat,
        "hue": _uniform(-params.hue, params.hue, u[:, 7]),
        "sigma": _uniform(*params.sigma, u[:, 8]),
        "order": draws["order"].argsort(dim=1),
    }


def check_image(img: torch.Tensor, where: str) -> None:
    if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
        got = f"{img.dtype} {tuple(img.shape)}" if isinstance(img, torch.Tensor) else type(img).__name__
        raise ValueError(f"{where}: expected a uint8 tensor [3, H, W], got {got}")
    if img.shape[1] < 1 or img.shape[2] < 1:
        raise ValueError(f"{where}: empty image {tuple(img.shape)}")


class ViewAugment:
    """Random views: uint8 [3, H, W] tensors (or PIL images) -> uint8 [3, S, S], each view's ops done in Pillow.

    Per-image ops run on PIL images (one ``resize(box=...)`` for crop + resize, lookup tables for brightness and
    contrast, Pillow's blend / HSV / GaussianBlur for saturation, hue and blur), as MoCo's official pipeline does;
    on small per-image arrays they cost about half of torchvision's uint8 tensor kernels. The parameters are those
    of :func:`sample_params` (shared with ``gpu_augment``); only the pixel arithmetic differs from the tensor ops
    (rounding, Pillow's HSV quantisation, its box-approximated Gaussian), by about a grey level on average.
    """

    def __init__(self, preset: str, image_size: int, strength: float = 1.0, crop_min: float = 0.0) -> None:
        self.params = aug_params(preset, image_size, strength, crop_min)

    @classmethod
    def from_config(cls, aug) -> ViewAugment:  # aug: moco_ray.config.AugConfig
        return cls(aug.preset, aug.image_size, aug.strength, aug.crop_min)

    @property
    def image_size(self) -> int:
        return self.params.image_size

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.views([img], generator)[0]

    def pair(self, img: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent views (query, key) of one image."""
        q, k = self.views([img, img], generator)
        return q, k

    def views(self, imgs: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """One view of each image (sizes may differ), parameters drawn in one vectorised call -> [N, 3, S, S]."""
        pils = [to_pil(im, "ViewAugment") for im in imgs]
        p = sample_params(len(pils), self.params, [im.height for im in pils], [im.width for im in pils], generator)
        return self.apply(pils, p)

    def apply(self, imgs: Sequence[torch.Tensor | Image.Image], p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply drawn parameters (from :func:`sample_params`, one row per image) -> uint8 [N, 3, S, S]."""
        S = self.params.image_size
        out = np.empty((len(imgs), S, S, 3), dtype=np.uint8)
        self.apply_into(out, [to_pil(im, "ViewAugment") for im in imgs], p)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def apply_into(
        self,
        out: np.ndarray,
        imgs: Sequence[Image.Image],
        p: dict[str, torch.Tensor],
        scales: Sequence[tuple[float, float]] | None = None,
    ) -> None:
        """Write view i of ``imgs[i]`` into ``out[i]`` (uint8 [N, S, S, 3], channels last).

        ``scales[i] = (sx, sy)`` (default (1, 1)) is the size of ``imgs[i]`` relative to the image the crop boxes
        were drawn on, per axis (a JPEG decoded at reduced size with ``draft``, see
        `moco_ray.data.decode.load_upright_rgb`): boxes are drawn in full-size coordinates and scaled here.
        """
        rows = {k: v.detach().cpu().tolist() for k, v in p.items()}
        for i, im in enumerate(imgs):
            r = {k: v[i] for k, v in rows.items()}
            x = self.view_pil(im, r, (1.0, 1.0) if scales is None else scales[i])
            if x.mode == "L":
                out[i] = np.asarray(x)[:, :, None]
            else:
                out[i] = np.asarray(x)

    def view_pil(self, img: Image.Image, r: dict, scale: tuple[float, float] = (1.0, 1.0)) -> Image.Image:
        """One view of an RGB PIL image with one drawn row; returns an RGB or (grey view) L image, S x S.

        ``scale = (sx, sy)``: the row's box is in coordinates of an image ``img.width / sx`` by
        ``img.height / sy`` (left and width are scaled by sx, top and height by sy)."""
        P, S = self.params, self.params.image_size
        sx, sy = scale
        lf, t = r["left"] * sx, r["top"] * sy
        right = _fit_edge(lf + r["width"] * sx, img.width)
        bottom = _fit_edge(t + r["height"] * sy, img.height)
        x = img.resize((S, S), Image.Resampling.BILINEAR, box=(lf, t, right, bottom))
        if P.gray_first and r["gray"]:
            x = x.convert("L")  # stays single-band: jitter keeps a grey image grey
        if r["jitter"]:
            x = pil_color_jitter(x, r)
        if not P.gray_first and r["gray"] and x.mode != "L":
            x = x.convert("L")
        if r["blur"] and P.blur_kernel:
            x = x.filter(ImageFilter.GaussianBlur(r["sigma"]))
        if r.get("solarize"):
            x = ImageOps.solarize(x, 128)  # MoCo v3's Solarize: values >= 128 inverted
        if r["flip"]:
            x = x.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return x


def _fit_edge(edge: float, size: int) -> float:
    """A scaled box edge, pulled back onto the image border when float rounding alone put it past it.

    With per-axis scales a box drawn inside the full-size image fits the reduced one by construction
    (``left * sx + width * sx <= W0 * (W' / W0) = W'``), but the products can overshoot ``W'`` by an ulp or so, which
    Pillow's ``resize(box=...)`` rejects. Only that rounding is absorbed: a larger overshoot (a box drawn on the
    wrong size, or the wrong scale) is left for Pillow to reject rather than silently squashing the crop. Unscaled
    boxes (integers, scale 1) are returned unchanged, so their views are bit-identical."""
    return float(size) if size < edge <= size * (1.0 + 1e-9) else edge


def to_pil(img: torch.Tensor | Image.Image, where: str = "to_pil") -> Image.Image:
    """uint8 [3, H, W] tensor (checked) or PIL image -> RGB PIL image."""
    if isinstance(img, Image.Image):
        return img if img.mode == "RGB" else img.convert("RGB")
    check_image(img, where)
    return Image.fromarray(img.permute(1, 2, 0).contiguous().numpy(), "RGB")


_RAMP = np.arange(256, dtype=np.float32)


def _blend_lut(factor: float, base: float) -> list[int]:
    """Pillow's ``Image.blend(constant base, img, factor)`` per grey level: trunc(base + f * (v - base)), clipped."""
    v = np.float32(base) + np.float32(factor) * (_RAMP - np.float32(base))
    return np.clip(v, 0, 255).astype(np.uint8).tolist()


def pil_color_jitter(x: Image.Image, r: dict) -> Image.Image:
    """ColorJitter on a PIL image (RGB or L) with one drawn row, torchvision's PIL ops (ImageEnhance) computed
    faster: brightness and contrast as lookup tables (the same values as ImageEnhance's blends), saturation as
    ImageEnhance.Color's blend with the grey image, hue through Pillow's HSV (shift rounded to 1/255 of a turn)."""
    for op in r["order"]:
        if op == BRIGHTNESS and r["brightness"] != 1.0:
            x = x.point(_blend_lut(r["brightness"], 0.0) * len(x.getbands()))
        elif op == CONTRAST and r["contrast"] != 1.0:
            grey = x if x.mode == "L" else x.convert("L")
            hist = np.asarray(grey.histogram(), dtype=np.float64)
            mean = int(float(hist @ _RAMP.astype(np.float64)) / max(float(hist.sum()), 1.0) + 0.5)
            x = x.point(_blend_lut(r["contrast"], float(mean)) * len(x.getbands()))
        elif op == SATURATION and r["saturation"] != 1.0 and x.mode != "L":
            x = Image.blend(x.convert("L").convert("RGB"), x, r["saturation"])
        elif op == HUE and r["hue"] != 0.0 and x.mode != "L":
            shift = int(round(r["hue"] * 255.0)) % 255
            if shift:
                hh, s, v = x.convert("HSV").split()
                hh = hh.point([(i + shift) % 255 for i in range(256)])
                x = Image.merge("HSV", (hh, s, v)).convert("RGB")
    return x


def apply_color_jitter(x: torch.Tensor, r: dict) -> torch.Tensor:
    """ColorJitter on one image with one drawn row (``{key: value}``, see :func:`sample_params`); neutral
    factors are skipped, as ColorJitter skips a zero magnitude."""
    for op in r["order"]:
        if op == BRIGHTNESS and r["brightness"] != 1.0:
            x = TF.adjust_brightness(x, r["brightness"])
        elif op == CONTRAST and r["contrast"] != 1.0:
            x = TF.adjust_contrast(x, r["contrast"])
        elif op == SATURATION and r["saturation"] != 1.0:
            x = TF.adjust_saturation(x, r["saturation"])
        elif op == HUE and r["hue"] != 0.0:
            x = TF.adjust_hue(x, r["hue"])
    return x


def build_view_augment(preset: str, image_size: int, strength: float = 1.0, crop_min: float = 0.0) -> ViewAugment:
    return ViewAugment(preset, image_size, strength, crop_min)


def source_size(image_size: int) -> int:
    """Shorter side before the eval centre crop / the GPU-path source square: image_size / 0.875 (256 for 224) for
    images of 64 px and more, image_size itself for small (CIFAR-like) images, where a 12% border matters."""
    return image_size if image_size < SMALL_IMAGE else int(round(image_size / 0.875))


def _resize_center(img: torch.Tensor, short: int, crop: int) -> torch.Tensor:
    if min(img.shape[1:]) != short:
        img = TF.resize(img, [short], antialias=True)  # shorter side -> short, aspect kept
    if tuple(img.shape[1:]) != (crop, crop):
        img = TF.center_crop(img, [crop, crop])
    return img.contiguous()


def eval_view(img: torch.Tensor, image_size: int) -> torch.Tensor:
    """Deterministic eval view: shorter side -> :func:`source_size`, centre crop ``image_size`` (uint8)."""
    check_image(img, "eval_view")
    return _resize_center(img, source_size(image_size), image_size)


def resize_for_gpu(img: torch.Tensor, image_size: int) -> torch.Tensor:
    """The CPU part of ``aug.device=gpu``: shorter side -> P = :func:`source_size`, centre crop P x P (uint8).

    The device path needs equal-sized batches, so its random crops are drawn from this fixed square instead of the
    full image. Trade-off vs the CPU path: the sides of non-square images are never seen, and small crops are
    upsampled from a P-px source (P = 256 for 224) rather than the full resolution, so they are a little softer;
    in exchange each row ships as P*P*3 bytes and the crop/jitter/blur cost moves off the CPU.
    """
    check_image(img, "resize_for_gpu")
    P = source_size(image_size)
    return _resize_center(img, P, P)


def normalize_on_device(
    x: torch.Tensor, device: torch.device | str, dtype: torch.dtype = torch.float32, channels_last: bool = False
) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> ImageNet-normalised ``dtype`` on ``device``: the training normaliser
    (:class:`moco_ray.core.normalize.Normalizer`), one per (device, dtype, memory format)."""
    return _normalizer(str(torch.device(device)), dtype, channels_last)(x)


@functools.lru_cache(maxsize=16)
def _normalizer(device: str, dtype: torch.dtype, channels_last: bool) -> Normalizer:
    return Normalizer(device=device, dtype=dtype, channels_last=channels_last)
