"""Environment variables set for the length of a call: libraries (MLflow, Ray Tune) that read a switch from the
environment at call time, and nothing left behind for the caller."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ``; on exit restore each variable to its old value, or unset it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
