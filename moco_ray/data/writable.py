"""Whether a local place can take a file, checked before the work that would write there (ingest, export, MLflow
artifacts): one ValueError naming the path and the errno, or the file in the way. Pure standard library, so every
layer above data may use it (evaluation may not reach mlflow, where it lived before)."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def write_error(what: str, shown: str | os.PathLike, e: OSError) -> ValueError:
    """The one line for a failed write: ``WHAT: cannot write SHOWN (strerror, errno NAME)``."""
    why = f"{os.strerror(e.errno)}, errno {errno.errorcode.get(e.errno, e.errno)}" if e.errno else str(e)
    return ValueError(f"{what}: cannot write {shown} ({why})")


def check_writable_dir(path: str | os.PathLike, what: str, shown: str | os.PathLike = "") -> None:
    """Create and delete a probe file in `path`, or in the nearest existing directory above it when it is not there
    yet; else a ValueError naming `shown` (default: the path) and the errno, or the file in the way. ``os.access``
    says yes to root even on a read-only mount, and a write under a regular file would only fail after the work."""
    p = Path(path)
    probe = p if p.exists() else next((q for q in p.parents if q.exists()), Path("/"))
    if not probe.is_dir():
        raise ValueError(f"{what}: cannot write {shown or path} ({probe} is not a directory)")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise write_error(what, shown or path, e) from None


__all__ = ["check_writable_dir", "write_error"]
