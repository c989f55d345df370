"""Which checkpoints of a run dir stay: the latest ``train.keep_checkpoints`` and, with ``train.keep_best``, the
best one by an epoch metric (``config.BEST_METRICS``: knn_top1 and acc1 higher is better, loss lower).

Ray Train's ``CheckpointConfig`` keeps either the newest N or the top N by a score (plus the newest), never "the
newest N and the best one", and it scores an epoch that lacks the metric (kNN runs every ``eval.knn_every`` epochs)
as -inf. So a ``keep_best`` run tells Ray to keep everything and prunes here: rank 0 after each checkpoint (disk
stays bounded during the run) and the driver at the end (the fits before a resume too). Every checkpoint carries
:data:`METRICS_FILE` beside its state file (its epoch and that epoch's metrics): choosing the best reads a few
hundred bytes per checkpoint, never the states. A checkpoint without the file (written before it existed) or
without a finite value of the metric does not compete; it still counts among the latest.

Newest means the state file's modification time, then the directory name, as ``jobs.resolve.latest_checkpoint``
orders them, so a resume still continues from the latest checkpoint, never from the best.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from moco_ray.config import BEST_METRICS
from moco_ray.data.manifest import join, resolve_fs
from moco_ray.tracking.history import EpochMetrics
from moco_ray.train.checkpoint import STATE_FILE

METRICS_FILE = "metrics.json"
BEST_CHECKPOINT_TAG = "moco_ray.best_checkpoint"  # its path or URI; with best_epoch (1 = first), _metric, _value
BEST_EPOCH_TAG = "moco_ray.best_epoch"
BEST_METRIC_TAG = "moco_ray.best_metric"
BEST_VALUE_TAG = "moco_ray.best_value"


def write_metrics(directory: str | Path, metrics: EpochMetrics, global_step: int) -> None:
    """The checkpoint's epoch and metrics as JSON beside its state file (what :func:`scan` reads back)."""
    body = {"epoch": metrics.epoch, "global_step": global_step, "metrics": metrics.as_dict()}
    (Path(directory) / METRICS_FILE).write_text(json.dumps(body, indent=1))


@dataclass(frozen=True)
class Candidate:
    """One ``checkpoint_*`` directory: its name, its path or URI, its state file's mtime (0 when it has none) and
    the metrics of its :data:`METRICS_FILE` (empty when it has none)."""

    name: str
    path: str
    mtime_ns: int
    epoch: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def value(self, metric: str) -> float | None:
        """The metric's value if this checkpoint can compete on it (present and finite), else None."""
        v = self.metrics.get(metric)
        return float(v) if isinstance(v, int | float) and math.isfinite(v) else None

    def tags(self, metric: str) -> dict[str, str]:
        """The run's record of its best checkpoint."""
        return {
            BEST_CHECKPOINT_TAG: self.path,
            BEST_EPOCH_TAG: str(self.epoch + 1) if self.epoch is not None else "",  # as the console numbers it
            BEST_METRIC_TAG: metric,
            BEST_VALUE_TAG: f"{self.value(metric):.6g}",
        }


def best_of(candidates: list[Candidate], metric: str) -> Candidate | None:
    """The best candidate by ``metric`` (its direction from ``BEST_METRICS``); on a tie the older one (a later
    equal score does not move the best). None when no candidate has the metric."""
    scored = [c for c in candidates if c.value(metric) is not None]
    if not scored:
        return None
    sign = 1.0 if BEST_METRICS[metric] == "max" else -1.0
    oldest_first = sorted(scored, key=lambda c: (c.mtime_ns, c.name))
    return max(oldest_first, key=lambda c: sign * (c.value(metric) or 0.0))  # max keeps the first of equals


def select(
    candidates: list[Candidate], keep: int, final: str = "", metric: str = ""
) -> tuple[set[str], Candidate | None]:
    """The names that stay, and the best candidate (None without ``metric`` or when none has it).

    ``candidates`` newest first. Stay: ``final`` (the run's last checkpoint, when given), the newest others up to
    ``keep`` in all, and the best by ``metric``.
    """
    final_name = final.rstrip("/").rsplit("/", 1)[-1] if final else ""
    others = [c.name for c in candidates if c.name != final_name]
    stay = set(others[: keep - 1] if final_name else others[:keep])
    if final_name:
        stay.add(final_name)
    best = best_of(candidates, metric) if metric else None
    if best is not None:
        stay.add(best.name)
    return stay, best


def scan(run_dir: str) -> list[Candidate]:
    """The run dir's ``checkpoint_*`` directories, newest first (a local path or a URI, as Ray Train writes)."""
    fs, base = resolve_fs(run_dir)
    entries = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    dirs = [e for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_")]
    states = fs.get_file_info([join(d.path, STATE_FILE) for d in dirs])
    out = []
    for d, s in zip(dirs, states, strict=True):
        path = f"{run_dir.rstrip('/')}/{d.base_name}" if "://" in run_dir else str(Path(run_dir) / d.base_name)
        epoch, metrics = _read_metrics(fs, join(d.path, METRICS_FILE))
        out.append(Candidate(d.base_name, path, s.mtime_ns or 0, epoch, metrics))
    return sorted(out, key=lambda c: (c.mtime_ns, c.name), reverse=True)


def _read_metrics(fs: pafs.FileSystem, path: str) -> tuple[int | None, dict[str, Any]]:
    """A checkpoint's :data:`METRICS_FILE`; (None, {}) when it has none or it does not parse (it cannot compete)."""
    try:
        with fs.open_input_stream(path) as f:
            body = json.loads(f.read())
        return int(body["epoch"]), dict(body["metrics"])
    except (FileNotFoundError, OSError, ValueError, KeyError, TypeError):
        return None, {}


@dataclass(frozen=True)
class Pruned:
    """What a prune did: the directory names deleted, and the best checkpoint that stays (None: no ``metric``, or
    no checkpoint has it)."""

    deleted: list[str]
    best: Candidate | None


def prune(run_dir: str, keep: int, final: str = "", metric: str = "") -> Pruned:
    """Delete the run dir's checkpoints that :func:`select` does not keep."""
    fs, base = resolve_fs(run_dir)
    candidates = scan(run_dir)
    stay, best = select(candidates, keep, final, metric)
    gone = [c for c in candidates if c.name not in stay]
    for c in gone:
        fs.delete_dir(join(base, c.name))
    return Pruned([c.name for c in gone], best)
