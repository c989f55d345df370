"""Everything a run needs checked and normalised on the driver, once, before any cluster resource is requested.

A driver runs, in this order: `ingest_missing_shards` (the one step that writes data: the quickstart's first-run
ingest, announced), `prepare` (checks only), then starts Ray. Both check the tracking store and the storage first
(`check_targets`), so a refused input is refused before anything is ingested, and `prepare` creates a sqlite
tracking store last, once everything passed: a refused input leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import torch

from moco_ray.config import Config, absolute
from moco_ray.data.manifest import (
    Manifest,
    check_enough_rows,
    first_line,
    join,
    manifest_exists,
    probe_remote,
    remote_timeout_s,
    resolve_fs,
    within_deadline,
)
from moco_ray.data.schema import validate_shards
from moco_ray.data.writable import check_writable_dir
from moco_ray.jobs.resources import Needs, check_fits, current_view
from moco_ray.tracking.store import check_artifact_location, check_tracking_uri, ensure_store, resolve_tracking_uri
from moco_ray.train.checkpoint import STATE_FILE, is_complete


@dataclass(frozen=True)
class Prepared:
    """The checked tracking store, the writable storage root and the validated shards' manifest.

    A sweep prepares once and hands this to every trial, so trials neither re-probe the tracking server nor
    re-hash the shards.
    """

    tracking_uri: str
    storage_path: str
    manifest: Manifest

    def serves(self, cfg: Config) -> bool:
        """Whether ``cfg`` points at the same store, storage and shards (a trial's overrides may change them)."""
        return (
            resolve_tracking_uri(cfg.tracking.tracking_uri) == self.tracking_uri
            and storage_path(cfg) == self.storage_path
            and absolute(cfg.data.shards) == self.manifest.root
        )


def with_absolute_paths(cfg: Config) -> Config:
    """The config with local data and storage paths absolute: workers run in another cwd."""
    data = dataclasses.replace(cfg.data, shards=absolute(cfg.data.shards))
    if cfg.data.source and Path(cfg.data.source).exists():
        data = dataclasses.replace(data, source=absolute(cfg.data.source))
    return dataclasses.replace(cfg, data=data)


def storage_path(cfg: Config) -> str:
    p = cfg.train.storage_path or os.environ.get("MOCO_RAY_STORAGE_PATH") or str(Path.cwd() / "moco-ray-runs")
    return absolute(p)


def check_writable(path: str) -> None:
    """Create-and-delete a probe file in the nearest existing directory: ``os.access`` says yes to root for any
    path, even one under a regular file or on a read-only mount, and the run would only fail at its first
    checkpoint. Object storage (s3://, gs://, ...): a small object written and deleted under ``path``, within
    `remote_timeout_s` (a missing bucket or a dead endpoint would otherwise fail the run at its first checkpoint,
    after Ray started)."""
    if "://" in path and not path.startswith("file:"):
        probe_remote(path, "train.storage_path", write=True)
        return
    check_writable_dir(resolve_fs(path)[1] if "://" in path else path, "train.storage_path", path)  # file:///x -> /x


def check_targets(cfg: Config) -> tuple[str, str]:
    """The tracking URI and storage root, resolved and checked, and ``data.shards`` named: one clear error each,
    before anything is written."""
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    check_tracking_uri(uri)
    check_artifact_location(uri, cfg.tracking.experiment)
    store = storage_path(cfg)
    check_writable(store)
    if not cfg.data.shards:
        raise ValueError("data.shards: no dataset given; ingest one with `moco-ray ingest SOURCE OUT`")
    if "://" in cfg.data.shards:  # before anything reads it: a dead endpoint answers in seconds, not minutes
        probe_remote(cfg.data.shards, "data.shards")
    return uri, store


def ingest_missing_shards(cfg: Config, known: Prepared | None = None) -> Manifest | None:
    """The drivers' explicit ingest step: ``data.source`` into ``data.shards`` when these hold no finished ingest
    yet (the quickstart's first run), announced with one line; the new manifest, or None when there was nothing
    to do (no ``data.source``, the shards exist, or ``known`` (a sweep's prepared inputs) serves ``cfg``).

    Runs before `prepare`, which validates what was written; the targets are checked first, so a refused input
    is refused before anything is ingested.
    """
    d = cfg.data
    if (known is not None and known.serves(cfg)) or not d.source:
        return None
    check_targets(cfg)
    if manifest_exists(d.shards):
        return None
    print(f"moco-ray: ingesting {d.source} into {d.shards} (first run; later runs reuse the shards)", flush=True)
    from moco_ray.jobs.ingest_job import run_ingest  # lazy: it imports Ray (moco_ray.api stays Ray-free)

    return run_ingest(d.source, d.shards).manifest  # a URI source or shards: the Ray Data ingest


def prepare(cfg: Config, known: Prepared | None = None) -> Prepared:
    """Tracking store, storage and shards checked (one clear error each), or ``known`` when it serves ``cfg``.

    Checks only: shards missing here are refused (`ingest_missing_shards` runs before, for a config that names a
    ``data.source``). A sqlite store is created last, once everything else passed: a refused input leaves nothing
    behind.
    """
    if known is not None and known.serves(cfg):
        check_enough_rows(known.manifest, cfg.data.train_split, cfg.train.batch_size, cfg.data.limit)
        return known
    uri, store = check_targets(cfg)
    manifest = validate_shards(cfg.data.shards)
    check_enough_rows(manifest, cfg.data.train_split, cfg.train.batch_size, cfg.data.limit)
    ensure_store(uri)
    return Prepared(uri, store, manifest)


def check_resources(cfg: Config, driver_cpu: float = 0.0, what: str = "the run") -> Needs | None:
    """The run's resources (Train workers, data-stream CPUs, a trial's ``driver_cpu``) against the cluster (and
    its autoscaler's node types): a one-line ValueError when they cannot fit, instead of a run that waits forever.

    ``MOCO_RAY_ALLOW_PENDING_GPUS=1`` covers an autoscaling cluster whose node types cannot be read (neither the
    GCS nor a launcher YAML has them): a GPU run is then not checked, since its GPUs may still come.
    Returns the checked ``resources.Needs`` (None when not checked).
    """
    view = current_view()
    pending_ok = os.environ.get("MOCO_RAY_ALLOW_PENDING_GPUS") == "1"
    if cfg.train.use_gpu and pending_ok and not view.autoscaling and not any(n["GPU"] for n in view.nodes):
        print("moco-ray: resource check skipped: no GPU yet and the autoscaler's node types are unknown")
        return None
    return check_fits(cfg, view, driver_cpu, what)


def _gpu_shortage(cfg: Config, gpus: float) -> str | None:
    if gpus >= cfg.train.num_workers or os.environ.get("MOCO_RAY_ALLOW_PENDING_GPUS") == "1":
        return None
    return (
        f"train.use_gpu: {cfg.train.num_workers} GPU worker(s) asked for but the Ray cluster has {gpus:g} GPU(s); "
        "set train.use_gpu=false, or MOCO_RAY_ALLOW_PENDING_GPUS=1 on an autoscaling cluster"
    )


def starts_local_ray() -> bool:
    """Whether ``init_ray`` would start a new local Ray instance (no RAY_ADDRESS, no running cluster)."""
    import ray  # lazy: seconds to import; the checks before it (and `import moco_ray.api`) need no Ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    if address == "local":
        return True
    if address is not None:
        return False
    try:  # the `ray start` cluster that ray.init() would join, if any
        from ray._private.services import canonicalize_bootstrap_address  # lazy: as `import ray` above

        return canonicalize_bootstrap_address(None) is None
    except Exception:  # unknown: leave it to the check after ray.init
        return False


def check_local_gpus(cfg: Config) -> None:
    """Before Ray starts: a local Ray gets this machine's GPUs, so count them now rather than after a 30 s start."""
    if not cfg.train.use_gpu or not starts_local_ray():
        return
    msg = _gpu_shortage(cfg, torch.cuda.device_count())
    if msg:
        raise ValueError(msg)


def knn_available(cfg: Config, manifest: Manifest) -> bool:
    """The kNN monitor needs both labelled splits; without them it is off (and said so)."""
    wanted = {cfg.data.knn_train_split, cfg.data.knn_test_split}
    ok = cfg.eval.knn_every > 0 and wanted <= set(manifest.splits)
    if cfg.eval.knn_every > 0 and not ok:
        print(f"moco-ray: kNN monitor off: the shards lack split(s) {sorted(wanted - set(manifest.splits))}")
    return ok


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest ``checkpoint_*`` directory of ``run_dir`` (a local path or a URI: s3://, gs://, file://, ...)
    holding a complete state file, as a path or URI. A newer one cut short (the run was stopped while Ray copied it
    into storage) is skipped, and said so. Object storage answers within `remote_timeout_s` or the resume is
    refused in one line."""
    if not run_dir:
        return None
    if "://" not in run_dir:
        return _latest_in(run_dir, None)
    if not run_dir.startswith("file:"):  # a dead endpoint: refused in seconds, and Ctrl-C works
        probe_remote(run_dir, "train.storage_path")
    timeout = remote_timeout_s()
    try:
        return within_deadline(lambda: _latest_in(run_dir, timeout), f"train.storage_path: {run_dir}", timeout)
    except OSError as e:
        raise ValueError(f"train.storage_path: cannot read the checkpoints in {run_dir} ({first_line(e)})") from None


def _latest_in(run_dir: str, timeout_s: float | None) -> str | None:
    fs, base = resolve_fs(run_dir, timeout_s=timeout_s)
    entries = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    dirs = [e for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_")]
    states = fs.get_file_info([join(d.path, STATE_FILE) for d in dirs])
    cands = [(s.mtime_ns or 0, d.base_name, s.path) for d, s in zip(dirs, states) if s.type == pafs.FileType.File]
    for _, name, state in sorted(cands, reverse=True):
        if _whole(fs, state):
            return f"{run_dir.rstrip('/')}/{name}" if "://" in run_dir else str(Path(run_dir) / name)
        print(f"moco-ray: skipping {name}: its {STATE_FILE} is incomplete (the run stopped while it was written)")
    return None


def _whole(fs: pafs.FileSystem, path: str) -> bool:
    """`is_complete` read through ``fs`` (only the zip's end is read, not the whole state). A file cut short can
    send zipfile's seek before the start: pyarrow's ArrowInvalid, where a local file gives BadZipFile."""
    with fs.open_input_file(path) as f:
        try:
            return is_complete(f)
        except pa.ArrowInvalid:
            return False
