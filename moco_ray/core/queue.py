"""FIFO queue of K L2-normalised keys: the negatives of MoCo v1/v2."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class KeyQueue(nn.Module):
    """K keys of width ``dim`` in a ring buffer, oldest overwritten first.

    Stored as buffers, so ``state_dict`` (and so checkpoints) carry the keys and the pointer bit-exactly and
    ``.to(device)`` moves them. Unlike the reference code, K need not be a multiple of the batch size: an enqueue
    that runs past the end wraps around to the start.
    """

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        # Random unit vectors: the official initialisation (early negatives are noise until the queue fills).
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` [n, dim] at the pointer (wrapping around) and advance it by n mod K.

        Keys are stored in fp32 and re-normalised, so the queue stays unit-norm whatever the producer's dtype.
        With n > K only the newest K keys can be kept, and they are written as if enqueued one by one.
        The pointer never leaves the device (index arithmetic on the ``ptr`` tensor): reading it on the host would
        be a host-device sync between the forward and the backward pass on a GPU.
        """
        keys = F.normalize(keys.detach().float(), dim=1)
        n, k = keys.shape[0], self.size
        skip = max(n - k, 0)  # only the last K survive; keep the positions they would have had
        idx = (torch.arange(skip, n, device=self.keys.device) + self.ptr) % k
        self.keys.index_copy_(0, idx, keys[skip:].to(self.keys.device))
        self.ptr.add_(n).remainder_(k)

    def forward(self) -> torch.Tensor:  # pragma: no cover - a queue is read, not called
        return self.keys
