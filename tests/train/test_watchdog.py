"""The stall watchdog fails the thread waiting for a batch, and stays quiet while batches come."""

from __future__ import annotations

import threading
import time

import pytest

from moco_ray.train.watchdog import DataStallError, StallWatchdog


def _stalling(n: int):
    """``n`` batches, then a wait like Ray Data's: short timed waits in a loop, forever."""
    yield from range(n)
    while True:
        threading.Event().wait(0.05)


def test_stalled_stream_fails_fast_with_the_reason():
    dog = StallWatchdog(0.5, rank=3, poll_s=0.05)
    t0 = time.monotonic()
    got = []
    with pytest.raises(DataStallError, match=r"^data\.stall_timeout_s: worker 3 got no batch for 0\.5 s \(after 2"):
        for b in dog.watch(_stalling(2)):
            got.append(b)
    assert got == [0, 1]
    assert time.monotonic() - t0 < 10  # far below a hang; fires after 0.5 s
    assert dog.last is None  # disarmed


def test_steady_stream_and_slow_steps_are_not_stalls():
    dog = StallWatchdog(0.5, poll_s=0.05)
    for _ in dog.watch(range(5)):
        time.sleep(0.7)  # a step longer than the timeout: only the wait for a batch counts
    assert dog.last is None
    time.sleep(0.7)  # disarmed between epochs: no exception arrives later
    assert list(StallWatchdog(0).watch(range(3))) == [0, 1, 2]  # 0 = off
