"""Progress inside an epoch: step-level MLflow metrics every N global steps, and rank 0's console lines by time.

GPU contract: the step loop never reads a tensor on the host. The window's loss is summed on the device; at a
logging step (every ``tracking.log_every_steps`` global steps; 0 = auto, about :data:`POINTS_PER_EPOCH` points an
epoch) one ``.tolist()`` reads it, the only extra host-device sync, and the wall-clock window between two such
syncs gives an honest img/s on CUDA too. MLflow steps are global steps (``step_*`` metrics), so runs with different
epoch lengths line up; per-epoch metrics are at step = the epoch's number.

Console lines come by time (``tracking.progress_every_s``), not by logging step: a 22-step epoch logged every 50
steps printed one line in a whole run. The time check is a host clock read (``time.monotonic``); the line shows the
loss of the latest logging step (read at that step's sync, never here), and img/s / data wait from host timers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from moco_ray.evaluation.progress import LINE_SECONDS, eta_seconds, format_duration

POINTS_PER_EPOCH = 12  # log_every_steps = 0 (auto): step metrics dense enough to draw a curve inside each epoch
# Step metrics are "step_loss", ..., not "step/loss": MLflow 3.17's run page makes a chart section of each prefix
# before "/" and lists those sections (sorted) before "Model metrics", the section of unprefixed names (its
# ChartUtils.getBaseChartAndSectionConfigs / extractChartSectionName): "step/*" put six step charts above loss and
# knn_top1. Unprefixed, they sort after "loss" and "knn_top1" within the one "Model metrics" section.
STEP_METRIC = "step_{}"


class TimedIter:
    """An iterator that adds the time spent waiting in the wrapped iterator's ``next`` to ``wait`` (seconds)."""

    def __init__(self, it: Iterable[Any], clock: Callable[[], float] = time.perf_counter) -> None:
        self._it: Iterator[Any] = iter(it)
        self.clock = clock
        self.wait = 0.0

    def __iter__(self) -> TimedIter:
        return self

    def __next__(self) -> Any:
        t = self.clock()
        try:
            return next(self._it)
        finally:
            self.wait += self.clock() - t


def log_every(setting: int, steps_per_epoch: int) -> int:
    """The step-metric cadence in global steps: ``setting`` when > 0; 0 (auto): about :data:`POINTS_PER_EPOCH`
    points per epoch (at least every step); negative: never (0 returned)."""
    if setting > 0:
        return setting
    if setting < 0:
        return 0
    return max(1, math.ceil(steps_per_epoch / POINTS_PER_EPOCH))


def log_due(global_step: int, every: int) -> bool:
    """Step metrics are logged at global steps that are multiples of ``every`` (0 = never)."""
    return every > 0 and global_step > 0 and global_step % every == 0


def step_line(
    epoch: int,
    epochs: int,
    n: int,
    steps: int,
    loss: float | None,
    lr: float,
    images_per_s: float,
    wait_frac: float,
    epoch_eta: float,
    run_eta: float,
) -> str:
    """Rank 0's progress line, e.g. ``epoch 2/100  step 150/5004 (3%)  loss 6.1234  ...  ETA epoch 12m05s``
    (``loss``: the latest logging step's window; None before the epoch's first one)."""
    shown = f"  loss {loss:.4f}" if loss is not None else ""
    return (
        f"epoch {epoch + 1}/{epochs}  step {n}/{steps} ({100 * n / steps:.0f}%){shown}"
        f"  lr {lr:.4g}  {images_per_s:.0f} img/s  data wait {100 * wait_frac:.0f}%"
        f"  ETA epoch {format_duration(epoch_eta)}, run {format_duration(run_eta)}"
    )


class StepProgress:
    """Rank 0's step-level metrics (MLflow, every ``every`` global steps; 0 = none) and progress lines (every
    ``line_seconds`` of wall clock; 0 = none), plus one line when the run's first step is done (``first_step_line``;
    off in a sweep's trials)."""

    def __init__(
        self,
        every: int,
        epochs: int,
        steps_per_epoch: int,
        global_batch: int,
        device: torch.device,
        log_metrics: Callable[[dict[str, float], int], None],
        emit: Callable[[str], None],
        line_seconds: float = LINE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        first_step_line: bool = True,
    ) -> None:
        self.every, self.epochs, self.steps, self.batch = every, epochs, steps_per_epoch, global_batch
        self.log_metrics, self.emit, self.line_seconds, self.clock = log_metrics, emit, line_seconds, clock
        self.window = torch.zeros(1, dtype=torch.float64, device=device)
        self.started = clock()  # the worker's start: the first step's line says how long it took
        self.first_step_done = not first_step_line
        self.last_line = self.started

    def start_epoch(self, epoch: int, timer: TimedIter) -> None:
        self.epoch, self.timer, self.n = epoch, timer, 0
        self.loss: float | None = None  # the latest logging step's window loss in this epoch (host float)
        self.t_epoch = self._reset_window()

    def _reset_window(self) -> float:
        self.window.zero_()
        self.win_steps, self.win_wait, self.t_win = 0, self.timer.wait, self.clock()
        return self.t_win

    def after_step(self, loss: torch.Tensor, lr: float, global_step: int) -> dict[str, float] | None:
        """Account one step; at a logging step log the window and return its metrics; print a line when due."""
        self.window += loss.detach()  # on the device: no sync
        self.win_steps += 1
        self.n += 1
        m = self._log_window(lr, global_step) if log_due(global_step, self.every) else None
        now = self.clock()
        if not self.first_step_done:  # the run's first step: how long the start-up took (stream, model, batch)
            self.first_step_done = True
            self.emit(f"moco-ray: first step done in {now - self.started:.1f}s (data stream, model, first batch)")
        elif self.line_seconds > 0 and now - self.last_line >= self.line_seconds and self.n < self.steps:
            self.last_line = now
            self.emit(self._line(now, lr))
        return m

    def _log_window(self, lr: float, global_step: int) -> dict[str, float]:
        (loss_sum,) = self.window.tolist()  # the logging step's one host-device sync (see the module docstring)
        now = self.clock()
        seconds = max(now - self.t_win, 1e-9)
        wait = self.timer.wait - self.win_wait
        self.loss = loss_sum / self.win_steps
        m = {
            "loss": self.loss,
            "lr": lr,
            "images_per_s": self.win_steps * self.batch / seconds,
            "data_wait_s": wait,
            "data_wait_frac": min(wait / seconds, 1.0),
            "epoch": self.epoch + 1,  # the epoch's number, as the console prints it
        }
        m = {STEP_METRIC.format(k): v for k, v in m.items()}
        self.log_metrics(m, global_step)
        self._reset_window()
        return m

    def _line(self, now: float, lr: float) -> str:
        """The progress line from host timers only (no tensor read)."""
        elapsed = max(now - self.t_epoch, 1e-9)
        epoch_eta = eta_seconds(self.n, self.steps, elapsed)
        run_eta = epoch_eta + (self.epochs - 1 - self.epoch) * self.steps * elapsed / self.n
        wait_frac = min(self.timer.wait / elapsed, 1.0)
        rate = self.n * self.batch / elapsed
        return step_line(self.epoch, self.epochs, self.n, self.steps, self.loss, lr, rate, wait_frac, epoch_eta,
                         run_eta)  # fmt: skip
