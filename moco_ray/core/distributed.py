"""torch.distributed helpers that degrade to no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


@torch.no_grad()
def all_gather_nograd(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every worker along dim 0 (rank order); no gradient flows back."""
    if not is_dist() or world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def all_gather_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every worker along dim 0, with gradients flowing back to each worker's part.

    Needed where negatives come from the global batch (MoCo v3, SimCLR): every worker's loss depends on the
    other workers' embeddings, and their gradients must reach the producing worker.
    """
    if not is_dist() or world_size() == 1:
        return t
    import torch.distributed.nn.functional as dist_fn  # lazy: an ImportError on a torch built without distributed

    return torch.cat(dist_fn.all_gather(t.contiguous()), dim=0)
