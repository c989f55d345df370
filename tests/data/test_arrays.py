"""load_imagefolder_arrays: class-balanced, deterministic, ImageFolder's class indices; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from moco_ray.data.arrays import load_imagefolder_arrays


@pytest.fixture
def tree(tmp_path):
    rng = np.random.default_rng(0)
    for split, counts in (("train", {"cat": 5, "dog": 3}), ("test", {"cat": 2, "dog": 2})):
        for cls, n in counts.items():
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return tmp_path


def test_class_balanced_limit_and_labels(tree):
    x, y, classes = load_imagefolder_arrays(tree, "train", 8, limit=4)
    assert classes == ["cat", "dog"]
    assert x.dtype.is_floating_point is False and tuple(x.shape) == (4, 3, 8, 8)
    assert y.tolist() == [0, 0, 1, 1]  # ceil(4 / 2) per class, classes in sorted order
    # all images when limit is 0; a class with fewer images than its share gives what it has
    x_all, y_all, _ = load_imagefolder_arrays(tree, "train", 8)
    assert y_all.tolist() == [0] * 5 + [1] * 3
    assert load_imagefolder_arrays(tree, "train", 8, limit=10)[1].tolist() == [0] * 5 + [1] * 3
    # the same call gives the same images (sorted files), and the first image matches a direct decode
    ref = np.asarray(Image.open(tree / "train" / "cat" / "0.png").convert("RGB").resize((8, 8), Image.BILINEAR))
    assert np.array_equal(x_all[0].permute(1, 2, 0).numpy(), ref)


def test_missing_split_is_a_clear_error(tree):
    with pytest.raises(ValueError, match="no split 'val'"):
        load_imagefolder_arrays(tree, "val", 8)
