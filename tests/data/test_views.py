"""The stream's map_batches body (``views.make_pairs``) draws its crops with the run's ``aug.crop_min``."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from moco_ray.data.views import make_pairs


def _batch(n: int = 8, size: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    return {
        "image": np.array(images, dtype=object),
        "label": np.zeros(n, dtype=np.int64),
        "id": np.array([f"r{i}" for i in range(n)], dtype=object),
    }


def test_crop_min_reaches_the_views():
    """The same seed, epoch and ids draw the same views; only ``crop_min`` differs, so the views differ, and
    ``crop_min`` 0 is the preset's own bound (the v3 preset's 0.2). Mutation (failed here): make_pairs not passing
    crop_min on to its augmenter (the views with 0.08 equal the preset's)."""
    batch = _batch()
    kw = {"preset": "v3", "image_size": 32, "strength": 1.0, "device": "cpu", "seed": 7, "epoch_offset": 0}
    preset = make_pairs(batch, **kw)
    same = make_pairs(batch, **kw, crop_min=0.2)
    wider = make_pairs(batch, **kw, crop_min=0.08)
    assert np.array_equal(preset["q"], same["q"]) and np.array_equal(preset["k"], same["k"])
    assert not np.array_equal(preset["q"], wider["q"])
