"""The one MoCo training step: the Ray Train loop, the benchmarks and the tests all run this function.

It lives in the core because it is pure PyTorch (a method, an optimizer, two batches of views; no config, no Ray),
so the core's own tests train with it too. The step never reads a tensor's value on the host (no ``.item()``, no
``float(tensor)``), so on a GPU it queues work without a host-device sync; callers accumulate the returned device
tensors. The one exception is fp16 with a ``GradScaler`` (MoCo v3's official AMP): see :func:`train_step`.
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
    scaler: torch.amp.GradScaler | None = None,
) -> StepOutput:
    """Forward (EMA update, loss, enqueue inside the method), backward and one optimizer step.

    ``autocast``: a reduced precision for the forward pass (bf16 or fp16 on GPUs), or None for fp32.
    ``scaler``: fp16's loss scaling (moco-v3 main_moco.py: ``scaler.scale(loss).backward(); scaler.step(optimizer);
    scaler.update()``), or None. fp16 gradients overflow where bf16's do not, so the scaler skips the optimizer
    step on inf/NaN gradients and backs its scale off; deciding to skip reads ``found_inf`` on the host
    (``GradScaler._maybe_opt_step``: ``.item()``), one host-device sync per step, accepted for fp16 only (bf16 and
    fp32 need no scaler and keep zero syncs; tests/train/test_gpu_contract_syncs.py counts both).
    Returns the detached ``loss`` and ``acc1`` tensors, still on the device.
    """
    with torch.autocast(im_q.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        out = model(im_q, im_k)
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        out["loss"].backward()
        opt.step()
    else:
        scaler.scale(out["loss"]).backward()
        scaler.step(opt)  # skipped when a gradient is inf/NaN (the scale was too large)
        scaler.update()  # on device: backoff after a skip, growth after growth_interval clean steps
    return {"loss": out["loss"].detach(), "acc1": out["acc1"].detach()}
