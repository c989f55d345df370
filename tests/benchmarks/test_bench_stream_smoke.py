"""Smoke tests of the stream-vs-DataLoader and plain-loop-vs-pretrain benchmarks' parts that need no Ray."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_e2e  # noqa: E402
import bench_stream_vs_loader as bsl  # noqa: E402

pytestmark = pytest.mark.usefixtures("restore_threads")


def test_tree_cpu_seconds_counts_this_process_and_its_children():
    before = bsl.tree_cpu_seconds()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:  # burn 0.3 s of CPU here
        sum(range(1000))
    assert bsl.tree_cpu_seconds() - before >= 0.2  # clock ticks are 10 ms
    assert bsl.tree_cpu_seconds(1) >= bsl.tree_cpu_seconds(os.getpid()) > 0  # init's tree holds ours


def test_pair_folder_gives_two_different_float_views_and_the_label(small_image_root):
    files = sorted((small_image_root / "train").glob("*/*"))[:4]
    ds = bsl.PairFolder(files, 16)
    q, k, y = ds[0]
    assert q.shape == k.shape == (3, 16, 16) and q.dtype == torch.float32 and 0.0 <= float(q.min()) <= 1.0
    assert not torch.equal(q, k) and y == ds.classes.index(files[0].parent.name)


def test_plain_loop_trains_the_same_model_with_train_step(small_image_root, tmp_path):
    from moco_helpers import TINY_MODEL

    from moco_ray.config import load_config

    over = {
        **TINY_MODEL,
        "train.batch_size": 8,
        "train.epochs": 2,
        "train.max_steps_per_epoch": 2,
        "train.cpus_per_worker": 1,
    }
    cfg = load_config(bench_e2e.EXPERIMENTS["cifar"], over)
    r = bench_e2e.plain_loop(cfg, small_image_root, loader_workers=1)
    assert len(r["images_per_s_by_epoch"]) == 2 and r["images_per_s_last"] > 0
