"""SimCLR (Chen et al. 2020): NT-Xent over the global batch; no momentum encoder, no queue."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_ray.core.distributed import all_gather_grad, rank
from moco_ray.core.loss import contrastive_accuracy
from moco_ray.core.method import QueryEncoderMethod, StepOutput


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NT-Xent for this worker's 2N rows against all 2 * N * world embeddings of the global batch.

    z1, z2: [N, D] embeddings of the two views (any norm; L2-normalised here). Both are gathered from every worker
    *with* gradient, so each worker's loss also trains the other workers' embeddings. Row i's positive is its other
    view, its negatives the remaining 2N_global - 2 embeddings; the self-similarity is masked out. Global layout:
    [all z1 in rank order, all z2 in rank order]. fp32 logits whatever the autocast dtype.
    Returns (loss = mean over the 2N local rows, logits [2N, 2N_global], labels).
    """
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        g1, g2 = all_gather_grad(z1), all_gather_grad(z2)
        n, n_all = z1.shape[0], g1.shape[0]
        local = torch.cat([z1, z2], dim=0)
        logits = local @ torch.cat([g1, g2], dim=0).t() / temperature
        idx1 = torch.arange(n, device=logits.device) + n * rank()  # global column of each local z1 row
        own = torch.cat([idx1, idx1 + n_all])  # each local row's own column
        labels = torch.cat([idx1 + n_all, idx1])  # ... and its other view's
        rows = torch.arange(2 * n, device=logits.device)
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[rows, own] = True
        logits = logits.masked_fill(self_mask, float("-inf"))
        return F.cross_entropy(logits, labels), logits, labels


class SimCLR(QueryEncoderMethod):
    """SimCLR: ``encoder_q`` (an Encoder: backbone + projection MLP) embeds both views in one forward pass.

    Both views go through the encoder as one batch, as in the reference implementation (BN statistics over both
    views). ``encoder_q`` is the only sub-module, so it is what DDP wraps; there is no momentum encoder and no queue
    (``momentum`` and ``queue`` are None).
    """

    def __init__(self, encoder_q: nn.Module, temperature: float = 0.5) -> None:
        super().__init__()
        self.encoder_q = encoder_q
        self.momentum, self.queue = None, None
        self.T = temperature

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> StepOutput:
        """NT-Xent of the two views. Returns ``loss`` and ``acc1`` (top-1 of the other view among 2N_global - 1)."""
        z = self.encoder_q(torch.cat([im_q, im_k], dim=0))
        z1, z2 = z.chunk(2, dim=0)
        loss, logits, labels = nt_xent(z1, z2, self.T)
        return {"loss": loss, "acc1": contrastive_accuracy(logits, labels)}
