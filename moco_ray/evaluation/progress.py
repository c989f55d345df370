"""Progress lines with an ETA for long loops (feature extraction, the linear probe, training epochs).

Pure Python: the caller says how far it is, and gives the clock and where lines go, so cadence and formatting are
testable without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable

LINE_SECONDS = 30.0  # at most one progress line this often, so a fast loop does not flood the console


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``; ``?`` for an unknown (negative or non-finite) duration."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def eta_seconds(done: int, total: int, elapsed: float) -> float:
    """Time left at the rate so far; inf before the first item."""
    if done <= 0:
        return float("inf")
    return max(total - done, 0) * elapsed / done


class Progress:
    """Counts items of a known total and emits ``"<label> done/total (pct)  <extra>  ETA t"`` lines.

    A line is due every ``every`` items (at least one per loop when ``every`` is 0 = only at the end) but no more
    often than ``min_seconds``; the last item always gets one.
    """

    def __init__(
        self,
        label: str,
        total: int,
        emit: Callable[[str], None],
        every: int = 1,
        min_seconds: float = LINE_SECONDS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.label, self.total, self.emit, self.every, self.min_seconds = label, total, emit, every, min_seconds
        self.clock = clock
        self.start = self.last = clock()
        self.done = 0

    def update(self, n: int = 1, extra: str = "") -> bool:
        """Advance by ``n`` items; emit a line when one is due. Returns whether it emitted."""
        self.done += n
        now = self.clock()
        last_item = self.done >= self.total > 0
        due = (self.every > 0 and self.done % self.every == 0 and now - self.last >= self.min_seconds) or last_item
        if not due:
            return False
        self.last = now
        self.emit(self.line(now, extra))
        return True

    def line(self, now: float, extra: str = "") -> str:
        elapsed = now - self.start
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total > 0 else ""
        tail = f"  {extra}" if extra else ""
        if self.done >= self.total > 0:
            return f"{self.label} {self.done}/{self.total}{pct}{tail}  took {format_duration(elapsed)}"
        eta = format_duration(eta_seconds(self.done, self.total, elapsed))
        return f"{self.label} {self.done}/{self.total}{pct}{tail}  ETA {eta}"
