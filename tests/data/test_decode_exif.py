"""EXIF orientation (#18): a photo stored sideways with an orientation tag decodes upright on every path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from moco_ray.data.augment import ViewAugment, eval_view
from moco_ray.data.decode import decode_batch, decode_image, load_upright_rgb, open_image, upright_size
from moco_ray.data.views import _train_pairs

H, W = 48, 80  # upright: landscape


def upright() -> np.ndarray:
    """A non-square, asymmetric image: smooth gradients plus a red block in the top-left corner."""
    y, x = np.mgrid[0:H, 0:W]
    img = np.stack([x * 255 // W, y * 255 // H, (x + y) * 255 // (W + H)], axis=-1).astype(np.uint8)
    img[: H // 3, : W // 4] = (230, 20, 30)
    return img


def jpeg(arr: np.ndarray, orientation: int | None) -> bytes:
    im = Image.fromarray(arr)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def stored_sideways(orientation: int) -> bytes:
    """The upright image stored as a camera would with this tag: orientation 6 means 'rotate 90 CW to view', so
    the stored pixels are the upright ones turned 90 degrees counter-clockwise (8: clockwise)."""
    arr = upright()
    stored = np.rot90(arr, k=1 if orientation == 6 else -1)
    return jpeg(np.ascontiguousarray(stored), orientation)


def close(a: torch.Tensor, b: np.ndarray) -> float:
    return float((a.float() - torch.from_numpy(b).permute(2, 0, 1).float()).abs().mean())


@pytest.mark.parametrize("orientation", [6, 8])
def test_decode_image_applies_exif_orientation(orientation):
    data = stored_sideways(orientation)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (H, W)  # stored portrait, tagged
    img = decode_image(data)
    assert img.shape == (3, H, W)
    ref = upright()
    assert close(img, ref) < 4.0  # JPEG noise only
    assert close(img, np.ascontiguousarray(ref[::-1, ::-1])) > 30.0  # upside down would be far off
    assert img[0, 2, 2] > 180 and img[1, 2, 2] < 80  # the red block is top-left
    imgs, corrupt = decode_batch([data])
    assert torch.equal(imgs[0], img) and corrupt.tolist() == [0]


@pytest.mark.parametrize("orientation", [6, 8])
def test_lazy_pil_decode_applies_exif_orientation(orientation):
    data = stored_sideways(orientation)
    im = open_image(data)
    assert upright_size(im) == (H, W)
    rgb, scale = load_upright_rgb(im)
    assert rgb.size == (W, H) and rgb.mode == "RGB" and scale == (1.0, 1.0)
    t = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
    assert close(t, upright()) < 4.0
    assert torch.equal(t, decode_image(data))  # both decoders agree pixel for pixel here


def test_untagged_and_upright_tagged_images_are_unchanged():
    ref = upright()
    for data in (jpeg(ref, None), jpeg(ref, 1)):
        img = decode_image(data)
        assert img.shape == (3, H, W) and close(img, ref) < 4.0
        assert upright_size(open_image(data)) == (H, W)


def test_train_and_eval_views_see_the_upright_image():
    """The train pairs (lazy PIL path) and the eval view of a sideways-stored photo equal those of the upright."""
    sideways, straight = stored_sideways(6), jpeg(upright(), None)
    aug = ViewAugment("v1", 32, 0.0)  # no distortion: the central square, resized
    q1, k1, c1 = _train_pairs(aug, [sideways], [torch.Generator().manual_seed(0)])
    q2, _, _ = _train_pairs(aug, [straight], [torch.Generator().manual_seed(0)])
    assert q1.shape == (1, 3, 32, 32) and c1.tolist() == [0]
    assert float(np.abs(q1.astype(float) - q2).mean()) < 4.0
    ev1, ev2 = eval_view(decode_image(sideways), 32), eval_view(decode_image(straight), 32)
    assert float((ev1.float() - ev2.float()).abs().mean()) < 4.0
    rot = np.rot90(q2[0].transpose(1, 2, 0), k=1)  # had the tag been ignored the view would be rotated
    assert float(np.abs(q1[0].transpose(1, 2, 0).astype(float) - rot).mean()) > 10.0
