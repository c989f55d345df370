"""uint8 images -> normalised float tensors on the training device, with constants made once per device."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moco_ray.core.defaults import IMAGENET_MEAN, IMAGENET_STD


class Normalizer:
    """``(x / 255 - mean) / std`` for uint8 [B, 3, H, W] batches, as one fused multiply-add on the device.

    The constants live on ``device`` from construction, so a batch costs no host-to-device copy beyond the images
    themselves (a ``torch.tensor(..., device=cuda)`` per batch is a blocking copy). With ``channels_last`` the
    memory format is changed on the uint8 tensor, before the cast (a quarter of the bytes to move).
    """

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = (1.0 / (255.0 * s)).to(self.device)
        self.shift = (-m / s).to(self.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"normalize: expected a uint8 tensor [B, 3, H, W], got {got}")
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = torch.addcmul(self.shift, x.float(), self.scale)  # keeps x's memory format
        return out if self.dtype == torch.float32 else out.to(self.dtype)
