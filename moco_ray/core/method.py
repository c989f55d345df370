"""The contract between a self-supervised method (MoCo v1/v2, MoCo v3, SimCLR) and whatever trains it.

The training loop, checkpoints and exports rely on this and nothing else: a method is an ``nn.Module`` built from
its query encoder and plain hyper-parameters (``train/model.py`` maps a config's ``moco.method`` to a builder);
``forward(im_q, im_k)`` runs one step's forward (any EMA update and enqueue included) and returns the loss and a
top-1 to monitor; it says whether it has a momentum encoder and a queue; and it wraps its one trainable module
itself (DDP, ``torch.compile``), so the caller never reaches into its sub-modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypedDict, runtime_checkable

import torch
import torch.nn as nn

from moco_ray.core.queue import KeyQueue


class StepOutput(TypedDict):
    """What a method's forward returns: the loss to minimise and the contrastive top-1 (both on the device)."""

    loss: torch.Tensor
    acc1: torch.Tensor


@runtime_checkable
class ContrastiveMethod(Protocol):
    """A method as the training loop drives it (every implementation is also an ``nn.Module``).

    ``momentum``: the key encoder's EMA coefficient, which the loop may reschedule before each step
    (``moco.momentum_schedule``); None for a method without a momentum encoder (SimCLR).
    ``queue``: the negatives kept from earlier batches (MoCo v1/v2); None where the negatives are the other samples
    of the batch (MoCo v3, SimCLR).
    """

    momentum: float | None
    queue: KeyQueue | None

    @property
    def query_module(self) -> nn.Module:
        """The trainable encoder without any wrapper (what checkpoints and exports hold)."""
        ...

    def wrap_trainable(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Replace the module that takes gradients by ``wrap(module)`` (DDP, ``torch.compile``)."""
        ...

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> StepOutput: ...


class QueryEncoderMethod(nn.Module):
    """What the three methods share: ``encoder_q`` is the only module that takes gradients, so it is the one that
    DDP and ``torch.compile`` wrap (a key encoder and a queue are kept equal across ranks by the method itself)."""

    encoder_q: nn.Module

    @property
    def query_module(self) -> nn.Module:
        """The query encoder without a DDP wrapper (what checkpoints and exports hold)."""
        return getattr(self.encoder_q, "module", self.encoder_q)

    def wrap_trainable(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        self.encoder_q = wrap(self.encoder_q)
