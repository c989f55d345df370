"""A training stream that stops delivering batches is reported and fails the run, instead of waiting forever.

The resource check on the driver (moco_ray.jobs.resources) keeps known-bad configurations from starting; this is
the backstop for what it cannot see (a cluster that shrinks, CPUs taken by other jobs). Cost on the hot path: one
``time.monotonic()`` store per batch; a daemon thread looks at it a few times per timeout. No host-device sync.

Raising in the training thread uses ``PyThreadState_SetAsyncExc``: the exception arrives when the thread next runs
Python code, which a thread waiting for a batch does every 0.5 s (Ray Data's batch queue waits in short timeouts
so that interrupts get through).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_log = logging.getLogger(__name__)


class DataStallError(RuntimeError):
    """No batch arrived within ``data.stall_timeout_s``. Raised asynchronously, so created without arguments: the
    message is the one set by the watchdog that fired (one watchdog per worker process)."""

    pending = "data.stall_timeout_s: no batch arrived"

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or (DataStallError.pending,)))


class StallWatchdog:
    """Arms while a loop waits for batches (:meth:`watch`), fails that thread after ``timeout_s`` without one."""

    def __init__(self, timeout_s: float, rank: int = 0, poll_s: float | None = None) -> None:
        self.timeout_s, self.rank = timeout_s, rank
        self.poll_s = poll_s if poll_s is not None else min(5.0, timeout_s / 10)
        self.last: float | None = None  # None: disarmed
        self.count = 0
        self._target: int | None = None
        self._thread: threading.Thread | None = None

    def watch(self, batches: Iterable[T]) -> Iterator[T]:
        """Yield ``batches``, failing the calling thread when the next one takes longer than ``timeout_s``."""
        if self.timeout_s <= 0:
            yield from batches
            return
        self._target, self.count = threading.get_ident(), 0
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moco-ray-stall-watchdog", daemon=True)
            self._thread.start()
        it = iter(batches)
        try:
            while True:
                self.last = time.monotonic()  # armed: waiting for the next batch
                try:
                    batch = next(it)
                except StopIteration:
                    return
                self.last = None  # the step's own time does not count as waiting
                self.count += 1
                yield batch
        finally:
            self.last = None

    def _run(self) -> None:
        while True:
            time.sleep(self.poll_s)
            last = self.last
            if last is not None and time.monotonic() - last > self.timeout_s:
                self.last = None
                self._fire()

    def _fire(self) -> None:
        msg = (
            f"data.stall_timeout_s: worker {self.rank} got no batch for {self.timeout_s:g} s (after {self.count} "
            "batch(es) this epoch): the Ray Data stream makes no progress; check that the cluster leaves whole "
            "CPUs for it (`ray status`; data.cpus, train.cpus_per_worker) or raise data.stall_timeout_s"
        )
        _log.error(msg)
        DataStallError.pending = msg
        if self._target is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._target), ctypes.py_object(DataStallError))
