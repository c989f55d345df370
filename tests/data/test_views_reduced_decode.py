"""Train views of JPEGs decoded at reduced size (``Image.draft``): crop boxes touching every edge fit and match.

libjpeg scales each side on its own (ceil(w / k), ceil(h / k)), so the reduced image's x and y scales differ
when a side is not a multiple of k (1077 x 784 at 1/8 is 135 x 98: 0.12535 across, 0.125 down), and with EXIF
orientations 5-8 the stored sides are the upright ones swapped. Catches the mutation "one scale (the width's)
for both axes" (in `load_upright_rgb`'s result or in `ViewAugment.view_pil`): a box reaching the bottom edge
then ends past the reduced image and Pillow raises ``box can't exceed original image size``; scales taken
before the EXIF transpose (stored instead of upright axes) fail the same way on the orientation 6 / 8 images,
and a crop scaled on the wrong axis fails the comparison with the full-size decode.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import moco_ray.data.views as views_mod
from moco_ray.data.augment import ViewAugment, sample_params
from moco_ray.data.decode import load_upright_rgb, open_image, upright_size
from moco_ray.data.views import make_pairs

S = 40  # output side; every box below is >= 8 * S on each side, so every image is decoded at 1/8
ORIENTATIONS = (6, 1, 8, 3, 5, 7)
# What a camera stores for each tag: the upright image under the inverse of ImageOps.exif_transpose's method.
_STORE = {
    1: None,
    3: Image.Transpose.ROTATE_180,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def upright_sizes() -> list[tuple[int, int]]:
    """(width, height) of the upright images: 1077 x 784 plus 30 seeded draws in 600..1300 x 500..1300."""
    rng = np.random.default_rng(20240611)
    drawn = zip(rng.integers(600, 1301, 30).tolist(), rng.integers(500, 1301, 30).tolist(), strict=True)
    return [(1077, 784), *drawn]


def upright_array(w: int, h: int) -> np.ndarray:
    """Smooth, asymmetric content (gradients, a red block top-left, a blue block bottom-right): JPEG-friendly,
    and any flip, rotation or axis mix-up changes it."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * np.sin(x / 90.0 + y / 130.0)], axis=-1)
    img[: h // 4, : w // 5] = (230, 20, 30)
    img[-h // 6 :, -w // 7 :] = (20, 40, 220)
    return img.round().clip(0, 255).astype(np.uint8)


def stored_jpeg(w: int, h: int, orientation: int) -> bytes:
    im = Image.fromarray(upright_array(w, h))
    if _STORE[orientation] is not None:
        im = im.transpose(_STORE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def cases() -> list[tuple[int, int, int, bytes]]:
    """(upright width, upright height, orientation, JPEG bytes) per image."""
    out = []
    for i, (w, h) in enumerate(upright_sizes()):
        o = ORIENTATIONS[i % len(ORIENTATIONS)]
        out.append((w, h, o, stored_jpeg(w, h, o)))
    return out


def test_cases_cover_the_bug():
    sizes = upright_sizes()
    assert (1077, 784) in sizes
    assert sum(w % 8 != 0 for w, _ in sizes) >= 10 and sum(h % 8 != 0 for _, h in sizes) >= 10
    assert sum((-(-w // 8) / w) != (-(-h // 8) / h) for w, h in sizes) >= 20  # x and y scales differ


def test_load_upright_rgb_scales_are_per_upright_axis(cases):
    for w, h, o, data in cases:
        im = open_image(data)
        assert upright_size(im) == (h, w)
        rgb, (sx, sy) = load_upright_rgb(im, 8)
        # libjpeg at 1/8: each *stored* side rounded up, the upright image is that swapped for 5-8
        assert rgb.size == (-(-w // 8), -(-h // 8)), (w, h, o)
        assert (sx, sy) == (rgb.width / w, rgb.height / h), (w, h, o)
        full, scale = load_upright_rgb(open_image(data))
        assert full.size == (w, h) and scale == (1.0, 1.0)


def _edge_boxes(real_crop_params):
    """`_crop_params` with the real draws but boxes that touch every edge: q = the whole upright image, k = the
    bottom-right part from (h // 5, w // 7)."""

    def crop_params(aug, draws, hw):
        p = real_crop_params(aug, draws, hw)
        hs = torch.tensor([h for h, _ in hw], dtype=torch.int64)
        ws = torch.tensor([w for _, w in hw], dtype=torch.int64)
        top = torch.stack([torch.zeros_like(hs), hs // 5], 1).reshape(-1)
        left = torch.stack([torch.zeros_like(ws), ws // 7], 1).reshape(-1)
        p["top"], p["left"] = top, left
        p["height"] = hs.repeat_interleave(2) - top
        p["width"] = ws.repeat_interleave(2) - left
        return p

    return crop_params


def _pairs(cases, monkeypatch, *, reduce: bool) -> tuple[np.ndarray, np.ndarray, list]:
    """The stream's map_batches body on all cases (no distortion: the views are the boxes, resized)."""
    loads = []
    real_load = views_mod.load_upright_rgb

    def spy(im, reduce_=1):
        out = real_load(im, reduce_)
        loads.append((reduce_, out[0].size, out[1]))
        return out

    monkeypatch.setattr(views_mod, "_crop_params", _edge_boxes(views_mod._crop_params))
    monkeypatch.setattr(views_mod, "load_upright_rgb", spy)
    if not reduce:
        monkeypatch.setattr(views_mod, "_draft_factor", lambda crops_hw, size: 1)
    batch = {
        "image": np.array([c[3] for c in cases], dtype=object),
        "label": np.zeros(len(cases), dtype=np.int64),
        "id": np.array([f"r{i}" for i in range(len(cases))], dtype=object),
    }
    out = make_pairs(batch, preset="v2", image_size=S, strength=0.0, device="cpu", seed=None, epoch_offset=0)
    monkeypatch.undo()
    assert out["corrupt"].tolist() == [0] * len(cases)
    return out["q"], out["k"], loads


def test_edge_touching_crops_fit_the_reduced_decode_and_match_the_full_decode(cases, monkeypatch):
    q8, k8, loads8 = _pairs(cases, monkeypatch, reduce=True)
    assert q8.shape == k8.shape == (len(cases), 3, S, S) and q8.dtype == np.uint8
    # every image really went through the 1/8 decode, most with different x and y scales
    assert [r for r, _, _ in loads8] == [8] * len(cases)
    assert sum(sx != sy for _, _, (sx, sy) in loads8) >= 20

    q1, k1, loads1 = _pairs(cases, monkeypatch, reduce=False)
    assert [s for _, _, s in loads1] == [(1.0, 1.0)] * len(cases)
    for i, (w, h, o, _) in enumerate(cases):
        for name, a, b in (("q", q8, q1), ("k", k8, k1)):
            diff = float(np.abs(a[i].astype(np.float32) - b[i].astype(np.float32)).mean())
            assert diff < 8.0, f"{w}x{h} orientation {o} view {name}: reduced vs full decode differ by {diff:.1f}"
        # and the whole-image view is the upright picture (orientation applied on both axes)
        ref = Image.fromarray(upright_array(w, h)).resize((S, S), Image.Resampling.BILINEAR)
        diff = float(np.abs(q8[i].transpose(1, 2, 0).astype(np.float32) - np.asarray(ref, np.float32)).mean())
        assert diff < 8.0, f"{w}x{h} orientation {o}: whole-image view differs from the upright image by {diff:.1f}"


def test_view_pil_full_box_on_reduced_decode(cases):
    """`view_pil` directly: a row covering the full upright image, scaled by the per-axis scales, fits."""
    aug = ViewAugment("v2", S, 0.0)
    row = {
        "flip": False,
        "jitter": False,
        "gray": False,
        "blur": False,
        "solarize": False,
        "brightness": 1.0,
        "contrast": 1.0,
        "saturation": 1.0,
        "hue": 0.0,
        "sigma": 1.0,
        "order": [0, 1, 2, 3],
    }
    for w, h, o, data in cases:
        for reduce in (2, 4, 8):
            img, scale = load_upright_rgb(open_image(data), reduce)
            x = aug.view_pil(img, {**row, "top": 0, "left": 0, "height": h, "width": w}, scale)
            assert x.size == (S, S) and x.mode == "RGB", (w, h, o, reduce)


def test_unscaled_views_are_unchanged():
    """Scale (1, 1), explicit or default, is the plain box: the pre-scaling arithmetic, bit for bit."""
    aug, plain = ViewAugment("v2", S, 1.0), ViewAugment("v2", S, 0.0)
    img = Image.fromarray(upright_array(301, 203))
    p = {k: v.tolist() for k, v in sample_params(64, aug.params, 203, 301, torch.Generator().manual_seed(3)).items()}
    neutral = {"flip": False, "jitter": False, "gray": False, "blur": False, "solarize": False}
    for i in range(64):
        r = {k: v[i] for k, v in p.items()}
        t, lf, h, w = r["top"] * 1.0, r["left"] * 1.0, r["height"] * 1.0, r["width"] * 1.0
        old = img.resize((S, S), Image.Resampling.BILINEAR, box=(lf, t, lf + w, t + h))
        assert np.array_equal(np.asarray(plain.view_pil(img, {**r, **neutral})), np.asarray(old))
        assert np.array_equal(np.asarray(aug.view_pil(img, r)), np.asarray(aug.view_pil(img, r, (1.0, 1.0))))
