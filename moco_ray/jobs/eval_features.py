"""Frozen features of a run's encoder over shard splits, through Ray, cached on disk.

The eval split is read with Ray Data (``eval_dataset``: decode + resize + centre crop in ``map_batches`` tasks) and
one Ray task holding the backbone (``num_gpus=1`` when the cluster has a GPU) iterates it with
``iter_torch_batches``, normalised with the encoder's recorded mean/std (``RunEncoder.mean``/``std``). Features
are cached per (run, shards, split, image size, row limit, mean/std) in ``$MOCO_RAY_CACHE``
(default ``~/.cache/moco-ray/features``); the cache holds the raw pooled features.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from moco_ray.core.backbone_io import load_torchvision_backbone_from_state
from moco_ray.core.backbone_spec import BackboneSpec
from moco_ray.data.manifest import Manifest, usable_rows
from moco_ray.data.stream import eval_dataset
from moco_ray.evaluation.features import cache_path, cached_features, extract_features, normalizing
from moco_ray.evaluation.progress import Progress
from moco_ray.jobs.local_ray import init_ray
from moco_ray.tracking.run_log import RunEncoder

CACHE_ENV = "MOCO_RAY_CACHE"
_CACHE_VERSION = "raw-v1"  # part of every cache key: bump when what is cached changes


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moco-ray" / "features")


def _extract_task(state, backbone: BackboneSpec, datasets: dict, batch_size: int, rows: dict, stats=None) -> dict:
    """Ray task body: run the backbone over each eval dataset -> {split: (raw features, labels)}.

    ``rows``: each split's row count, for the progress lines (printed: a Ray task's stdout reaches the driver);
    ``stats``: ``(mean, std)`` the images are normalised with (None: ImageNet's).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = load_torchvision_backbone_from_state(state, backbone).to(device)

    def clean(ds):  # drop rows whose image failed to decode (replaced by a neighbour in the stream)
        for b in ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=2):
            keep = b["corrupt"] == 0
            if bool(keep.any()):
                yield {"img": b["img"][keep], "label": b["label"][keep]}

    cuda = device.type == "cuda"
    prep = normalizing(device, *(stats or ()))

    def bar(split: str):
        return Progress(f"features {split}: rows", rows[split], lambda line: print(line, flush=True)).update

    return {
        split: extract_features(
            net, clean(ds), device, normalize=False, channels_last=cuda, preprocess=prep, on_batch=bar(split)
        )
        for split, ds in datasets.items()
    }


def _use_gpu(use_gpu: bool | None) -> bool:
    import ray  # lazy: Ray only when features are not cached (jobs.evaluate is imported by moco_ray.api)

    gpus = ray.cluster_resources().get("GPU", 0)
    if use_gpu and gpus < 1:
        raise ValueError("use_gpu=True but the Ray cluster has no GPU")
    return gpus >= 1 if use_gpu is None else bool(use_gpu)


def features(
    run_id: str,
    encoder: RunEncoder,
    shards: str,
    splits: list[str],
    image_size: int,
    *,
    manifest: Manifest,
    limit: int = 0,
    use_gpu: bool | None = None,
    batch_size: int = 256,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Raw backbone features + labels of each split, from the cache or extracted in one Ray task.

    ``manifest``: the shards' manifest the caller validated (row counts for the progress lines)."""
    stats = (tuple(encoder.mean), tuple(encoder.std))
    keys = {s: f"{_CACHE_VERSION}|{run_id}|{shards}|{s}|{image_size}|{limit}|{stats}" for s in splits}
    missing = [s for s in splits if not cache_path(keys[s], cache_dir()).is_file()]
    computed: dict[str, Any] = {}
    if missing:
        import ray  # lazy: Ray only when features are not cached (see _use_gpu)

        init_ray()
        gpu = _use_gpu(use_gpu)
        datasets = {s: eval_dataset(shards, s, image_size, limit) for s in missing}
        rows = {s: usable_rows(manifest, s, limit) for s in missing}
        task = ray.remote(_extract_task).options(num_cpus=1, num_gpus=1 if gpu else 0)
        state_ref = ray.put(encoder.state)
        computed = ray.get(task.remote(state_ref, encoder.backbone, datasets, batch_size, rows, stats))
    return {s: cached_features(keys[s], cache_dir(), lambda s=s: computed[s]) for s in splits}
