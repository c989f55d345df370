"""How much two epochs' batches repeat each other: the co-batch fraction, and its value under a full reshuffle.

For contrastive learning the batch composition is part of the recipe (shuffle-BN's statistics, the queue's
freshness, SimCLR's in-batch negatives): the official loaders draw a new random permutation of the whole data set
every epoch. This module measures how far an epoch order is from that, on the row ids the stream emitted
(`moco_ray.data.stream`); the benchmark (benchmarks/bench_shuffle.py) and the test (tests/data/test_stream_shuffle.py)
both use it. Pure NumPy: no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CoBatch:
    """Image pairs sharing a batch in the first epoch (``pairs``) and, of those, in the second too (``shared``)."""

    pairs: int
    shared: int

    @property
    def fraction(self) -> float:
        return self.shared / self.pairs if self.pairs else 0.0


def _batch_of(order: Sequence[str], batch_size: int) -> dict[str, int]:
    """Each id's batch index; ids of a last partial batch are left out (training drops it: drop_last)."""
    full = len(order) // batch_size * batch_size
    return {rid: i // batch_size for i, rid in enumerate(order[:full])}


def co_batch(first: Sequence[str], second: Sequence[str], batch_size: int) -> CoBatch:
    """Of the id pairs that share a batch of `first`, how many share a batch of `second` as well.

    `first` / `second`: the row ids of two epochs in the order training consumed them, cut into consecutive
    batches of `batch_size`. Counted exactly: pairs per cell of the (batch in first, batch in second) table.
    """
    if batch_size < 2:
        raise ValueError(f"batch_size: {batch_size!r} is out of range; allowed: >= 2 (a pair needs two rows)")
    a, b = _batch_of(first, batch_size), _batch_of(second, batch_size)
    a_idx = np.fromiter(a.values(), dtype=np.int64, count=len(a))
    sizes = np.bincount(a_idx)
    pairs = int((sizes * (sizes - 1) // 2).sum())
    both = [(a[rid], b[rid]) for rid in a if rid in b]
    if not both:
        return CoBatch(pairs, 0)
    cells = np.unique(np.asarray(both, dtype=np.int64), axis=0, return_counts=True)[1]
    return CoBatch(pairs, int((cells * (cells - 1) // 2).sum()))


def co_batch_fraction(first: Sequence[str], second: Sequence[str], batch_size: int) -> float:
    """`co_batch(...).fraction`: the share of one epoch's batch-mates that are batch-mates again in the next."""
    return co_batch(first, second, batch_size).fraction


def expected_co_batch_fraction(rows: int, batch_size: int) -> float:
    """The same fraction when the second epoch is a uniformly random permutation of `rows` ids (full batches only).

    A pair of the first epoch lands in one full batch of the second with probability
    ``n_batches * B * (B - 1) / (rows * (rows - 1))``: ``(B - 1) / (rows - 1)`` when B divides `rows`.
    """
    if rows < 2 or batch_size < 2:
        raise ValueError(f"rows and batch_size must be >= 2, got {rows} and {batch_size}")
    n_batches = rows // batch_size
    return n_batches * batch_size * (batch_size - 1) / (rows * (rows - 1))
