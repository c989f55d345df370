"""``manifest.json``: what an ingest wrote (shards, counts, classes, skipped files) and where to find it.

The manifest is written last and atomically, so a directory without one is not a finished ingest. Shard paths
are relative to the root, so a shard directory can be copied to object storage and read from there (any
pyarrow / fsspec URI). The row arithmetic of a run lives here too: which rows ``data.limit`` keeps
(`usable_rows`, `split_files`) and how many steps an epoch has (`steps_per_epoch`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST_FILE = "manifest.json"


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


def resolve_fs(root: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a pyarrow / fsspec URI (s3://, gs://, hdfs://, ...)."""
    root = str(root)
    if "://" not in root:
        return pafs.LocalFileSystem(), str(Path(root).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(root)
    except (ValueError, NotImplementedError) as e:  # a scheme pyarrow lacks (ArrowInvalid is a ValueError): fsspec
        try:
            import fsspec  # lazy: optional dependency, only for schemes pyarrow lacks
        except ImportError:
            raise ValueError(f"{root}: pyarrow cannot open this URI ({e}) and fsspec is not installed") from None
        fs, path = fsspec.core.url_to_fs(root)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


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
