"""Progress inside an epoch: ETA formatting, line cadence and step-metric cadence, on a fake clock (no Ray)."""

from __future__ import annotations

import torch

from moco_ray.evaluation.progress import Progress, eta_seconds, format_duration
from moco_ray.train.progress import StepProgress, TimedIter, log_due


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_format_duration_and_eta():
    assert [format_duration(s) for s in (0, 42.4, 185, 3720, 90061)] == ["0s", "42s", "3m05s", "1h02m", "25h01m"]
    assert format_duration(float("inf")) == "?" and format_duration(float("nan")) == "?"
    assert eta_seconds(0, 10, 5.0) == float("inf")
    assert eta_seconds(25, 100, 50.0) == 150.0  # 2 s an item, 75 left


def test_progress_lines_at_most_every_min_seconds_and_at_the_end():
    clock, lines = Clock(), []
    bar = Progress("features train: rows", 1000, lines.append, every=1, min_seconds=30, clock=clock)
    for _ in range(10):  # 100 rows every 10 s: a line every 30 s, then the last one
        clock.t += 10
        bar.update(100)
    assert lines == [
        "features train: rows 300/1000 (30%)  ETA 1m10s",
        "features train: rows 600/1000 (60%)  ETA 40s",
        "features train: rows 900/1000 (90%)  ETA 10s",
        "features train: rows 1000/1000 (100%)  took 1m40s",
    ]


def test_step_metrics_every_n_global_steps_and_line_whichever_is_rarer():
    clock, logged, lines = Clock(), [], []
    sp = StepProgress(4, epochs=2, steps_per_epoch=10, global_batch=32, device=torch.device("cpu"),
                      log_metrics=lambda m, s: logged.append((s, m)), emit=lines.append,
                      min_line_seconds=30, clock=clock)  # fmt: skip

    def batches():
        for _ in range(10):
            clock.t += 1.0  # 1 s waiting for each batch
            yield None

    gstep = 0
    for epoch in range(2):
        timer = TimedIter(batches(), clock=clock)
        sp.start_epoch(epoch, timer)
        for i, _ in enumerate(timer):
            clock.t += 4.0  # 4 s of compute
            gstep += 1
            sp.after_step(torch.tensor(float(i)), 0.1, gstep)
    assert [s for s, _ in logged] == [4, 8, 12, 16, 20]  # global steps: comparable across runs
    s4 = logged[0][1]
    assert s4["step/loss"] == 1.5  # mean of steps 0..3 of epoch 0
    assert s4["step/images_per_s"] == 4 * 32 / 20.0
    assert s4["step/data_wait_s"] == 4.0 and s4["step/data_wait_frac"] == 0.2
    assert logged[2][1]["step/loss"] == (0 + 1) / 2  # step 12: the window restarted at the epoch's start
    assert logged[2][1]["step/epoch"] == 1
    # lines: logging steps at least 30 s apart (steps 8 @40 s, 16 @80 s; not 4 @20 s, 12 @60 s, 20 @100 s)
    assert len(lines) == 2
    assert lines[0] == (
        "epoch 1/2  step 8/10 (80%)  loss 5.5000  lr 0.1  6 img/s  data wait 20%  ETA epoch 10s, run 1m00s"
    )
    assert lines[1].startswith("epoch 2/2  step 6/10 (60%)")


def test_log_due():
    assert [s for s in range(0, 12) if log_due(s, 5)] == [5, 10]
    assert not any(log_due(s, 0) for s in range(10))


def test_timed_iter_counts_only_the_wait_in_next():
    clock = Clock()

    def slow():
        for x in range(3):
            clock.t += 2.0
            yield x

    it = TimedIter(slow(), clock=clock)
    for _ in it:
        clock.t += 100.0  # the consumer's time is not waiting
    assert it.wait == 6.0
