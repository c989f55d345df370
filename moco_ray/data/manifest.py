"""``manifest.json``: what an ingest wrote (shards, counts, classes, skipped files) and where to find it.

The manifest is written last and atomically, so a directory without one is not a finished ingest. Shard paths
are relative to the root, so a shard directory can be copied to object storage and read from there (any
pyarrow / fsspec URI). The row arithmetic of a run lives here too: which rows ``data.limit`` keeps
(`usable_rows`, `split_files`) and how many steps an epoch has (`steps_per_epoch`). A remote location is checked
within a deadline before a run uses it (`probe_remote`, ``MOCO_RAY_REMOTE_TIMEOUT_S``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST_FILE = "manifest.json"
# Seconds a remote location (s3://, gs://, ...) gets to answer a driver-side check before the run is refused: a
# missing bucket or a dead endpoint is one line in seconds, not pyarrow's retries (GCS: 15 minutes) in silence.
REMOTE_TIMEOUT_ENV = "MOCO_RAY_REMOTE_TIMEOUT_S"
DEFAULT_REMOTE_TIMEOUT_S = 20.0
_T = TypeVar("_T")


@dataclass
class ShardInfo:
    path: str  # relative to the shard root, e.g. "train/part-00000.parquet"
    split: str
    rows: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    source: str
    classes: list[str]
    counts: dict[str, int]  # rows per split
    class_counts: dict[str, dict[str, int]]  # split -> class name ("unlabeled" for -1) -> rows
    shards: list[ShardInfo]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    fingerprint: str = ""  # of the source and ingest options; equal fingerprints make a re-ingest a no-op
    options: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    version: str = ""  # moco-ray version that wrote it
    schema_version: int = 1
    root: str = field(default="", compare=False)  # where it was read from (not serialised)

    @property
    def splits(self) -> list[str]:
        return list(self.counts)

    def rows(self, split: str) -> int:
        self.require_split(split)
        return self.counts[split]

    def shards_of(self, split: str) -> list[ShardInfo]:
        self.require_split(split)
        return [s for s in self.shards if s.split == split]

    def require_split(self, split: str) -> None:
        if split not in self.counts:
            known = ", ".join(self.counts) or "none"
            raise ValueError(f"split {split!r} is not in the shards at {self.root or '?'} (splits: {known})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: str = "") -> Manifest:
        """Build from parsed JSON; ValueError naming the first missing or wrongly typed field."""
        check_fields(d)
        d = dict(d)
        d["shards"] = [ShardInfo(**{k: s[k] for k in _SHARD_FIELDS}) for s in d.get("shards", [])]
        known = set(cls.__dataclass_fields__) - {"root"}
        return cls(**{k: v for k, v in d.items() if k in known}, root=root)


# JSON type of each manifest field: (Python type, what the error message calls it, type of the values inside)
_STR, _INT, _OBJ, _LIST = (str, "a string"), (int, "an integer"), (dict, "an object"), (list, "a list")
_FIELDS: dict[str, tuple[tuple[type, str], tuple[type, str] | None]] = {
    "source": (_STR, None),
    "classes": (_LIST, _STR),
    "counts": (_OBJ, _INT),
    "class_counts": (_OBJ, _OBJ),
    "shards": (_LIST, _OBJ),
    "skipped": (_LIST, _OBJ),
    "fingerprint": (_STR, None),
    "options": (_OBJ, None),
    "created": (_STR, None),
    "version": (_STR, None),
    "schema_version": (_INT, None),
}
_REQUIRED = ("source", "classes", "counts", "class_counts", "shards")
_SHARD_FIELDS = {"path": _STR, "split": _STR, "rows": _INT, "bytes": _INT, "sha256": _STR}


def _json_type(v: Any) -> str:
    names = {bool: "a boolean", type(None): "null", str: "a string", int: "an integer", float: "a number"}
    return names.get(type(v)) or ("a list" if isinstance(v, list) else "an object" if isinstance(v, dict) else "?")


def _is(v: Any, kind: tuple[type, str]) -> bool:
    return isinstance(v, kind[0]) and not (kind[0] is int and isinstance(v, bool))


def _require(v: Any, kind: tuple[type, str], name: str) -> None:
    if not _is(v, kind):
        raise ValueError(f"field {name} is {_json_type(v)}, expected {kind[1]}")


def check_fields(d: Any) -> None:
    """ValueError naming the first missing or wrongly typed field of a parsed manifest (unknown fields pass)."""
    if not isinstance(d, dict):
        raise ValueError(f"the top level is {_json_type(d)}, expected an object")
    for name in _REQUIRED:
        if name not in d:
            raise ValueError(f"field {name} is missing")
    for name, (kind, inner) in _FIELDS.items():
        if name not in d:
            continue
        _require(d[name], kind, name)
        if inner is not None:
            entries = d[name].items() if isinstance(d[name], dict) else enumerate(d[name])
            for k, v in entries:
                _require(v, inner, f"{name}[{k!r}]" if isinstance(k, str) else f"{name}[{k}]")
    for k, c in d["class_counts"].items():
        for cls, v in c.items():
            _require(v, _INT, f"class_counts[{k!r}][{cls!r}]")
    for i, s in enumerate(d["shards"]):
        for name, kind in _SHARD_FIELDS.items():
            if name not in s:
                raise ValueError(f"field shards[{i}].{name} is missing")
            _require(s[name], kind, f"shards[{i}].{name}")


def resolve_fs(root: str | os.PathLike, *, timeout_s: float | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a pyarrow / fsspec URI (s3://, gs://, hdfs://, ...).

    ``timeout_s``: for a driver-side check, S3 / GCS clients whose own timeouts and retries end within about that
    long, so an unreachable endpoint gives its own error; training keeps pyarrow's patient defaults.
    """
    root = str(root)
    if "://" not in root:
        return pafs.LocalFileSystem(), str(Path(root).expanduser().resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(root)
    except (ValueError, NotImplementedError) as e:  # a scheme pyarrow lacks (ArrowInvalid is a ValueError): fsspec
        try:
            import fsspec  # lazy: optional dependency, only for schemes pyarrow lacks

            fss, path = fsspec.core.url_to_fs(root)
        except (ImportError, ValueError) as ie:  # no fsspec, an unknown scheme, or its package missing (adlfs)
            raise ValueError(f"{root}: pyarrow cannot open this URI ({e}) and fsspec cannot either ({ie})") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fss)), path
    return (fs if timeout_s is None else _bounded(fs, timeout_s)), path


def _bounded(fs: pafs.FileSystem, timeout_s: float) -> pafs.FileSystem:
    """``fs`` rebuilt from its own options (what pickling uses: region, endpoint, credentials as resolved) with
    per-request timeouts and retries that end within ~``timeout_s``: a check left behind by its deadline then ends
    soon too (pyarrow's S3 finalisation at exit waits for requests in flight). ``fs`` itself when that fails."""
    step = max(1.0, timeout_s / 4)
    try:
        kwargs = dict(fs.__reduce__()[1][0])
        if isinstance(fs, pafs.S3FileSystem):
            kwargs.update(connect_timeout=step, request_timeout=step)
            return pafs.S3FileSystem(**kwargs, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))
        if type(fs).__name__ == "GcsFileSystem":  # pyarrow built without GCS has no class to isinstance against
            return type(fs)(**{**kwargs, "retry_time_limit": timedelta(seconds=step)})
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        pass
    return fs


def remote_timeout_s() -> float:
    """Seconds a remote location gets to answer a check: ``MOCO_RAY_REMOTE_TIMEOUT_S``, default 20."""
    raw = os.environ.get(REMOTE_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_REMOTE_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:  # NaN too
        raise ValueError(f"{REMOTE_TIMEOUT_ENV}: {raw!r} is not a number of seconds > 0")
    return value


def no_answer(what: str, timeout_s: float) -> ValueError:
    """The one-line refusal of a remote location that did not answer in time."""
    return ValueError(
        f"{what} did not answer within {timeout_s:g} s (check the endpoint, the network and the credentials; "
        f"{REMOTE_TIMEOUT_ENV}=SECONDS waits longer)"
    )


def within_deadline(fn: Callable[[], _T], what: str, timeout_s: float) -> _T:
    """``fn()`` in a daemon thread, waited for in 0.1 s slices; ValueError "``what`` did not answer within N s".

    A C++ filesystem call blocked on the network holds the main thread until it returns, Ctrl-C included (seen:
    a gs:// check answered a Ctrl-C after 1000 s); joined in slices, the KeyboardInterrupt lands at once. The
    thread is left behind on a timeout and ends with its own (bounded, see `resolve_fs`) timeouts or the process.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="moco-ray-remote-check", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive():
        if time.monotonic() >= deadline:
            raise no_answer(what, timeout_s)
        thread.join(0.1)
    if "error" in box:
        raise box["error"]
    return box["value"]


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's first line, cut to ``limit`` characters (GCS errors run to kilobytes)."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


# What `probe_remote`'s child process runs: the check, and its one-line refusal (if any) as the last line.
_PROBE_CHILD = """
import sys
from moco_ray.data.manifest import _probe
try:
    _probe(sys.argv[1], sys.argv[2], sys.argv[3] == "write", float(sys.argv[4]))
except ValueError as e:
    print(e)
    sys.exit(1)
"""


def probe_remote(root: str, key: str, *, write: bool = False) -> None:
    """Check that remote location ``root`` (config key ``key``) answers, within `remote_timeout_s`: its bucket
    exists (S3, GCS) and, with ``write``, an object can be written under it and deleted. One-line ValueError
    otherwise: a missing bucket, an endpoint that refuses or never answers, missing credentials.

    The check runs in a child process, killed at the deadline or on Ctrl-C: a pyarrow call blocked on the network
    holds its thread (and Ctrl-C) until it returns, and left running in this process it would hold the exit too:
    pyarrow's S3 shutdown waits for requests in flight (measured: 100 s on an endpoint that never answers), and
    the bucket-region lookup of ``s3://`` and the GCS client (15 minutes) retry with their own, long defaults.
    """
    timeout = remote_timeout_s()
    pkg_root = str(Path(__file__).resolve().parents[2])  # this moco_ray, even when it is not installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-c", _PROBE_CHILD, root, key, "write" if write else "read", str(timeout)]
    pipes = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    child = subprocess.Popen(argv, **pipes, text=True, env=env)
    try:
        child.wait(timeout=timeout)  # Ctrl-C lands at once: wait() polls in short sleeps
    except subprocess.TimeoutExpired:
        raise no_answer(f"{key}: {root}", timeout) from None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        out = child.stdout.read() if child.stdout else ""
        if child.stdout:
            child.stdout.close()
    if child.returncode != 0:
        last = (out.strip().splitlines() or [f"exit code {child.returncode}"])[-1]
        raise ValueError(last if last.startswith(f"{key}: ") else f"{key}: checking {root} failed ({last})")


def _probe(root: str, key: str, write: bool, timeout_s: float) -> None:
    """`probe_remote`'s check itself (in its child process)."""
    try:
        fs, path = resolve_fs(root, timeout_s=timeout_s)  # s3:// without an endpoint looks the bucket's region up
        bucket = path.split("/", 1)[0] if fs.type_name in ("s3", "gcs") else ""
        infos = fs.get_file_info([bucket, path] if bucket else [path])
    except ValueError as e:  # not a URI pyarrow or fsspec can open
        raise ValueError(f"{key}: {e}") from None
    except OSError as e:  # refused, timed out, no credentials, access denied
        raise ValueError(f"{key}: cannot reach {root} ({first_line(e)})") from None
    if bucket and infos[0].type == pafs.FileType.NotFound:
        raise ValueError(f"{key}: {root}: bucket {bucket!r} does not exist (or these credentials cannot see it)")
    if not write:
        return
    probe = join(path, f".moco-ray-write-check-{uuid.uuid4().hex}")
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"moco-ray write check\n")
        fs.delete_file(probe)
    except OSError as e:
        raise ValueError(f"{key}: cannot write {root} ({first_line(e)})") from None


def join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}"


def manifest_exists(root: str | os.PathLike) -> bool:
    fs, base = resolve_fs(root)
    return fs.get_file_info(join(base, MANIFEST_FILE)).type == pafs.FileType.File


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Read ``ROOT/manifest.json``; ValueError naming the problem when it is missing or unreadable."""
    try:
        fs, base = resolve_fs(root)
        path = join(base, MANIFEST_FILE)
        kind = fs.get_file_info(path).type
    except OSError as e:  # unreachable bucket, no credentials, ...
        raise ValueError(f"{root}: cannot read the shard location ({str(e).splitlines()[0]})") from None
    if kind != pafs.FileType.File:
        raise ValueError(
            f"{root}: no {MANIFEST_FILE} (not a finished ingest); create it with `moco-ray ingest SOURCE {root}`"
        )
    try:
        with fs.open_input_stream(path) as f:
            d = json.loads(f.read().decode("utf-8"))
        return Manifest.from_dict(d, root=str(root))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
    except ValueError as e:  # a missing or wrongly typed field
        raise ValueError(f"{path}: unreadable manifest ({e})") from None


def write_manifest(root: str | os.PathLike, manifest: Manifest) -> Path:
    """Write ``ROOT/manifest.json`` atomically (temp file + ``os.replace``); local directories only."""
    path = Path(root) / MANIFEST_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def usable_rows(manifest: Manifest, split: str, limit: int = 0) -> int:
    """Rows of `split` a run reads: all of them, or the first `limit` (``data.limit``, 0 = no limit)."""
    rows = manifest.rows(split)
    return min(rows, limit) if limit > 0 else rows


def check_enough_rows(manifest: Manifest, split: str, global_batch: int, limit: int = 0) -> int:
    """Rows used per epoch; ValueError when they do not fill one global batch (drop_last would leave none)."""
    rows = usable_rows(manifest, split, limit)
    if rows < global_batch:
        lim = f" (data.limit = {limit})" if limit else ""
        raise ValueError(
            f"split {split!r} has {rows} rows{lim}, fewer than one global batch (train.batch_size = {global_batch}); "
            "lower train.batch_size or use more data"
        )
    return rows


def steps_per_epoch(manifest: Manifest, split: str, global_batch: int, limit: int = 0, max_steps: int = 0) -> int:
    """Steps every worker takes per epoch: full global batches only (drop_last), capped by `max_steps` (0 = none).

    ``streaming_split(equal=True)`` gives each of W workers floor(rows / W) rows, and
    floor(floor(rows / W) / (global_batch / W)) == floor(rows / global_batch), so all workers can take this many.
    """
    steps = usable_rows(manifest, split, limit) // global_batch
    return min(steps, max_steps) if max_steps > 0 else steps


def split_files(shards: str, manifest: Manifest, split: str, limit: int = 0) -> tuple[list[str], frozenset[str]]:
    """Shard files of `split` (full paths in the shard filesystem) and the ids to drop to honour `limit`.

    The limit takes the first `limit` rows in manifest order, so the subset is the same every epoch whatever the
    file shuffle; only the last file read may be cut, by id.
    """
    fs, base = resolve_fs(shards)
    infos = manifest.shards_of(split)
    if limit <= 0 or limit >= manifest.rows(split):
        return [join(base, s.path) for s in infos], frozenset()
    files, total = [], 0
    for s in infos:
        files.append(join(base, s.path))
        total += s.rows
        if total >= limit:
            break
    keep_in_last = s.rows - (total - limit)
    if keep_in_last == s.rows:
        return files, frozenset()
    ids = pq.read_table(files[-1], columns=["id"], filesystem=fs)["id"].to_pylist()
    return files, frozenset(ids[keep_in_last:])


def file_sha256(path: str | os.PathLike, fs: pafs.FileSystem | None = None, chunk: int = 8 << 20) -> str:
    """sha256 hex digest of a file, read in chunks: a local path, or a path inside `fs` (see `resolve_fs`)."""
    h = hashlib.sha256()
    with open(path, "rb") if fs is None else fs.open_input_stream(str(path)) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
