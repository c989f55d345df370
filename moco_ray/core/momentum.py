"""The momentum (EMA) update of the key encoder."""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def momentum_update(key: nn.Module, query: nn.Module, m: float) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q for every parameter, in two fused multi-tensor ops.

    Only parameters follow the EMA. BatchNorm running statistics (buffers) are *not* copied or averaged: each
    encoder keeps the running mean/var of the batches it normalised itself (the key encoder's come from key
    batches in train mode), exactly as in the official MoCo code. ``num_batches_tracked`` is unaffected.
    """
    k_params = [p for p in key.parameters()]
    q_params = [p.detach() for p in query.parameters()]
    if len(k_params) != len(q_params):
        raise ValueError("key and query encoders have different parameter lists")
    torch._foreach_mul_(k_params, m)
    torch._foreach_add_(k_params, q_params, alpha=1.0 - m)
