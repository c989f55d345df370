"""``train.keep_best``: on real checkpoint directories (state file + metrics file, as rank 0 writes them), a prune
keeps the latest ``keep_checkpoints`` and the best by the metric, in the metric's direction; epochs without the
metric (kNN every few epochs), non-finite values and checkpoints written before the metrics file do not compete;
without a metric the prune is the old one (the latest only).

Mutations checked by hand (each failed here): knn_top1's direction flipped to min (epoch 1, 0.5, kept); the best
left out of the kept set (epoch 3 deleted); a missing value counted as 0 (the old checkpoint won on loss); ties
going to the newer checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from checkpoint_states import EPOCH_0, train_state

from moco_ray.config import load_config
from moco_ray.tracking.history import EpochMetrics
from moco_ray.train.checkpoint import STATE_FILE, save_state
from moco_ray.train.keep_best import (
    BEST_CHECKPOINT_TAG,
    BEST_EPOCH_TAG,
    BEST_METRIC_TAG,
    BEST_VALUE_TAG,
    METRICS_FILE,
    prune,
    write_metrics,
)


def _checkpoint(run_dir: Path, epoch: int, *, metrics: bool = True, **values) -> Path:
    """``checkpoint_<epoch>`` as Ray stores rank 0's: state file and metrics file; mtime = epoch (newest last)."""
    d = run_dir / _name(epoch)
    save_state(d, train_state({"w": torch.zeros(1)}, epoch))
    if metrics:
        write_metrics(d, EpochMetrics.from_dict({**EPOCH_0, "epoch": epoch, **values}), 4 * (epoch + 1))
    os.utime(d / STATE_FILE, ns=(10**9 * (epoch + 1), 10**9 * (epoch + 1)))
    return d


def _name(epoch: int) -> str:
    return f"checkpoint_2026-12-05_00-00-{epoch:02d}.000000"


def _left(run_dir: Path) -> list[int]:
    return sorted(int(p.name[-9:-7]) for p in run_dir.glob("checkpoint_*"))


def test_the_latest_and_the_best_by_knn_stay_and_epochs_without_knn_do_not_compete(tmp_path):
    knn = {1: 0.5, 3: 0.8, 5: 0.6}  # eval.knn_every 2: epochs 0, 2, 4 have no kNN
    for e in range(6):
        _checkpoint(tmp_path, e, **({"knn_top1": knn[e]} if e in knn else {}))
    pruned = prune(str(tmp_path), keep=2, metric="knn_top1")
    assert _left(tmp_path) == [3, 4, 5]  # latest 2 + the best (epoch 3)
    assert pruned.best is not None and (pruned.best.epoch, pruned.best.value("knn_top1")) == (3, 0.8)
    assert pruned.best.tags("knn_top1") == {
        BEST_CHECKPOINT_TAG: str(tmp_path / pruned.best.name),
        BEST_EPOCH_TAG: "4",  # 0-based epoch 3 is "epoch 4" on the console
        BEST_METRIC_TAG: "knn_top1",
        BEST_VALUE_TAG: "0.8",
    }
    assert sorted(pruned.deleted) == [_name(e) for e in (0, 1, 2)]
    again = prune(str(tmp_path), keep=2, metric="knn_top1")  # the next epoch's prune: nothing more to delete
    assert again.deleted == [] and again.best == pruned.best


def test_loss_is_best_when_lowest_and_non_finite_or_unrecorded_values_do_not_compete(tmp_path):
    _checkpoint(tmp_path, 0, metrics=False)  # written before the metrics file existed: cannot compete
    _checkpoint(tmp_path, 1, loss=2.0)
    _checkpoint(tmp_path, 2, loss=1.2)
    _checkpoint(tmp_path, 3, loss=math.nan)
    _checkpoint(tmp_path, 4, loss=1.9)
    pruned = prune(str(tmp_path), keep=1, metric="loss")
    assert _left(tmp_path) == [2, 4] and pruned.best is not None and pruned.best.epoch == 2


def test_a_tie_keeps_the_older_best(tmp_path):
    for e, v in enumerate([0.7, 0.9, 0.9, 0.1]):
        _checkpoint(tmp_path, e, acc1=v)
    assert prune(str(tmp_path), keep=1, metric="acc1").best.epoch == 1
    assert _left(tmp_path) == [1, 3]


def test_without_a_metric_only_the_final_and_the_newest_stay(tmp_path):
    """The prune of runs without keep_best (the driver's, after a resume): ``final`` and ``keep - 1`` newest."""
    dirs = [_checkpoint(tmp_path, e, knn_top1=1.0 - e / 10) for e in range(4)]
    pruned = prune(str(tmp_path), keep=2, final=str(dirs[1]))
    assert _left(tmp_path) == [1, 3] and pruned.best is None


def test_the_metrics_file_is_the_epochs_metrics(tmp_path):
    m = EpochMetrics.from_dict({**EPOCH_0, "epoch": 4, "knn_top1": 0.25})
    write_metrics(tmp_path, m, 20)
    body = json.loads((tmp_path / METRICS_FILE).read_text())
    assert body == {"epoch": 4, "global_step": 20, "metrics": m.as_dict()}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.keep_best=knn"], "train.keep_best: 'knn' is out of range; allowed: '' (off), knn_top1 (max)"),
        (["train.keep_best=knn_top1", "eval.knn_every=0"], "needs the kNN monitor, but eval.knn_every is 0"),
    ],
)
def test_an_unknown_or_unmeasured_metric_is_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
