"""Progress inside a training epoch: step-metric cadence, time-based lines, and data-wait timing, on a fake clock
(no Ray)."""

from __future__ import annotations

import torch
from moco_helpers import FakeClock as Clock

from moco_ray.train.progress import StepProgress, TimedIter, log_due, log_every


def _run(sp: StepProgress, clock: Clock, epochs: int, steps: int, compute_s: float, wait_s: float) -> None:
    gstep = 0
    for epoch in range(epochs):

        def batches():
            for _ in range(steps):
                clock.t += wait_s
                yield None

        timer = TimedIter(batches(), clock=clock)
        sp.start_epoch(epoch, timer)
        for i, _ in enumerate(timer):
            clock.t += compute_s
            gstep += 1
            sp.after_step(torch.tensor(float(i)), 0.1, gstep)


def test_step_metrics_every_n_global_steps():
    clock, logged, lines = Clock(), [], []
    sp = StepProgress(4, epochs=2, steps_per_epoch=10, global_batch=32, device=torch.device("cpu"),
                      log_metrics=lambda m, s: logged.append((s, m)), emit=lines.append,
                      line_seconds=30, clock=clock)  # fmt: skip
    _run(sp, clock, epochs=2, steps=10, compute_s=4.0, wait_s=1.0)
    assert [s for s, _ in logged] == [4, 8, 12, 16, 20]  # global steps: comparable across runs
    s4 = logged[0][1]
    assert s4["step_loss"] == 1.5  # mean of steps 0..3 of epoch 0
    assert s4["step_images_per_s"] == 4 * 32 / 20.0
    assert s4["step_data_wait_s"] == 4.0 and s4["step_data_wait_frac"] == 0.2
    assert logged[2][1]["step_loss"] == (0 + 1) / 2  # step 12: the window restarted at the epoch's start
    assert logged[2][1]["step_epoch"] == 2  # the epoch number, as the console prints it


def test_lines_come_by_time_not_by_logging_step():
    """A 22-step epoch with step metrics every 50 steps (the old quickstart) printed one line in a whole run; lines
    now follow the clock. Mutation checked by hand: emitting lines only at logging steps (the old rule) left
    ``lines`` with the first-step line alone and failed the count."""
    clock, logged, lines = Clock(), [], []
    sp = StepProgress(50, epochs=2, steps_per_epoch=22, global_batch=32, device=torch.device("cpu"),
                      log_metrics=lambda m, s: logged.append((s, m)), emit=lines.append,
                      line_seconds=30, clock=clock)  # fmt: skip
    _run(sp, clock, epochs=2, steps=22, compute_s=4.0, wait_s=1.0)  # 5 s a step: a line about every 6 steps
    assert logged == []  # 44 global steps, none a multiple of 50
    assert lines[0].startswith("moco-ray: first step done in 5.0s")
    progress = lines[1:]
    assert [ln.split("  ")[1] for ln in progress] == [  # every 30 s of 220 s (global steps 6, 12, ..., 42)
        "step 6/22 (27%)", "step 12/22 (55%)", "step 18/22 (82%)",
        "step 2/22 (9%)", "step 8/22 (36%)", "step 14/22 (64%)", "step 20/22 (91%)",
    ]  # fmt: skip
    assert progress[0] == (  # no logging step yet in the epoch: no loss shown (it would need a sync)
        "epoch 1/2  step 6/22 (27%)  lr 0.1  6 img/s  data wait 20%  ETA epoch 1m20s, run 3m10s"
    )
    assert progress[-1].startswith("epoch 2/")


def test_line_shows_the_loss_read_at_the_latest_logging_step():
    clock, lines = Clock(), []
    sp = StepProgress(2, epochs=1, steps_per_epoch=10, global_batch=8, device=torch.device("cpu"),
                      log_metrics=lambda m, s: None, emit=lines.append, line_seconds=10, clock=clock)  # fmt: skip
    _run(sp, clock, epochs=1, steps=10, compute_s=4.0, wait_s=1.0)
    # lines at steps 2, 4, 6 (10 s apart), each after that step's logging: windows 0..1, 2..3, 4..5
    assert [ln.split("  ")[1:3] for ln in lines[1:4]] == [
        ["step 2/10 (20%)", "loss 0.5000"], ["step 4/10 (40%)", "loss 2.5000"], ["step 6/10 (60%)", "loss 4.5000"],
    ]  # fmt: skip


def test_log_every_auto_gives_a_curve_per_epoch():
    assert log_every(50, 22) == 50 and log_every(-1, 22) == 0
    assert log_every(0, 22) == 2  # the quickstart: 11 points an epoch, 44 in a run (was 1 at every 50)
    assert log_every(0, 5004) == 417 and log_every(0, 3) == 1


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


def test_step_metric_names_leave_loss_and_knn_first_on_mlflow_s_run_page():
    """The installed MLflow UI lists the sections of "prefix/" metric names (sorted) before "Model metrics" (the
    unprefixed ones), and charts within a section by name. Mutation checked by hand: ``STEP_METRIC = "step/{}"``
    (the old names) failed the "/" check."""
    from pathlib import Path

    import mlflow

    (main,) = (Path(mlflow.__file__).parent / "server/js/build/static/js").glob("main.*.js")
    bundle = main.read_text(errors="replace")
    # sections: the named ones sorted, then "Model metrics" (i.NN) and system metrics (i.rx)
    assert "const x=[...Object.keys(w).filter(e=>e!==i.NN&&e!==i.rx).sort(),...[i.NN,i.rx]" in bundle
    assert 'q="Model metrics"' in bundle and 'extractChartSectionName=(e,t="/")' in bundle
    logged = []
    sp = StepProgress(1, epochs=1, steps_per_epoch=2, global_batch=2, device=torch.device("cpu"),
                      log_metrics=lambda m, s: logged.append(m), emit=lambda line: None, clock=Clock())  # fmt: skip
    sp.start_epoch(0, TimedIter([None]))
    sp.after_step(torch.tensor(1.0), 0.1, 1)
    names = sorted([*logged[0], "loss", "knn_top1", "acc1", "lr"])
    assert not any("/" in n for n in names), names
    assert names.index("knn_top1") < names.index("loss") < min(names.index(n) for n in logged[0])
