"""Shard schema (version 1) and the driver-side check of a shard directory (pure pyarrow, no Ray).

`validate_shards` runs before any cluster resource is requested, so a missing, truncated or foreign dataset fails
in a second with one line naming the file, instead of minutes later inside a Ray task.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from moco_ray.data.manifest import Manifest, file_sha256, join, read_manifest, resolve_fs

SCHEMA_VERSION = 1
SHARD_SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary()),  # encoded bytes exactly as in the source (JPEG/PNG/...)
        pa.field("label", pa.int64()),  # index into manifest.classes, -1 when unlabeled
        pa.field("id", pa.string()),  # stable row id: "<split>/<relative path>" or "<dataset>/<split>/<index>"
        pa.field("path", pa.string()),  # source path, or "torchvision:<name>:<split>:<index>"
    ]
)
READ_COLUMNS = ["image", "label", "id"]  # what training and evaluation read of a shard
_ACCEPTED = {
    "image": (pa.binary(), pa.large_binary()),
    "label": (pa.int64(),),
    "id": (pa.string(), pa.large_string()),
    "path": (pa.string(), pa.large_string()),
}
# Up to this many bytes of shards, the default check also verifies sha256 checksums (about a second per GB).
CHECKSUM_AUTO_LIMIT = 4 << 30


def check_schema(schema: pa.Schema, where: str) -> None:
    """ValueError naming the first missing column or wrong column type."""
    missing = [c for c in _ACCEPTED if c not in schema.names]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)}; expected {_describe()}")
    for name, types in _ACCEPTED.items():
        t = schema.field(name).type
        if t not in types:
            raise ValueError(f"{where}: column {name!r} has type {t}, expected {types[0]}")


def _describe() -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in SHARD_SCHEMA)


def validate_shards(root: str | os.PathLike, *, checksums: bool | None = None) -> Manifest:
    """Check a shard directory (local path or URI) and return its manifest.

    Checks: the manifest exists and has the supported schema version; the dataset is not empty; every shard file
    exists with the recorded size; its Parquet footer reads, with the recorded row count and the shard schema.
    ``checksums``: verify each shard's sha256 too (True), skip it (False), or None: verify when the shards
    total at most 4 GiB, so small datasets are fully checked and ImageNet-sized ones are not re-read every run.
    Raises ValueError naming the problem and the file.
    """
    m = read_manifest(root)
    if m.schema_version != SCHEMA_VERSION:
        raise ValueError(f"{root}: manifest schema_version {m.schema_version}, this moco-ray reads {SCHEMA_VERSION}")
    if not m.shards or sum(m.counts.values()) == 0:
        raise ValueError(f"{root}: empty dataset (the manifest lists no rows); re-ingest a source with images")
    fs, base = resolve_fs(root)
    total = sum(s.bytes for s in m.shards)
    verify = checksums if checksums is not None else total <= CHECKSUM_AUTO_LIMIT
    for s in m.shards:
        path = join(base, s.path)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise ValueError(f"{root}: shard {s.path} listed in the manifest is missing")
        if info.size != s.bytes:
            raise ValueError(f"{root}: shard {s.path} has {info.size} bytes, the manifest says {s.bytes} (truncated?)")
        try:
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                schema, rows = pf.schema_arrow, pf.metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{root}: shard {s.path} is not a readable Parquet file ({e})") from None
        check_schema(schema, f"{root}: shard {s.path}")
        if rows != s.rows:
            raise ValueError(f"{root}: shard {s.path} has {rows} rows, the manifest says {s.rows}")
        if verify and file_sha256(path, fs) != s.sha256:
            raise ValueError(f"{root}: shard {s.path} fails its sha256 checksum (modified or corrupt)")
    return m
