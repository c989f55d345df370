"""LARS as MoCo v3 uses it (facebookresearch/moco-v3 ``vits/optimizer.py``), in plain PyTorch.

For every parameter with more than one dimension (conv and linear weights): add weight decay to the gradient,
scale that update by the trust ratio ``eta * ||w|| / ||update||`` (1 where either norm is 0), then SGD momentum
without dampening. Biases and BatchNorm weights/biases (<= 1-D) get neither weight decay nor the trust ratio: plain
momentum on the raw gradient. No per-layer lr beyond the trust ratio and no Nesterov, as the official code.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class LARS(torch.optim.Optimizer):
    """``LARS(params, lr, weight_decay, momentum=0.9, trust_coefficient=0.001)``; one state buffer ``mu``."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:  # not a bias nor a BN parameter
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    # tensors, not Python floats: no host-device sync on a GPU
                    ratio = group["trust_coefficient"] * w_norm / u_norm
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss
