"""Frozen-backbone feature extraction, and an on-disk cache for the features.

The data layer ships uint8 images; they are moved to the device as uint8 (4x less traffic than float) and
normalised there. Features come back float32 and (by default) L2-normalised, ready for kNN or a linear probe.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_ray.core.defaults import IMAGENET_MEAN, IMAGENET_STD
from moco_ray.core.normalize import Normalizer

Preprocess = Callable[[torch.Tensor, torch.device], torch.Tensor]


def normalizing(
    device: torch.device,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Preprocess:
    """uint8 [B,3,H,W] -> normalised float32 on ``device`` (the training normaliser with the run's ``mean`` /
    ``std``, ``data.mean`` / ``data.std``); float input is taken as already preprocessed."""
    norm = Normalizer(mean, std, device=device)

    def prep(x: torch.Tensor, _device: torch.device) -> torch.Tensor:
        if x.is_floating_point():
            return x.to(device, non_blocking=True)
        if x.dtype != torch.uint8:
            raise ValueError(f"extract_features: images must be uint8 or floating point, got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"extract_features: images must be [B,C,H,W], got {list(x.shape)}")
        return norm(x)

    return prep


def _unpack(batch: Any) -> tuple[torch.Tensor, Any]:
    if isinstance(batch, Mapping):
        return batch["img"], batch["label"]
    images, labels = batch
    return images, labels


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    batches: Iterable[Any],
    device: torch.device | str,
    normalize: bool = True,
    channels_last: bool = False,
    autocast_dtype: torch.dtype | None = None,
    preprocess: Preprocess | None = None,
    out_device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``backbone`` in eval mode over ``(images, labels)`` batches (or ``{"img", "label"}`` dicts).

    Returns ``(features [N,D] float32, labels [N] int64)`` on ``out_device``; L2-normalised rows when
    ``normalize``. BatchNorm uses its running statistics, so a row's feature does not depend on its batch. The
    backbone's train/eval mode is restored afterwards. No batches -> ``[0, 0]`` features and ``[0]`` labels.
    ``on_batch(rows)``: called after each batch with its row count (progress lines; reads nothing on the device).
    """
    device = torch.device(device)
    preprocess = preprocess or normalizing(device)
    was_training = backbone.training
    backbone.eval()
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for batch in batches:
            images, y = _unpack(batch)
            x = preprocess(torch.as_tensor(images), device)
            if x.dim() != 4:
                raise ValueError(f"extract_features: images must be [B,C,H,W], got {list(x.shape)}")
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if autocast_dtype is not None:
                with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                    f = backbone(x)
            else:
                f = backbone(x)
            f = f.float().flatten(1)
            if normalize:
                f = F.normalize(f, dim=1)
            y = torch.as_tensor(y).reshape(-1).long()
            if y.shape[0] != f.shape[0]:
                raise ValueError(f"extract_features: {f.shape[0]} images but {y.shape[0]} labels in a batch")
            feats.append(f.to(out_device))
            labels.append(y.to(out_device))
            if on_batch is not None:
                on_batch(int(y.shape[0]))
    finally:
        backbone.train(was_training)
    if not feats:
        return torch.empty(0, 0, device=out_device), torch.empty(0, dtype=torch.long, device=out_device)
    return torch.cat(feats), torch.cat(labels)


def cache_path(key: str, cache_dir: str | os.PathLike) -> Path:
    """File for ``key``: a readable slug plus a hash of the exact key (distinct keys never share a file)."""
    if not key:
        raise ValueError("cached_features: key must be a non-empty string")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:80]
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{slug}-{digest}.pt"


def cached_features(
    key: str,
    cache_dir: str | os.PathLike,
    compute_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute_fn()``'s ``(features, labels)``, computed once per ``key`` and then read from ``cache_dir``.

    The key must identify everything the features depend on (weights, split, image size...): the cache does not
    look inside. Written atomically (temp file + rename), read with ``torch.load(weights_only=True)``.
    """
    path = cache_path(key, cache_dir)
    if path.is_file():
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("key") != key:
            raise ValueError(f"{path}: not a feature cache for key {key!r}; delete it to recompute")
        return obj["features"], obj["labels"]
    feats, labels = compute_fn()
    feats, labels = feats.detach().cpu(), torch.as_tensor(labels).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save({"key": key, "features": feats, "labels": labels}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return feats, labels
