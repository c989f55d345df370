"""The driver's console in a sweep: Ray's log deduplicator must not merge two trials' progress lines (they differ
only in numbers, which its dedup key drops), and on a local instance the raylet's worker-start notice stays in
Ray's log files. Uses Ray's own deduplicator, fed as the driver's log thread feeds it."""

from __future__ import annotations

import copy

import pytest
from ray._private import ray_logging

from moco_ray.jobs.local_ray import steer_log_dedup
from moco_ray.tracking.history import EpochMetrics
from moco_ray.train.loop import epoch_line
from moco_ray.train.spec import RunSpec

NOTICE = (
    "WARNING: 8 PYTHON worker processes have been started on node: abc with address: 127.0.0.1, which is 4x the "
    "maximum expected startup concurrency (2). This could be a result of using a large number of actors"
)


@pytest.fixture
def dedup(monkeypatch):
    """A copy of the driver's stdout deduplicator, steered as ``init_ray`` steers the real ones."""
    for name in ("stdout_deduplicator", "stderr_deduplicator"):
        monkeypatch.setattr(ray_logging, name, copy.copy(getattr(ray_logging, name)))
    clock = [0.0]
    d = ray_logging.stdout_deduplicator
    d.timesource, d.recent = (lambda: clock[0]), {}
    return d, clock


def _printed(d, clock, batches) -> list[str]:
    out = []
    for pid, line in batches:
        out += [ln for b in d.deduplicate({"ip": "127.0.0.1", "pid": pid, "is_err": False, "lines": [line]})
                for ln in b["lines"]]  # fmt: skip
        clock[0] += 0.5
    clock[0] += 60
    return out + [ln for b in d.deduplicate({"ip": "x", "pid": 0, "is_err": False, "lines": []}) for ln in b["lines"]]


def _line(label: str, loss: float) -> str:
    spec = RunSpec.__new__(RunSpec)
    spec.label = label
    cfg = type("C", (), {"train": type("T", (), {"epochs": 2})})
    m = EpochMetrics(epoch=1, loss=loss, acc1=0.5, lr=0.03, epoch_seconds=3.0, images_per_s=100, corrupt_images=0)
    return spec.console(epoch_line(cfg, m))


def test_ray_alone_merges_two_trials_epoch_lines(dedup):
    d, clock = dedup  # the premise: without steering, three trials' lines become one and a "[repeated 2x ...]"
    out = _printed(d, clock, [(11, _line("", 5.1)), (22, _line("", 4.9)), (33, _line("", 4.7))])
    assert out[0].startswith("epoch 2/2  loss 5.1") and len(out) == 2 and "[repeated 2x" in out[1], out


def test_steered_dedup_passes_every_progress_line_and_drops_the_worker_start_notice(dedup):
    d, clock = dedup
    steer_log_dedup(local=True)
    steer_log_dedup(local=True)  # idempotent: the patterns are not added twice
    assert d.allow_re.pattern.count("epoch") == 1
    lines = [_line(f"queue_size={k},momentum=0.99", loss) for k, loss in ((1024, 5.1), (4096, 4.9), (8192, 4.7))]
    other = "(ordinary) a line actors print alike"
    noisy = [(pid, f"{other} {pid}") for pid in (44, 55, 66)]
    out = _printed(d, clock, [*zip((11, 22, 33), lines), ("raylet", NOTICE), *noisy])
    assert all(ln in out for ln in lines), out
    assert lines[0].startswith("[queue_size=1024,momentum=0.99] epoch 2/2  loss 5.1000")
    assert not any("worker processes have been started" in ln for ln in out), out
    assert sum(other in ln for ln in out) == 2 and any("[repeated 2x" in ln for ln in out), out  # the rest: as before


def test_a_joined_cluster_keeps_the_notice(dedup):
    d, clock = dedup
    steer_log_dedup(local=False)
    assert NOTICE in _printed(d, clock, [("raylet", NOTICE)])
