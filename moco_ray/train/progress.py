"""Progress inside an epoch: step-level MLflow metrics every N global steps and rank 0's console line with ETA.

GPU contract: the step loop never reads a tensor on the host. The window's loss is summed on the device; at a
logging step (every ``tracking.log_every_steps`` global steps) one ``.tolist()`` reads it, the only extra
host-device sync, and the wall-clock window between two such syncs gives an honest img/s on CUDA too. MLflow
steps are global steps (``step/*`` metrics), so runs with different epoch lengths line up; per-epoch metrics keep
step = epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from moco_ray.evaluation.progress import LINE_SECONDS, eta_seconds, format_duration


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


def log_due(global_step: int, every: int) -> bool:
    """Step metrics are logged at global steps that are multiples of ``every`` (0 = never)."""
    return every > 0 and global_step > 0 and global_step % every == 0


def step_line(
    epoch: int, epochs: int, n: int, steps: int, m: dict[str, float], epoch_eta: float, run_eta: float
) -> str:
    """Rank 0's progress line, e.g. ``epoch 2/100  step 150/5004 (3%)  loss 6.1234  ...  ETA epoch 12m05s``."""
    return (
        f"epoch {epoch + 1}/{epochs}  step {n}/{steps} ({100 * n / steps:.0f}%)  loss {m['step/loss']:.4f}"
        f"  lr {m['step/lr']:.4g}  {m['step/images_per_s']:.0f} img/s  data wait {100 * m['step/data_wait_frac']:.0f}%"
        f"  ETA epoch {format_duration(epoch_eta)}, run {format_duration(run_eta)}"
    )


class StepProgress:
    """Rank 0's step-level metrics (MLflow, every ``every`` global steps) and progress lines (at those steps, at
    most one per ``min_line_seconds``)."""

    def __init__(
        self,
        every: int,
        epochs: int,
        steps_per_epoch: int,
        global_batch: int,
        device: torch.device,
        log_metrics: Callable[[dict[str, float], int], None],
        emit: Callable[[str], None],
        min_line_seconds: float = LINE_SECONDS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.every, self.epochs, self.steps, self.batch = every, epochs, steps_per_epoch, global_batch
        self.log_metrics, self.emit, self.min_line_seconds, self.clock = log_metrics, emit, min_line_seconds, clock
        self.window = torch.zeros(1, dtype=torch.float64, device=device)
        self.last_line = clock()

    def start_epoch(self, epoch: int, timer: TimedIter) -> None:
        self.epoch, self.timer, self.n = epoch, timer, 0
        self.t_epoch = self._reset_window()

    def _reset_window(self) -> float:
        self.window.zero_()
        self.win_steps, self.win_wait, self.t_win = 0, self.timer.wait, self.clock()
        return self.t_win

    def after_step(self, loss: torch.Tensor, lr: float, global_step: int) -> dict[str, float] | None:
        """Account one step; at a logging step log (and maybe print) the window and return its metrics."""
        self.window += loss.detach()  # on the device: no sync
        self.win_steps += 1
        self.n += 1
        if not log_due(global_step, self.every):
            return None
        (loss_sum,) = self.window.tolist()  # the logging step's one host-device sync (see the module docstring)
        now = self.clock()
        seconds = max(now - self.t_win, 1e-9)
        wait = self.timer.wait - self.win_wait
        m = {
            "step/loss": loss_sum / self.win_steps,
            "step/lr": lr,
            "step/images_per_s": self.win_steps * self.batch / seconds,
            "step/data_wait_s": wait,
            "step/data_wait_frac": min(wait / seconds, 1.0),
            "step/epoch": self.epoch,
        }
        self.log_metrics(m, global_step)
        if now - self.last_line >= self.min_line_seconds:
            self.last_line = now
            epoch_eta = eta_seconds(self.n, self.steps, now - self.t_epoch)
            per_step = (now - self.t_epoch) / self.n
            run_eta = epoch_eta + (self.epochs - 1 - self.epoch) * self.steps * per_step
            self.emit(step_line(self.epoch, self.epochs, self.n, self.steps, m, epoch_eta, run_eta))
        self._reset_window()
        return m
