"""Images of more than 8 bits per sample (#33): float TIFFs (mode F), 16-bit PNG/TIFF (I;16) and 32-bit integer
TIFFs (I) decode to sensible 0..255 RGB on every path (`decode_image`, the CPU views' `load_upright_rgb`, and the
ingest's re-encode), by the rule in `moco_ray.data.decode`. Real files written by Pillow, real ingest and Parquet.

Mutation checked by hand: `to_rgb` as Pillow's plain ``im.convert("RGB")`` again: the 0..1 float TIFF decodes all
black, the 16-bit ones nearly all white, and 7 of the 10 tests fail (the three that pass are images already in
0..255, where clipping is the rule too: they pin that the rule leaves such images as they are).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from moco_ray.data.decode import decode_image, load_upright_rgb, open_image, verify_image
from moco_ray.data.ingest import ingest
from moco_ray.data.manifest import read_manifest

H, W = 24, 40
RAMP = np.linspace(0.0, 1.0, H * W).reshape(H, W)  # 0 top-left .. 1 bottom-right
EXPECTED = np.round(RAMP * 255.0)  # the 8-bit image every case below stands for


def encode(arr: np.ndarray, fmt: str = "TIFF") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


CASES = {
    # name: (encoded bytes, Pillow's mode, the 0..255 image the rule gives)
    "float_0_1": (encode(RAMP.astype(np.float32)), "F", EXPECTED),
    "float_0_255": (encode((RAMP * 255.0).astype(np.float32)), "F", EXPECTED),  # stretched: 0..255 again
    "float_minus1_3": (encode((RAMP * 4.0 - 1.0).astype(np.float32)), "F", EXPECTED),  # stretched by its range
    "uint16_tiff": (encode(np.round(RAMP * 65535).astype(np.uint16)), "I;16", EXPECTED),
    "uint16_png": (encode(np.round(RAMP * 65535).astype(np.uint16), "PNG"), "I;16", EXPECTED),
    "int32_tiff": (encode(np.round(RAMP * 1e6).astype(np.int32)), "I", EXPECTED),  # stretched by its range
    "int32_8bit": (encode(np.round(RAMP * 255).astype(np.int32)), "I", EXPECTED),  # 0..255: as it is
    "int32_dark": (encode(np.round(RAMP * 100).astype(np.int32)), "I", np.round(RAMP * 100)),  # dark stays dark
}


def grey(img: torch.Tensor | np.ndarray) -> np.ndarray:
    """[3, H, W] tensor or [H, W, 3] array of a grey image -> [H, W] float, checking the three bands agree."""
    a = img.permute(1, 2, 0).numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    assert a.dtype == np.uint8 and a.shape == (H, W, 3)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0].astype(np.float64)


@pytest.mark.parametrize("name", sorted(CASES))
def test_wide_image_decodes_to_its_0_255_ramp_on_every_path(name):
    data, mode, expected = CASES[name]
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == mode
    verify_image(data)  # the ingest's validation accepts it
    for img in (decode_image(data), load_upright_rgb(open_image(data))[0]):
        assert np.abs(grey(img) - expected).max() <= 1.0  # rounding only


def test_float_image_with_nan_and_inf():
    """NaN is 0; the range is that of the finite values (inf clips to 255, -inf to 0)."""
    a = (RAMP * 2.0).astype(np.float32)  # 0..2, past 1: stretched by its range
    a[0, 0], a[0, 1], a[0, 2] = np.nan, np.inf, -np.inf
    g = grey(decode_image(encode(a)))
    assert (g[0, 0], g[0, 1], g[0, 2]) == (0.0, 255.0, 0.0)
    assert np.abs(g[1:] - np.round(RAMP[1:] * 255.0)).max() <= 1.0


def test_ingest_reencode_keeps_a_float_tiff_visible(tmp_path):
    """The ingest's re-encode (``reencode="png"``) goes through the same rule: the stored PNG is the ramp."""
    d = tmp_path / "src" / "train" / "c00"
    d.mkdir(parents=True)
    for name in ("float_0_1", "uint16_tiff"):
        (d / f"{name}.tif").write_bytes(CASES[name][0])
    out = tmp_path / "out"
    ingest(tmp_path / "src", out, reencode="png", progress=False)
    rows = [r for s in read_manifest(out).shards for r in pq.read_table(out / s.path).to_pylist()]
    assert len(rows) == 2
    for r in rows:
        with Image.open(io.BytesIO(r["image"])) as im:
            assert im.format == "PNG"
            assert np.abs(grey(im.convert("RGB")) - EXPECTED).max() <= 1.0
