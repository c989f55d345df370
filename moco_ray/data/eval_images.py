"""A labelled split decoded in this process, without Ray Data: the in-process evaluation loaders.

For evaluations that run where a second Ray Data execution would compete with the training stream (the kNN
monitor inside a Train worker) or that re-crop the original images every epoch (the official linear probe).
Corrupt rows are counted: left out here, or replaced and flagged as in the stream (`make_eval`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from moco_ray.data.decode import CorruptImageError, decode_image
from moco_ray.data.manifest import read_manifest, resolve_fs, split_files
from moco_ray.data.schema import READ_COLUMNS
from moco_ray.data.views import make_eval


def _split_tables(shards: str, split: str, limit: int) -> Iterator[tuple[pa.Table, frozenset[str]]]:
    """The split's shard tables in manifest order (image, label, id), with the ids ``limit`` leaves out."""
    manifest = read_manifest(shards)
    files, drop_ids = split_files(shards, manifest, split, limit)
    fs, _ = resolve_fs(shards)
    for f in files:
        yield pq.read_table(f, columns=READ_COLUMNS, filesystem=fs), drop_ids


def original_images(shards: str, split: str, limit: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """The labelled split decoded in this process at the images' own sizes (uint8 [3, H, W] each, EXIF-upright),
    for protocols that crop afresh every epoch (the official linear probe). Corrupt rows are left out and counted.
    """
    imgs: list[torch.Tensor] = []
    labels: list[int] = []
    corrupt = 0
    for table, drop_ids in _split_tables(shards, split, limit):
        for data, label, row_id in zip(*(table[c].to_pylist() for c in ("image", "label", "id"))):
            if row_id in drop_ids:
                continue
            try:
                imgs.append(decode_image(data))
                labels.append(int(label))
            except CorruptImageError:
                corrupt += 1
    return imgs, torch.tensor(labels, dtype=torch.long), corrupt


def eval_arrays(shards: str, split: str, image_size: int, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The labelled eval split decoded in this process: (uint8 [N,3,S,S], int64 labels [N], corrupt count).

    The kNN monitor inside the training loop uses this instead of a Ray Dataset: it is read once per run and kept
    in memory, and it takes no Ray Data resources away from the training stream it runs beside (a second
    execution inside a Train worker can wait on the same CPU budget as the training stream).
    """
    imgs, labels, corrupt = [], [], 0
    for table, drop_ids in _split_tables(shards, split, limit):
        batch = {c: np.asarray(table[c].to_pylist(), dtype=object) for c in READ_COLUMNS}
        out = make_eval(batch, image_size=image_size, drop_ids=drop_ids)
        imgs.append(torch.from_numpy(out["img"]))
        labels.append(torch.from_numpy(out["label"]))
        corrupt += int(out["corrupt"].sum())
    if not imgs:
        return torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8), torch.zeros(0, dtype=torch.long), 0
    return torch.cat(imgs), torch.cat(labels), corrupt
