"""MoCo v1/v2: query encoder, momentum key encoder, queue of negatives, InfoNCE."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_ray.core import defaults
from moco_ray.core.distributed import all_gather_nograd, world_size
from moco_ray.core.loss import contrastive_accuracy, info_nce
from moco_ray.core.method import QueryEncoderMethod, StepOutput
from moco_ray.core.momentum import momentum_update
from moco_ray.core.queue import KeyQueue
from moco_ray.core.shuffle_bn import batch_shuffle_ddp, batch_unshuffle_ddp

BN_MODES = ("ddp", "split", "none")


class MoCo(QueryEncoderMethod):
    """MoCo with a queue (He et al. 2019; v2: Chen et al. 2020); a :class:`~moco_ray.core.method.ContrastiveMethod`.

    ``encoder_q`` is the only part that takes gradients (what :meth:`wrap_trainable` wraps in DDP).
    ``encoder_k`` starts as an exact copy and follows the EMA (coefficient ``momentum``) in :meth:`momentum_update`,
    which ``forward`` runs first, as the reference code does (so after step t the key encoder has seen t updates).

    Value ranges are checked once, by the config layer (``moco_ray.config.validate``).
    bn_mode: ``ddp`` shuffles the key batch across workers (shuffle-BN); ``split`` shuffles it within the batch,
    for encoders built with SplitBatchNorm (one process); ``none`` does neither.
    """

    def __init__(
        self,
        encoder_q: nn.Module,
        dim: int,
        queue_size: int = defaults.QUEUE_SIZE,
        momentum: float = defaults.MOMENTUM,
        temperature: float = defaults.TEMPERATURE,
        symmetric: bool = False,
        bn_mode: str = "none",
    ) -> None:
        super().__init__()
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode: {bn_mode!r} is not one of {', '.join(BN_MODES)}")
        self.encoder_q = encoder_q
        self.encoder_k = copy.deepcopy(encoder_q)
        self.encoder_k.requires_grad_(False)
        self.queue: KeyQueue = KeyQueue(queue_size, dim)
        self.momentum: float = momentum
        self.T, self.symmetric, self.bn_mode = temperature, symmetric, bn_mode

    @torch.no_grad()
    def momentum_update(self) -> None:
        momentum_update(self.encoder_k, self.query_module, self.momentum)

    @torch.no_grad()
    def encode_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """L2-normalised keys in the input's order, with the BN de-leaking that bn_mode asks for."""
        if self.bn_mode == "ddp" and world_size() > 1:
            x, unshuffle = batch_shuffle_ddp(im_k)
            return batch_unshuffle_ddp(F.normalize(self.encoder_k(x), dim=1), unshuffle)
        if self.bn_mode == "split":
            perm = torch.randperm(im_k.shape[0], device=im_k.device)
            k = F.normalize(self.encoder_k(im_k[perm]), dim=1)
            return k[torch.argsort(perm)]
        return F.normalize(self.encoder_k(im_k), dim=1)

    def _contrast(self, im_q: torch.Tensor, im_k: torch.Tensor):
        q = F.normalize(self.encoder_q(im_q), dim=1)
        k = self.encode_keys(im_k)
        loss, logits = info_nce(q, k, self.queue.keys.clone().detach(), self.T)
        return loss, logits, k

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> StepOutput:
        """One MoCo step's forward: EMA update, loss, enqueue. Returns ``loss`` and ``acc1``."""
        self.momentum_update()
        if self.symmetric:  # each view is the query once; the loss is the sum of both directions
            loss12, logits12, k2 = self._contrast(im_q, im_k)
            loss21, logits21, k1 = self._contrast(im_k, im_q)
            loss = loss12 + loss21
            acc1 = (contrastive_accuracy(logits12) + contrastive_accuracy(logits21)) / 2
            keys = torch.cat([k1, k2], dim=0)
        else:
            loss, logits, keys = self._contrast(im_q, im_k)
            acc1 = contrastive_accuracy(logits)
        # Every worker enqueues the keys of the whole global batch, so all queues stay identical.
        self.queue.enqueue(all_gather_nograd(keys))
        return {"loss": loss, "acc1": acc1}
