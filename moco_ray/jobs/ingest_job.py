"""`moco-ray ingest`: which ingest runs, and Ray started only once the inputs passed and there is work.

Local SOURCE and OUT: the local ingest (`moco_ray.data.ingest`, threads in this process), unless ``ray`` is asked.
A URI on either side (``s3://``, ``gs://``, ``file://``), or ``ray``: the Ray Data ingest
(`moco_ray.data.ray_ingest`) on the cluster in RAY_ADDRESS / the one running here, else a new local Ray
(`moco_ray.jobs.local_ray.init_ray`). Its checks (credentials, bucket, a writable OUT, what OUT holds) all run
before Ray is started, and a finished ingest of the same source starts no Ray at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from moco_ray.data.ingest import ingest
from moco_ray.data.manifest import Manifest
from moco_ray.data.ray_ingest import DEFAULT_SHARD_MB, ray_ingest
from moco_ray.data.uri_source import is_uri
from moco_ray.jobs.local_ray import init_ray

LOCAL_SHARD_MB = 64.0  # the local ingest's default: a few shards per CIFAR-sized split on one machine


@dataclass(frozen=True)
class IngestOutcome:
    """What `run_ingest` did: the manifest, which ingest ran ("local" or "ray"), and on how many Ray nodes shards
    were written (0: the local ingest, or nothing was to do)."""

    manifest: Manifest
    engine: str
    nodes: int = 0
    already_done: bool = False

    def summary(self, source: str, out: str) -> str:
        """The line the CLI prints."""
        m = self.manifest
        where = f" on {self.nodes} Ray node(s)" if self.nodes else ""
        done = "; already done, nothing to do" if self.already_done else ""
        return f"ingested {source} -> {out}{where}: {m.counts}; skipped {len(m.skipped)} bad file(s){done}"


def uses_ray(source: str | os.PathLike, out: str | os.PathLike, ray: bool = False) -> bool:
    """The Ray ingest when asked, or when either side is a URI (the local ingest reads and writes local paths)."""
    return ray or is_uri(source) or is_uri(out)


def run_ingest(
    source: str,
    out: str,
    *,
    split: str | None = None,
    shard_size_mb: float | None = None,
    strict: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    reencode: str | None = None,
    ray: bool = False,
    progress: bool = True,
    cache_dir: str | None = None,
) -> IngestOutcome:
    """Ingest `source` into `out` with the ingest `uses_ray` picks; every refusal is a ValueError (one line)
    raised before any Ray resource is requested. ``workers``: reader threads (local: in all; Ray: per task);
    ``shard_size_mb``: default 64 locally, 128 with Ray."""
    common = {"split": split, "strict": strict, "overwrite": overwrite, "reencode": reencode, "progress": progress}
    if not uses_ray(source, out, ray):
        size = shard_size_mb or LOCAL_SHARD_MB
        m = ingest(source, out, shard_size_mb=size, num_workers=workers, cache_dir=cache_dir, **common)
        return IngestOutcome(m, "local")
    res = ray_ingest(
        source,
        out,
        shard_size_mb=shard_size_mb or DEFAULT_SHARD_MB,
        threads=workers,
        cache_dir=cache_dir,
        start_ray=init_ray,
        **common,
    )
    return IngestOutcome(res.manifest, "ray", len(set(res.nodes)), res.already_done)
