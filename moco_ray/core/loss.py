"""InfoNCE with a queue of negatives, and the contrastive top-1 metric."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's InfoNCE: logits = [q.k+, q.queue^T] / T, target 0 (the positive). Returns (loss, logits).

    q, k: [N, D] L2-normalised; queue: [K, D]. Computed in fp32 whatever the autocast dtype: with T = 0.07 the
    logits reach ~14 and bf16 would round the softmax away.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float()
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ queue.t()
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, target), logits


@torch.no_grad()
def contrastive_accuracy(logits: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of rows whose positive (column ``target``, default 0) has the highest logit."""
    if target is None:
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return (logits.argmax(dim=1) == target).float().mean()
