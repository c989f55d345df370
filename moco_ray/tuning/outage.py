"""The sweep driver's watch on an MLflow tracking server: an outage that outlasts a grace period stops the sweep.

Every trial logs to the server from its trial actor and its rank-0 worker. MLflow's client retries a failed request
for about 4 minutes (7 retries with backoff) and then raises, which would fail the trial and every trial after it,
each recorded nowhere. The driver checks the server's ``/health`` instead (every few seconds, from the Tune loop):
a blip shorter than the grace period is ridden out by those retries; a longer outage stops the sweep the way
Ctrl-C does (``moco_ray.tuning.sweep``), so ``--resume`` reruns the cut trials once the server is back. Not every
call retries (a request cut mid-way by the server's death fails at once), so a trial whose run raises while the
server is down does not fail: it waits (:func:`wait_while_down`) for the driver's stop, which leaves it unfinished
for ``--resume``, and fails only if the server answers again first. sqlite and file stores are not watched (the
driver would fail on them itself).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from moco_ray.tracking.store import is_server, server_problem

GRACE_ENV = "MOCO_RAY_TRACKING_GRACE_S"
# well inside MLflow's ~4 minutes of client retries: the sweep stops before an outage fails any trial
DEFAULT_GRACE_S = 60.0


def wait_while_down(
    uri: str,
    limit: float,
    probe: Callable[..., str | None] = server_problem,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """In a sweep trial whose run just raised: whether the tracking server at ``uri`` is down; if so, wait until it
    answers again or ``limit`` seconds pass (the driver stops the sweep, and so this trial, well before)."""
    if not is_server(uri) or probe(uri, timeout=5.0) is None:
        return False
    deadline = clock() + limit
    while clock() < deadline and probe(uri, timeout=5.0) is not None:
        sleep(2.0)
    return True


class TrackingOutage(RuntimeError):
    """The sweep stopped because its tracking server stayed unreachable; the message says how to continue."""


class TrackingWatch:
    """Polls the server at most every ``every`` seconds; :meth:`poll` turns True once it has failed for ``grace``."""

    def __init__(
        self,
        uri: str,
        grace: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        probe: Callable[..., str | None] = server_problem,
        say: Callable[[str], None] = lambda line: print(line, flush=True),
    ) -> None:
        self.uri, self.clock, self.probe, self.say = uri, clock, probe, say
        self.grace = float(os.environ.get(GRACE_ENV, DEFAULT_GRACE_S)) if grace is None else grace
        self.every = min(10.0, max(self.grace / 4, 0.5))
        self.active = is_server(uri)
        self.next_check = 0.0
        self.since: float | None = None
        self.reason = ""
        self.down = False

    def poll(self) -> bool:
        """True once the server has been unreachable for ``grace`` seconds (and from then on)."""
        if not self.active or self.down:
            return self.down
        now = self.clock()
        if now < self.next_check:
            return False
        self.next_check = now + self.every
        problem = self.probe(self.uri, timeout=min(5.0, self.every))
        if problem is None:
            if self.since is not None:
                self.say(f"[sweep] MLflow server {self.uri} answers again")
            self.since = None
            return False
        if self.since is None:
            self.since, self.reason = now, problem
            self.say(
                f"[sweep] MLflow server {self.uri} is not answering ({problem}); "
                f"the sweep stops if it stays down for {self.grace:g} s"
            )
        self.down = now - self.since >= self.grace
        return self.down

    def message(self, resume_command: str) -> str:
        return (
            f"MLflow server {self.uri} unreachable for {self.grace:g} s ({self.reason}): sweep stopped, its trials "
            f"kept in Tune's experiment; once the server answers, continue with: {resume_command}"
        )
