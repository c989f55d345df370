"""A Ray worker SIGTERMed inside a garbage-collector callback exits, and prints no "Exception ignored" traceback.

Issue #21: at the end of a sweep a finished trial actor printed "Exception ignored in: <function WeakSet...>" with
Ray's ``sigterm_handler`` and ``SystemExit: 1`` between the epoch lines: the SIGTERM Ray sends to a worker it tears
down landed while the worker's main thread ran a weakref callback, where Python can only print the exception (and
the process lived on). Reproduced here with a real actor on the real local instance: its method runs such a
callback (it sleeps there, so the signal lands inside) and the test sends the SIGTERM.
"""

from __future__ import annotations

import os
import signal
import time
import weakref
from pathlib import Path


def _worker_err_log(ray, pid: int) -> Path:
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    found = sorted(logs.glob(f"worker-*-{pid}.err"))
    assert found, f"no worker log for pid {pid} in {logs}"
    return found[0]


def test_sigterm_inside_a_weakref_callback_ends_the_worker_quietly(ray_local, tmp_path):
    ray = ray_local
    marker = tmp_path / "inside-callback"

    @ray.remote(num_cpus=0)
    class Collector:
        def pid(self) -> int:
            return os.getpid()

        def collect_slowly(self, seconds: float) -> str:
            class Box:
                pass

            def slow(_ref: object) -> None:
                marker.write_text("x")
                time.sleep(seconds)

            box = Box()
            ref = weakref.ref(box, slow)
            del box  # the callback runs here, in this (the worker's main) thread
            assert ref() is None
            return "kept running after SIGTERM"

    actor = Collector.remote()
    pid = ray.get(actor.pid.remote(), timeout=60)
    result = actor.collect_slowly.remote(20.0)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline, "the actor never entered its callback"
        time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)

    try:  # the method may finish before the exit: the SIGTERM is sent again once the callback has returned
        ray.get(result, timeout=60)
    except ray.exceptions.RayActorError:
        pass
    deadline = time.monotonic() + 30
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the worker outlived its SIGTERM (it swallowed the exit)"
        time.sleep(0.1)
    err = _worker_err_log(ray, pid).read_text(errors="replace")
    assert "Exception ignored" not in err and "SystemExit" not in err, err[-2000:]


def test_other_unraisable_exceptions_still_reach_the_previous_hook(monkeypatch):
    """Only Ray's SIGTERM exit is handled; any other exception in a callback is still reported as before."""
    import sys

    from moco_ray.jobs import local_ray

    seen: list[type] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))
    local_ray.exit_on_swallowed_sigterm()
    hook = sys.unraisablehook
    local_ray.exit_on_swallowed_sigterm()
    assert sys.unraisablehook is hook  # idempotent: one wrapper, not two

    class Box:
        def __del__(self) -> None:
            raise SystemExit(2)  # not from Ray's handler

    Box()

    class Other:
        def __del__(self) -> None:
            raise ValueError("boom")

    Other()
    assert seen == [SystemExit, ValueError]
