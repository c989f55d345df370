"""The kNN monitor inside training: rank 0 scores the query backbone on the labelled splits every few epochs."""

from __future__ import annotations

import torch

from moco_ray.config import Config
from moco_ray.core.backbone_io import backbone_of
from moco_ray.evaluation.features import extract_features
from moco_ray.evaluation.knn import knn_accuracy


class KnnMonitor:
    """Memory bank and queries decoded once per run; :meth:`score` extracts features and runs weighted kNN."""

    def __init__(self, cfg: Config, bank: tuple[torch.Tensor, torch.Tensor], query: tuple[torch.Tensor, torch.Tensor]):
        self.cfg, self.bank, self.query = cfg, bank, query

    @classmethod
    def load(cls, cfg: Config) -> KnnMonitor:
        from moco_ray.data.stream import eval_arrays

        d, e = cfg.data, cfg.eval
        bank = eval_arrays(d.shards, d.knn_train_split, cfg.aug.image_size, e.knn_max_bank)[:2]
        query = eval_arrays(d.shards, d.knn_test_split, cfg.aug.image_size, e.knn_max_queries)[:2]
        return cls(cfg, bank, query)

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.cfg.eval.knn_every == 0 or epoch == self.cfg.train.epochs - 1

    def score(self, model: torch.nn.Module, device: torch.device, autocast: torch.dtype | None) -> float:
        backbone = backbone_of(model)

        def batches(imgs: torch.Tensor, labels: torch.Tensor):
            for i in range(0, len(imgs), 256):
                yield imgs[i : i + 256], labels[i : i + 256]

        e = self.cfg.eval
        fb, lb = extract_features(backbone, batches(*self.bank), device, autocast_dtype=autocast, out_device=device)
        fq, lq = extract_features(backbone, batches(*self.query), device, autocast_dtype=autocast, out_device=device)
        return knn_accuracy(fb, lb, fq, lq, k=e.knn_k, t=e.knn_t, device=device)
