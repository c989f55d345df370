"""scikit-learn's bundled 8x8 handwritten digits as RGB images: a small real dataset that needs no network.

1,797 real scans (UCI ML hand-written digits), shipped inside scikit-learn. They are upscaled to `size` px and
written as PNG files in ImageFolder layout, so the quickstart and a fresh clone's tests ingest them exactly as a
user ingests any image tree.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = [str(i) for i in range(10)]


def digits_arrays(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size, 3) uint8 images and (N,) int labels, in scikit-learn's order."""
    from sklearn.datasets import load_digits  # lazy: about a second to import; only the digits source needs it

    d = load_digits()
    gray = (d.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)  # 0..16 ink levels -> 0..255
    imgs = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in gray])
    # White ink on a dark background reads as a natural image better inverted: dark ink on white.
    rgb = np.repeat((255 - imgs)[..., None], 3, axis=-1)
    return rgb, d.target.astype(np.int64)


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_digits_imagefolder(root: str | Path, size: int = 32, test_fraction: float = 0.2) -> Path:
    """Write train/<digit>/NNNN.png and test/<digit>/NNNN.png under root (idempotent)."""
    root = Path(root)
    imgs, labels = digits_arrays(size)
    train_idx, test_idx = split_indices(len(labels), test_fraction)
    for split, idx in (("train", train_idx), ("test", test_idx)):
        for i in idx:
            out = root / split / CLASSES[labels[i]] / f"{i:04d}.png"
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(png_bytes(imgs[i]))
    return root
