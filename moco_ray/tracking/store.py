"""Where runs are recorded: the tracking URI, resolved and checked once on the driver, and one client per URI.

Also the local write checks every driver runs before Ray starts (`check_writable_dir`, `check_artifact_location`):
an unwritable place is one line naming the path and the errno, not an OSError after the run was created.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from moco_ray.data.writable import check_writable_dir

# With a tracking server, MLflow prints "View run NAME at: URL" and "View experiment at: URL" to stdout for every
# run that ends (runs, eval children, each model logged): a sweep's console got several such lines per trial. Set
# for every process that records through moco-ray (driver, trial actors, workers); a user's own value wins. The
# CLI prints where to look once, at the end.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


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
    problem = server_problem(uri)
    if problem is not None:
        raise ValueError(f"tracking.tracking_uri: MLflow server {uri} is unreachable ({problem})")


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where runs of `experiment` in the local store `uri` put their artifacts: the experiment's own location when
    it exists, else MLflow's default for a new one (``./mlruns`` of the driver's cwd for sqlite, the store directory
    for a file store). None for a tracking server, or a sqlite file that is not an MLflow store (`ensure_store`
    says why). Read with sqlite3, read-only: the check must not create or migrate the store."""
    db = sqlite_path(uri)
    if db is None:
        return uri if uri.startswith("file:") or "://" not in uri else None
    if db.is_file():
        try:
            with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
                row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)).fetchone()
        except sqlite3.Error:
            return None
        if row is not None:
            return row[0]
    return str(Path.cwd() / "mlruns")  # MLflow's DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH, resolved in this process


def check_artifact_location(uri: str, experiment: str) -> None:
    """Fail before Ray starts when the runs of `experiment` could not write their artifacts locally (a read-only
    mount, a regular file in the way): otherwise the run would be created, then fail at its config.yaml."""
    path = local_path(artifact_location(uri, experiment))
    if path is not None:
        check_writable_dir(path, f"tracking.experiment {experiment!r}", f"the MLflow artifact location {path}")


def local_path(location: str | None) -> str | None:
    """The local path of an artifact location (a plain path or ``file://`` URI); None for object storage or a
    server's proxied artifacts (``s3://``, ``mlflow-artifacts:``), which no local check can tell about."""
    parsed = urllib.parse.urlparse(location or "")
    if not location or parsed.scheme not in ("", "file"):
        return None
    return urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else location


def is_server(uri: str) -> bool:
    """Whether ``uri`` names an MLflow tracking server (``http(s)://``), not a local sqlite or file store."""
    return uri.startswith(("http://", "https://"))


# MLflow 3.17's UI keeps its GenAI / "Model training" switch in the browser (local storage key
# "mlflow.workflowType", GenAI by default) and lets it win over the experiment's mlflow.experimentKind tag; the
# URL's ``workflowType`` query parameter overrides both (read from the route's search params in its JS bundle,
# mlflow/server/js/build/static/js/main.*.js). Routes are hash routes: /#/experiments/<id>/runs/<run id>.
TRAINING_VIEW_QUERY = "workflowType=machine_learning"
UI_PORT = 5000


def run_page(base: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI at ``base``, opened on the training view (not the GenAI overview)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW_QUERY}"


def where_to_look(uri: str, run_id: str) -> list[str]:
    """Console lines that say where a finished run is: its experiment and the URL of its page; for a local store,
    first the ``mlflow ui`` command that serves it (the URL is where that command serves it)."""
    run = client(uri).get_run(run_id)
    exp_id = run.info.experiment_id
    name = client(uri).get_experiment(exp_id).name
    if is_server(uri):
        return [f"experiment: {name}", f"run page: {run_page(uri, exp_id, run_id)}"]
    base = f"http://127.0.0.1:{UI_PORT}"
    return [
        f"experiment: {name}",
        f"see it: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port {UI_PORT}",
        f"  then open {run_page(base, exp_id, run_id)}",
    ]


def server_problem(uri: str, timeout: float = 5.0) -> str | None:
    """Why the MLflow server at an ``http(s)://`` ``uri`` does not answer its ``/health`` check; None when it does
    (and for any other kind of store). One cheap request with a short timeout, not MLflow's minutes-long retries."""
    if not is_server(uri):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", e))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other store)."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock on ``<db>.lock`` next to a sqlite store (a no-op for other stores).

    MLflow creates and migrates a sqlite store on first use, in whichever process gets there first; two processes
    doing it at once both run the alembic migrations and one of them crashes. The lock file is left in place:
    removing it would let a third process lock a new inode while the second still holds the old one.
    """
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    with open(f"{db}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_migrations() -> Iterator[None]:
    """MLflow's "Creating initial MLflow database tables..." / "Updating database tables" INFO lines, which a
    fresh store prints before the run's first line, stay off the console (its errors still show)."""
    log = logging.getLogger("mlflow.store.db.utils")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def ensure_store(uri: str) -> None:
    """Create (or migrate and check) a sqlite store now, under :func:`store_lock`, so that the Ray workers and
    any other process that opens it later only read an up-to-date schema."""
    if sqlite_path(uri) is None:
        return
    try:
        with store_lock(uri), _quiet_migrations():
            client(uri)  # MlflowClient builds its store eagerly: tables created or schema verified here
    except OSError as e:
        raise ValueError(f"tracking.tracking_uri: cannot use the sqlite store {uri} ({e.strerror or e})") from None
    except Exception as e:  # MLflow's own errors (e.g. a schema from a newer MLflow, not a database file)
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ValueError(f"tracking.tracking_uri: cannot open the sqlite store {uri} ({first})") from None


def open_store(uri: str = "") -> str:
    """The resolved tracking URI, checked (and a sqlite store created): what every driver entry point calls once,
    before Ray starts."""
    resolved = resolve_tracking_uri(uri)
    check_tracking_uri(resolved)
    ensure_store(resolved)
    return resolved


@functools.lru_cache(maxsize=8)
def client(uri: str):
    """The process's one ``MlflowClient`` for ``uri``."""
    from mlflow.tracking import MlflowClient  # lazy: Ray workers import this module on every rank; mlflow only if used

    return MlflowClient(tracking_uri=uri)
