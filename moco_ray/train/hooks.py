"""Test-only fault injection, as an object the loop calls at fixed points (never set by the CLI or the API)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path


class InjectedFailure(RuntimeError):
    """Raised by the test-only fault-injection hook."""


@dataclass
class FaultHooks:
    """``fail_at_step``: rank 0 raises :class:`InjectedFailure` once when the global step reaches it (a marker file
    in ``marker_dir`` makes it fire once per run, across Ray Train's restarts), to exercise FailureConfig;
    ``stop_after_epoch``: every worker stops after this 0-based epoch, as an interrupted run would.
    """

    fail_at_step: int = 0
    stop_after_epoch: int | None = None
    marker_dir: str | None = None

    def after_step(self, run_id: str, global_step: int, rank: int) -> None:
        if not self.fail_at_step or global_step != self.fail_at_step or rank != 0:
            return
        marker = Path(self.marker_dir or tempfile.gettempdir()) / f"injected-failure-{run_id}"
        if not marker.exists():
            marker.write_text(str(global_step))
            raise InjectedFailure(f"test-only failure injected at step {global_step}")

    def stop_after(self, epoch: int) -> bool:
        return self.stop_after_epoch == epoch
