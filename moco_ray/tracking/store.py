"""Where runs are recorded: the tracking URI, resolved and checked once on the driver, and one client per URI."""

from __future__ import annotations

import functools
import os
from pathlib import Path


def resolve_tracking_uri(uri: str = "") -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else MLflow's default store (sqlite:///mlflow.db in the cwd).

    Relative sqlite paths are made absolute so Ray workers, whose cwd differs, write to the same file.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    elif "://" not in uri:  # a plain directory: MLflow's file store
        uri = str(Path(uri).resolve())
    return uri


def check_tracking_uri(uri: str) -> None:
    """Fail fast, before Ray starts, when the tracking store cannot be used."""
    if uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///") :]).parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ValueError(f"tracking.tracking_uri: cannot write the sqlite store in {parent}")
        return
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:  # one cheap request with a short timeout rather than MLflow's long retry loop
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise ValueError(f"tracking.tracking_uri: MLflow server {uri} is unreachable ({reason})") from None


def open_store(uri: str = "") -> str:
    """The resolved tracking URI, checked: what every driver entry point calls once, before Ray starts."""
    resolved = resolve_tracking_uri(uri)
    check_tracking_uri(resolved)
    return resolved


@functools.lru_cache(maxsize=8)
def client(uri: str):
    """The process's one ``MlflowClient`` for ``uri``."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)
