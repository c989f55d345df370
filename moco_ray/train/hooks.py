"""Test-only fault injection, as an object the loop calls at fixed points (never set by the CLI or the API)."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


class InjectedFailure(RuntimeError):
    """Raised by the test-only fault-injection hook."""


@dataclass
class FaultHooks:
    """``fail_at_step``: rank 0 raises :class:`InjectedFailure` once when the global step reaches it (a marker file
    in ``marker_dir`` makes it fire once per run, across Ray Train's restarts), to exercise FailureConfig;
    ``stop_after_epoch``: every worker stops after this 0-based epoch, as an interrupted run would;
    ``hold_after_epoch``: rank 0, once this epoch is reported (checkpoint persisted, metrics logged), writes its
    pid to ``marker_dir/held-<Ray Train run name>`` and waits up to ``hold_s`` for the test to kill it (SIGKILL,
    as the OOM killer would): the kill lands at a known point of the run without racing it. Once per run: a
    worker group restarted after the kill goes on.
    """

    fail_at_step: int = 0
    stop_after_epoch: int | None = None
    marker_dir: str | None = None
    hold_after_epoch: int | None = None
    hold_s: float = 600.0

    def after_step(self, run_id: str, global_step: int, rank: int) -> None:
        if not self.fail_at_step or global_step != self.fail_at_step or rank != 0:
            return
        marker = Path(self.marker_dir or tempfile.gettempdir()) / f"injected-failure-{run_id}"
        if not marker.exists():
            marker.write_text(str(global_step))
            raise InjectedFailure(f"test-only failure injected at step {global_step}")

    def stop_after(self, epoch: int) -> bool:
        if self.hold_after_epoch == epoch:
            self._hold()
        return self.stop_after_epoch == epoch

    def _hold(self) -> None:
        import ray.train  # lazy: the driver imports this module (jobs.pretrain, via moco_ray.api) without Ray

        ctx = ray.train.get_context()
        marker = Path(self.marker_dir or tempfile.gettempdir()) / f"held-{ctx.get_experiment_name()}"
        if ctx.get_world_rank() != 0 or marker.exists():
            return
        marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + self.hold_s
        while time.monotonic() < deadline:
            time.sleep(0.2)
