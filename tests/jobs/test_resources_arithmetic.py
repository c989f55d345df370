"""Resource arithmetic on synthetic clusters: does a run fit, how many fit at once, and the one-line reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moco_ray.config import load_config
from moco_ray.jobs.resources import (
    TRIAL_CPU,
    ClusterView,
    Needs,
    auto_concurrency,
    check_concurrency,
    fits,
    max_runs,
    needs_of,
    types_from_launcher_yaml,
    why_not,
)

REPO = Path(__file__).resolve().parents[2]


def _cfg(**train):
    over = {f"train.{k}": v for k, v in train.items()}
    return load_config(None, {"train.batch_size": 8, "moco.queue_size": 64, **over})


def _fixed(*nodes: tuple[float, float]) -> ClusterView:
    return ClusterView(tuple({"CPU": c, "GPU": g} for c, g in nodes))


def _shipped_cluster() -> ClusterView:
    """cluster.yaml as its head sees it before any worker exists: the CPU-0 head and the worker node types."""
    types, cap = types_from_launcher_yaml(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    return ClusterView(({"CPU": 0.0, "GPU": 0.0},), types, cap, 1, "cluster.yaml")


def test_issue_sweep_on_two_cpus_does_not_fit():
    # 1 CPU worker + 0.01 trainable leaves 0.99 CPU: no whole CPU for the read task (the hang of issue 22)
    cfg = _cfg(num_workers=1, cpus_per_worker=1)
    two = _fixed((2, 0))
    assert not fits(needs_of(cfg, TRIAL_CPU), two)
    line = why_not(needs_of(cfg, TRIAL_CPU), two, "a trial")
    assert line.startswith("train.cpus_per_worker: a trial needs 1 worker x (1 CPU)")
    assert "train.cpus_per_worker to 0.99" in line and "\n" not in line
    # a plain run of the same config fits: 1 + 1 CPU
    assert fits(needs_of(cfg), two)


def test_plain_run_with_two_cpus_per_worker_does_not_fit_two_cpus():
    needs = needs_of(_cfg(num_workers=1, cpus_per_worker=2))
    assert not fits(needs, _fixed((2, 0)))
    assert "train.cpus_per_worker to 1" in why_not(needs, _fixed((2, 0)))
    assert fits(needs, _fixed((3, 0)))


def test_concurrency_counts_data_and_trainable_cpus():
    quick = _cfg(num_workers=2, cpus_per_worker=0.5)  # the quickstart's shape: 1 CPU of workers + 1 data
    assert auto_concurrency(quick, _fixed((2, 0))) == 1
    assert auto_concurrency(quick, _fixed((4, 0))) == 1  # 2.01 CPUs a trial: 4 CPUs hold one, not two
    assert auto_concurrency(quick, _fixed((4.02, 0))) == 2
    # a trial may span nodes (PACK is soft): 6 CPUs on three nodes hold two, but never a third whole data CPU
    assert auto_concurrency(quick, _fixed((2, 0), (2, 0), (2, 0))) == 2
    small = _cfg(num_workers=1, cpus_per_worker=0.25)
    assert auto_concurrency(small, _fixed((2, 0))) == 1  # 1.26 CPUs each
    assert auto_concurrency(small, _fixed((16, 0))) == 12
    assert auto_concurrency(small, _fixed((16, 0)), limit=5) == 5


def test_worker_bundles_do_not_split_across_nodes():
    needs = needs_of(_cfg(num_workers=1, cpus_per_worker=3))
    assert not fits(needs, _fixed((2, 0), (2, 0), (2, 0)))  # 6 CPUs in all, but no node holds 3 + the stream's 1
    assert fits(needs, _fixed((3, 0), (1, 0)))  # the stream's CPU may be on another node
    packed = needs_of(_cfg(num_workers=2, cpus_per_worker=1, placement_strategy="STRICT_PACK"))
    assert not fits(packed, _fixed((1, 0), (1, 0), (1, 0)))
    assert "train.placement_strategy to PACK" in why_not(packed, _fixed((1, 0), (1, 0), (1, 0)))
    spread = needs_of(_cfg(num_workers=2, cpus_per_worker=1, placement_strategy="STRICT_SPREAD"))
    assert not fits(spread, _fixed((3, 0)))
    assert fits(spread, _fixed((1, 0), (2, 0)))


def test_refusal_reads_as_a_sentence():
    """The refusal names the node count in words ("into the cluster's 1 node (...)"). Mutation caught: the old
    "which does not fit the cluster has 1 node(s): ..." wording back in `ClusterView.describe` / `why_not`."""
    big = needs_of(_cfg(num_workers=1, cpus_per_worker=3))
    one = why_not(big, _fixed((2, 0)))
    assert ", which does not fit into the cluster's 1 node (2 CPU, " in one, one
    assert "(s)" not in one.split("GPU worker")[0]
    assert "into the cluster's 2 nodes (2 CPU, " in why_not(big, _fixed((2, 0), (2, 0)))


def test_fractional_gpus_share_one_gpu():
    one_gpu = _fixed((16, 1))
    whole = _cfg(num_workers=1, cpus_per_worker=1, use_gpu=True)
    quarter = _cfg(num_workers=1, cpus_per_worker=1, use_gpu=True, gpus_per_worker=0.25)
    assert auto_concurrency(whole, one_gpu) == 1
    assert auto_concurrency(quarter, one_gpu) == 4  # four CIFAR trials on one GPU
    assert auto_concurrency(quarter, _fixed((6, 1))) == 2  # then the CPUs bind: 2.01 each
    no_gpu = why_not(needs_of(whole), _fixed((8, 0)))
    assert no_gpu.startswith("train.use_gpu: 1 GPU worker(s) asked for but the Ray cluster has 0 GPU(s)")
    with pytest.raises(ValueError, match=r"train\.gpus_per_worker: 0\.0 is out of range; allowed: 0 < g <= 1"):
        _cfg(use_gpu=True, gpus_per_worker=0)
    with pytest.raises(ValueError, match=r"train\.gpus_per_worker: 0\.5 is out of range; allowed: 1 \(no GPUs"):
        _cfg(gpus_per_worker=0.5)


def test_data_and_stall_settings_are_validated():
    with pytest.raises(ValueError, match=r"data\.cpus: 0 is out of range; allowed: >= 1"):
        load_config(None, ["data.cpus=0"])
    with pytest.raises(ValueError, match=r"data\.stall_timeout_s: 1\.0 is out of range"):
        load_config(None, ["data.stall_timeout_s=1"])
    assert load_config(None, ["data.stall_timeout_s=0"]).data.stall_timeout_s == 0


def test_explicit_concurrency_must_leave_a_whole_cpu():
    tiny = _cfg(num_workers=1, cpus_per_worker=0.25)
    check_concurrency(tiny, 2, _fixed((2, 0)))  # 0.52 of 2 CPUs to workers: a whole CPU stays for the streams
    with pytest.raises(
        ValueError, match=r"^sweep\.max_concurrent_trials: 4 trials' workers at once leave no whole CPU .*\(auto: 1\)"
    ):
        check_concurrency(tiny, 4, _fixed((2, 0)))  # 4 x 0.26 = 1.04: 0.96 CPU left


def test_autoscaler_types_from_cluster_yaml():
    view = _shipped_cluster()
    names = {t.name: (t.resources, t.max_count) for t in view.types}
    assert names == {
        "gpu_1x_a10g": ({"CPU": 4.0, "GPU": 1.0}, 4),
        "gpu_4x_a10g": ({"CPU": 48.0, "GPU": 4.0}, 2),
        "cpu_worker": ({"CPU": 16.0, "GPU": 0.0}, 4),
    }
    assert view.max_workers == 10 and view.autoscaling
    # nothing is up yet, but a GPU run fits what the autoscaler may add
    gpu_run = _cfg(num_workers=1, cpus_per_worker=1, use_gpu=True)
    assert fits(needs_of(gpu_run), view)
    # one-GPU trials: 4 x g5.xlarge (one each) + 2 x g5.12xlarge (four each, GPU-bound)
    assert auto_concurrency(gpu_run, view) == 12
    # the cluster-wide cap binds: at most 3 worker nodes
    capped = ClusterView(view.nodes, view.types, 3, 1, "cluster.yaml")
    assert auto_concurrency(gpu_run, capped) == 9  # the dense g5.12xlarge first: 4 + 4, then one g5.xlarge
    # a 9-GPU single run fits no combination of the types (8 GPUs of g5.12xlarge + 4 of g5.xlarge within 10 nodes
    # does fit: 12 GPUs); 13 does not
    assert fits(needs_of(_cfg(num_workers=12, batch_size=24, cpus_per_worker=1, use_gpu=True)), view)
    big = needs_of(_cfg(num_workers=13, batch_size=26, cpus_per_worker=1, use_gpu=True))
    assert not fits(big, view)
    assert "train.num_workers to 12" in why_not(big, view)


def test_fixed_multinode_and_head_without_cpus():
    view = ClusterView(({"CPU": 0.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}))
    gpu_run = _cfg(num_workers=2, cpus_per_worker=6, use_gpu=True)
    assert fits(needs_of(gpu_run), view)  # 6 + 6 on the GPU nodes, the stream's CPU beside one of them
    assert max_runs(Needs(1, {"CPU": 7.0, "GPU": 1.0}, 2), view) == 1  # 7 + 2: only the other node's 8 CPUs help
    assert max_runs(Needs(1, {"CPU": 7.0, "GPU": 1.0}, 1), view) == 2
