"""Progress inside a training epoch: step-metric and line cadence, and data-wait timing, on a fake clock (no Ray)."""

from __future__ import annotations

import torch
from moco_helpers import FakeClock as Clock

from moco_ray.train.progress import StepProgress, TimedIter, log_due


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
