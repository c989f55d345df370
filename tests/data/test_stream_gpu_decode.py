"""aug.device=gpu ships encoded bytes; the worker decodes them on its device (CPU here: the same code path)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from moco_ray.data.augment import resize_for_gpu
from moco_ray.data.decode import decode_batch, decode_batch_on, decode_image
from moco_ray.data.gpu_augment import GpuViewAugment, sources_from_bytes
from moco_ray.data.stream import _pair_collate
from moco_ray.data.views import make_pairs


def _photo(seed: int, w: int, h: int) -> Image.Image:
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


def _encode(im: Image.Image, fmt: str = "JPEG", exif: Image.Exif | None = None) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}), **({"exif": exif} if exif else {}))
    return buf.getvalue()


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: 90 degrees clockwise to view
    return _encode(_photo(9, 60, 40), exif=exif)


@pytest.fixture(scope="module")
def mixed() -> list[bytes]:
    """JPEGs of several sizes, a grey JPEG, a PNG, an EXIF-rotated JPEG."""
    return [
        _encode(_photo(0, 48, 40)),
        _encode(_photo(1, 32, 32)),
        _encode(_photo(2, 70, 50).convert("L")),
        _encode(_photo(3, 40, 64), "PNG"),
        _rotated_jpeg(),
        _encode(_photo(4, 33, 90)),
    ]


def test_decode_on_cpu_equals_the_cpu_decoder_for_every_format(mixed):
    ours, corrupt = decode_batch_on(mixed, "cpu")
    ref, ref_corrupt = decode_batch(mixed)
    assert corrupt.tolist() == ref_corrupt.tolist() == [0] * len(mixed)
    assert all(a.dtype == torch.uint8 and torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
    assert tuple(ours[4].shape) == (3, 60, 40)  # EXIF orientation 6 applied: upright is 40 wide, 60 high


def test_corrupt_rows_are_counted_and_replaced_not_dropped(mixed):
    truncated = mixed[0][: len(mixed[0]) // 3]  # a JPEG header with most of the scan cut away: PIL and torchvision
    rows = [b"\xff\xd8\xffnot a jpeg at all", mixed[1], b"", None, mixed[3], b"garbage"]
    imgs, corrupt = decode_batch_on(rows, "cpu")
    assert len(imgs) == len(rows)
    assert corrupt.tolist() == [1, 0, 1, 1, 0, 1]
    assert torch.equal(imgs[0], imgs[1]) and torch.equal(imgs[5], imgs[4])  # nearest valid row
    assert torch.equal(imgs[2], imgs[1]) and torch.equal(imgs[3], imgs[4])  # ties go to the earlier row
    all_bad, flags = decode_batch_on([b"x", b"y"], "cpu")
    assert flags.tolist() == [1, 1] and all(t.shape == (3, 32, 32) and int(t.float().mean()) == 128 for t in all_bad)
    _, flags = decode_batch_on([truncated], "cpu")
    assert flags.tolist() == decode_batch([truncated])[1].tolist()  # the same verdict as the CPU path


@pytest.mark.parametrize("size", [32, 64])
def test_sources_and_views_equal_the_previous_gpu_path(mixed, size):
    """Same source batch as before (decode -> resize_for_gpu -> stack on the CPU side), so with the same generator
    the views, and hence their parameter distributions, are exactly those of the previous gpu path."""
    src, corrupt = sources_from_bytes(mixed, size, "cpu")
    before = torch.stack([resize_for_gpu(decode_image(b), size) for b in mixed])
    assert src.dtype == torch.uint8 and src.shape == before.shape and torch.equal(src, before)
    assert corrupt.tolist() == [0] * len(mixed)
    aug = GpuViewAugment("v2", size)
    q, k = aug.pair(src, torch.Generator().manual_seed(3))
    q0, k0 = aug.pair(before, torch.Generator().manual_seed(3))
    assert q.shape == k.shape == (len(mixed), 3, size, size) and q.dtype == torch.uint8
    assert torch.equal(q, q0) and torch.equal(k, k0)


def test_gpu_stream_ships_bytes_and_the_collate_keeps_them_on_the_host(mixed):
    batch = {
        "image": np.array(mixed, dtype=object),
        "label": np.arange(len(mixed)),
        "id": np.array([f"r{i}" for i in range(len(mixed))], dtype=object),
    }
    kw = dict(preset="v2", image_size=32, strength=1.0, seed=0, epoch_offset=0)
    out = make_pairs(batch, device="gpu", **kw, drop_ids=frozenset({"r2"}))
    assert set(out) == {"jpeg", "label"} and list(out["jpeg"]) == mixed[:2] + mixed[3:]
    collate = _pair_collate()
    got = collate(pa.table({"jpeg": pa.array(list(out["jpeg"]), pa.binary()), "label": out["label"]}))
    assert got["jpeg"] == list(out["jpeg"]) and torch.equal(got["label"], torch.tensor([0, 1, 3, 4, 5]))
    views = make_pairs({k: v[:2] for k, v in batch.items()}, device="cpu", **kw)
    table = pa.table({"q": list(views["q"].reshape(2, -1)), "label": views["label"]})
    assert isinstance(collate(table)["label"], torch.Tensor)  # view batches: Ray's default collate
