"""One pretraining epoch's metrics, typed: what the loop measures, checkpoints keep, MLflow logs and plots draw.

As a dict (:meth:`EpochMetrics.as_dict`) it is the Ray Train report, a checkpoint's history entry and the run's
MLflow metrics, under the same names; :meth:`EpochMetrics.from_dict` reads any of them back, including history
saved before a field existed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class EpochMetrics:
    """Averaged over all ranks, except the data-wait figures (the reporting rank's own).

    ``epoch`` is 0-based. ``data_wait_seconds`` / ``data_wait_frac``: time spent waiting for the next batch and its
    share of the epoch (None in history saved before they were measured). ``knn_top1``: the kNN monitor's accuracy,
    only in the epochs it ran (``eval.knn_every``).
    """

    epoch: int
    loss: float
    acc1: float
    lr: float
    epoch_seconds: float
    images_per_s: float
    corrupt_images: float
    data_wait_seconds: float | None = None
    data_wait_frac: float | None = None
    knn_top1: float | None = None

    def as_dict(self) -> dict[str, float]:
        """The metrics by name, in field order; a metric that was not measured (None) is left out."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def report(self) -> dict[str, float]:
        """What Ray Train / Tune receive each epoch: :meth:`as_dict` with ``epoch`` as its number (1 for the first),
        as the console, MLflow and Tune's own status table show it."""
        return {**self.as_dict(), "epoch": self.epoch + 1}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EpochMetrics:
        """The inverse of :meth:`as_dict`: a missing optional metric is None; an unknown name or a missing required
        one is a TypeError."""
        return cls(**{k: int(v) if k == "epoch" else v for k, v in d.items()})
