"""The kNN monitor inside training: rank 0 scores the query encoder on the labelled splits every few epochs.

``eval.knn_features``: ``backbone`` scores the pooled backbone features; ``query`` the query encoder's
L2-normalised output with its head (the official CIFAR-10 demo's monitor: ``F.normalize(encoder_q(x))``). The
views are normalised with ``data.mean`` / ``data.std``, as in training.
"""

from __future__ import annotations

import logging

import torch

from moco_ray.config import Config
from moco_ray.core.backbone_io import backbone_of
from moco_ray.core.normalize import Normalizer
from moco_ray.data.eval_images import eval_arrays
from moco_ray.data.manifest import read_manifest, usable_rows
from moco_ray.evaluation.features import extract_features
from moco_ray.evaluation.knn import knn_accuracy

_log = logging.getLogger(__name__)
LARGE_DECODE_BYTES = 4 * 2**30  # above this, rank 0's serial decode before step 1 is worth a warning


class KnnMonitor:
    """Memory bank and queries decoded once per run; :meth:`score` extracts features and runs weighted kNN."""

    def __init__(self, cfg: Config, bank: tuple[torch.Tensor, torch.Tensor], query: tuple[torch.Tensor, torch.Tensor]):
        self.cfg, self.bank, self.query = cfg, bank, query

    @classmethod
    def load(cls, cfg: Config) -> KnnMonitor:
        d, e = cfg.data, cfg.eval
        warn_if_large(cfg)
        bank = eval_arrays(d.shards, d.knn_train_split, cfg.aug.image_size, e.knn_max_bank)[:2]
        query = eval_arrays(d.shards, d.knn_test_split, cfg.aug.image_size, e.knn_max_queries)[:2]
        return cls(cfg, bank, query)

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.cfg.eval.knn_every == 0 or epoch == self.cfg.train.epochs - 1

    def score(self, model: torch.nn.Module, device: torch.device, autocast: torch.dtype | None) -> float:
        net = scored_module(model, self.cfg.eval.knn_features)
        norm = Normalizer(self.cfg.data.mean, self.cfg.data.std, device=device)

        def prep(x: torch.Tensor, _device: torch.device) -> torch.Tensor:
            return norm(x)

        def batches(imgs: torch.Tensor, labels: torch.Tensor):
            for i in range(0, len(imgs), 256):
                yield imgs[i : i + 256], labels[i : i + 256]

        e = self.cfg.eval
        kw = {"autocast_dtype": autocast, "out_device": device, "preprocess": prep}
        fb, lb = extract_features(net, batches(*self.bank), device, **kw)
        fq, lq = extract_features(net, batches(*self.query), device, **kw)
        return knn_accuracy(fb, lb, fq, lq, k=e.knn_k, t=e.knn_t, device=device)


class _Projector(torch.nn.Module):
    """A MoCo v3 query encoder without its predictor (backbone + projector, as the momentum encoder)."""

    def __init__(self, enc: torch.nn.Module) -> None:
        super().__init__()
        self.enc = enc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc.project(x)


def scored_module(model: torch.nn.Module, features: str) -> torch.nn.Module:
    """What the monitor runs: the query backbone, or the whole query encoder (no DDP / compile wrapper; MoCo v3's
    without its predictor)."""
    if features == "backbone":
        return backbone_of(model)
    enc = getattr(model, "query_module", None) or model.encoder_q
    enc = getattr(enc, "module", enc)
    enc = getattr(enc, "_orig_mod", enc)
    return _Projector(enc) if hasattr(enc, "project") else enc


def warn_if_large(cfg: Config) -> int:
    """Warn (and return the bytes) when the monitor would decode more than ``LARGE_DECODE_BYTES`` of uint8.

    Rank 0 decodes both splits serially before step 1 while the other ranks wait in their first collective (an
    NCCL timeout, or host memory, on ImageNet-size splits); ``eval.knn_max_bank`` / ``knn_max_queries`` cap it.
    """
    d, e = cfg.data, cfg.eval
    manifest = read_manifest(d.shards)
    caps = ((d.knn_train_split, e.knn_max_bank), (d.knn_test_split, e.knn_max_queries))
    rows = sum(usable_rows(manifest, split, cap) for split, cap in caps)  # what eval_arrays decodes
    nbytes = rows * 3 * cfg.aug.image_size**2
    if nbytes > LARGE_DECODE_BYTES:
        _log.warning(
            "kNN monitor: rank 0 decodes %d images (%.1f GiB) before the first step while the other ranks wait; "
            "set eval.knn_max_bank / eval.knn_max_queries (or eval.knn_every=0) for a large dataset",
            rows,
            nbytes / 2**30,
        )
    return nbytes
