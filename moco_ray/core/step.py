"""The one MoCo training step: the Ray Train loop, the benchmarks and the tests all run this function.

It lives in the core because it is pure PyTorch (a method, an optimizer, two batches of views; no config, no Ray),
so the core's own tests train with it too. The step never reads a tensor's value on the host (no ``.item()``, no
``float(tensor)``), so on a GPU it queues work without a host-device sync; callers accumulate the returned device
tensors.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moco_ray.core.method import ContrastiveMethod, StepOutput


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that take gradients: the query side (the key encoder and the queue never do)."""
    return [p for p in model.parameters() if p.requires_grad]


def train_step(
    model: ContrastiveMethod,
    opt: torch.optim.Optimizer,
    im_q: torch.Tensor,
    im_k: torch.Tensor,
    *,
    autocast: torch.dtype | None = None,
) -> StepOutput:
    """Forward (EMA update, loss, enqueue inside the method), backward and one optimizer step.

    ``autocast``: a reduced precision for the forward pass (bf16 on GPUs), or None for fp32.
    Returns the detached ``loss`` and ``acc1`` tensors, still on the device.
    """
    with torch.autocast(im_q.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        out = model(im_q, im_k)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    return {"loss": out["loss"].detach(), "acc1": out["acc1"].detach()}
