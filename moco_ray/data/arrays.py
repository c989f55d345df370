"""An ImageFolder split decoded into memory: for Ray-free experiments, the method benchmark and the long tests.

The training path streams Parquet shards through Ray Data; this is the small-data shortcut that needs neither
ingest nor Ray, so the core's learning can be checked (and compared across methods) in one process.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moco_ray.data.decode import to_rgb
from moco_ray.data.sources import ImageFolderSource


def load_imagefolder_arrays(
    root: str | Path, split: str, size: int, limit: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``ceil(limit / classes)`` images of every class (all when ``limit`` is 0), resized to ``size``.

    Returns ``(images uint8 [N,3,size,size], labels int64 [N], class names)``; class indices follow the sorted
    class-directory names, as in torchvision's ImageFolder, and files are taken in sorted order, so the same
    call gives the same images everywhere. A split without images is an error, not an empty tensor.
    """
    src = ImageFolderSource(root, split)
    if split not in src.splits():
        raise ValueError(f"{root}: no split {split!r} (splits: {', '.join(src.splits())})")
    classes = src.classes
    per = math.ceil(limit / len(classes)) if (limit and classes) else None
    taken = [0] * len(classes)
    xs, ys = [], []
    for it in src.items(split):  # sorted by class, then file name
        if per is not None and taken[it.label] >= per:
            continue
        taken[it.label] += 1
        with Image.open(it.file) as img:
            xs.append(np.asarray(to_rgb(img).resize((size, size), Image.BILINEAR)))
        ys.append(it.label)
    if not xs:
        raise ValueError(f"{root}: split {split!r} holds no images")
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(ys, dtype=torch.long), classes
