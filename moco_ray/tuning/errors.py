"""A failed trial's error in one line: what the sweep prints when a trial fails and tags its child run with."""

from __future__ import annotations

import contextlib
from typing import Any


def describe_error(err: BaseException | None) -> str:
    """``Type: first line`` of the root cause, unwrapping Ray's task/actor errors and Train's worker errors."""
    if err is None:
        return "unknown error"
    for _ in range(10):
        failures = getattr(err, "worker_failures", None)
        nxt = next(iter(failures.values()), None) if isinstance(failures, dict) and failures else None
        nxt = nxt or getattr(err, "cause", None) or err.__cause__
        if not isinstance(nxt, BaseException) or nxt is err:
            break
        err = nxt
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:500]


def trial_error(trial: Any) -> str:
    """:func:`describe_error` of a Tune trial's error (the pickled exception, else the one Tune kept)."""
    err = None
    with contextlib.suppress(Exception):
        err = trial.get_pickled_error()
    if err is None:
        with contextlib.suppress(Exception):
            err = trial.get_error()
    return describe_error(err)
