"""SOURCE -> shards + manifest as a Ray Data job: the ingest for object storage (``s3://``, ``gs://``) and clusters.

The rows are the local ingest's (`moco_ray.data.ingest`): the same listing, labels, ids and row order, bytes as
found, every file decode-probed, bad files skipped, counted and listed (``strict``: refused, nothing kept), the
same Parquet writer, sha256 per shard, the same manifest and fingerprint. What differs is where the work runs:

- The driver lists the source (a local tree, a tree at a URI, a dataset by name), fingerprints it and checks OUT
  (credentials, bucket, writable, what is there already) before anything else: ``start_ray`` is called only when
  there is work, so a refused input or a finished ingest never starts Ray.
- Rows are cut into shards of about the target size by the listed file sizes; when the data is small for the
  cluster, shards shrink (not below `MIN_SPREAD_MB`) so every CPU gets two. Each shard is one Ray Data task: it
  reads its files with a few threads (object storage answers each GET after tens of ms), probes them, writes the
  shard to a local temp file, hashes it and uploads it; only metadata comes back to the driver.
- Tasks go anywhere in the cluster when SOURCE and OUT are both URIs (or SOURCE is a dataset by name, opened on
  each worker); a local path is this machine's, so then they stay on the driver's node (``file:///shared/...``
  names a mount every node sees).

Atomic without renames (object storage has none; its copy is a second upload): a shard's name carries the
fingerprint (``<split>/part-NNNNN-<fp12>.parquet``), so no other ingest ever overwrites a file a finished manifest
lists; the manifest is written last, in one PUT (an object appears whole or not at all) or with ``os.replace``
locally, and is the commit point. A cut ingest leaves shards no manifest lists and no new manifest: readers still
see the previous ingest, or none. After the commit, shard files no manifest lists (the replaced ingest's, a cut
run's) are deleted. Idempotent: the same ingest again finds its manifest and intact shards and does nothing.
Exclusive on a local OUT (the local ingest's lock); object storage has no lock, so run one ingest per URI at a time.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import ray
from tqdm.auto import tqdm

from moco_ray.data.ingest import (
    LOCK_FILE,
    MB,
    ROW_GROUP_ROWS,
    ROW_ORDER,
    _check_options,
    _check_out,
    _exclusive,
    _loader,
    _ordered_map,
    _refuse_out_inside_source,
    _report_skipped,
    _ShardWriter,
    _shuffled,
    _warn_one_class,
)
from moco_ray.data.manifest import MANIFEST_FILE, Manifest, ShardInfo, join, read_manifest, resolve_fs, write_manifest
from moco_ray.data.schema import SCHEMA_VERSION
from moco_ray.data.sources import ImageFolderSource, Item, Source, default_cache_dir, open_source
from moco_ray.data.uri_source import WRITE_PROBE, UriImageFolderSource, check_writable, first_line, is_uri
from moco_ray.data.uri_source import open_location as open_uri
from moco_ray.version import __version__

log = logging.getLogger(__name__)

DEFAULT_SHARD_MB = 128  # per shard file: few objects per ImageNet (~1,100), reads still fine-grained (4 MB groups)
MIN_SPREAD_MB = 1  # shards shrink to spread small data over the CPUs, not below this
SHARDS_PER_CPU = 2  # for small data: the last task to finish is then a short one
# Reads in flight per task from object storage: a GET answers after ~20 ms, so 16 keep a task near the ~800
# ImageNet-sized decodes/s one CPU probes (benchmarks/RESULTS.md)
URI_THREADS = 16
LOCAL_THREADS = 2  # per task from local disk or a dataset (CPU-bound: the decode probe)
_PART = "part-"
NODE_ID_LABEL = "ray.io/node-id"  # every Ray node carries its id under this label


class ObjectStoreError(RuntimeError):
    """A read from object storage that failed for another reason than a missing object (network, permission,
    throttling after the client's retries): the ingest stops instead of listing the image as bad. The task
    reports it in its result (Ray Data re-raises a task's exception as a generic UserCodeException)."""


@dataclass(frozen=True)
class ShardPlan:
    """One shard: its split, its number in the split and its rows, in the order they are written."""

    split: str
    index: int
    items: list[Item]


@dataclass(frozen=True)
class TaskSpec:
    """What every shard task needs besides its plan: where to write and how to read."""

    out: str  # OUT: an absolute local path or a URI
    token: str  # the fingerprint's first 12 hex digits: in every shard name
    kind: str  # "local" (files on this node), "uri" (objects under `source`), "dataset" (a dataset by name)
    source: str  # the source URI for "uri", the dataset's name for "dataset"
    cache_dir: str | None
    reencode: str | None
    row_group_rows: int
    threads: int


@dataclass(frozen=True)
class ShardResult:
    """What a task reports: the shard it wrote (None when every file of its plan was bad, or on an `error`), the
    bad files in row order, rows per label, the node it ran on, and the ObjectStoreError that stopped it."""

    split: str
    index: int
    shard: ShardInfo | None
    skipped: list[dict[str, str]]
    labels: dict[int, int]
    node: str
    error: str = ""

    @property
    def done(self) -> int:
        return (self.shard.rows if self.shard else 0) + len(self.skipped)


@dataclass
class RayIngestResult:
    manifest: Manifest
    nodes: list[str] = field(default_factory=list)  # the node of each shard written; empty when nothing was to do
    already_done: bool = False


@dataclass
class _Job:
    """An ingest checked and listed on the driver (no Ray yet)."""

    src: Source
    task: TaskSpec
    fs: pafs.FileSystem
    base: str  # OUT inside `fs`
    fingerprint: str
    options: dict[str, Any]
    strict: bool
    items: list[Item]
    sizes: list[int]
    skipped: list[dict[str, str]]
    target_bytes: float
    existing: Manifest | None  # the finished ingest in OUT, if any
    done: bool  # `existing` is this very ingest, intact

    @property
    def pinned(self) -> bool:
        return self.task.kind == "local" or not is_uri(self.task.out)


def ray_ingest(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str | None = None,
    shard_size_mb: float = DEFAULT_SHARD_MB,
    row_group_rows: int = ROW_GROUP_ROWS,
    strict: bool = False,
    overwrite: bool = False,
    reencode: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    cache_dir: str | None = None,
    start_ray: Callable[[], None] = lambda: None,
) -> RayIngestResult:
    """Ingest `source` (ImageFolder dir or URI, ``torchvision:NAME``, ``digits``) into `out` (dir or URI) with Ray.

    Every check runs before ``start_ray`` (the caller's way of starting or joining Ray: the data layer does not
    choose the cluster), which is called only when there is something to write. ``threads``: reads in flight per
    task (default 16 from object storage, 2 otherwise).
    """
    _check_options(shard_size_mb, row_group_rows, reencode)
    out_s = str(out).rstrip("/") if is_uri(out) else str(Path(out).expanduser().resolve())
    fs, base = open_uri(out_s) if is_uri(out_s) else resolve_fs(out_s)  # OUT first: its checks are cheap
    src, kind = _open(source, split, cache_dir)
    _refuse_out_inside(out_s, src)
    existed = True if is_uri(out_s) else _check_out(Path(out_s))
    try:
        with nullcontext() if is_uri(out_s) else _exclusive(Path(out_s)):
            options = {
                "split": split,
                "shard_size_mb": shard_size_mb,
                "row_group_rows": row_group_rows,
                "reencode": reencode,
                "row_order": ROW_ORDER,
            }
            job = _prepare(src, kind, (out_s, fs, base), options, strict, overwrite, cache_dir, threads)
            if job.done:
                log.info("%s: already ingested from %s (same fingerprint); nothing to do", out_s, src.name)
                return RayIngestResult(job.existing, already_done=True)  # type: ignore[arg-type]
            start_ray()
            return _run(job, progress)
    finally:
        if not existed and Path(out_s).is_dir() and not any(Path(out_s).iterdir()):
            Path(out_s).rmdir()  # a failed first ingest into a new local directory leaves nothing behind


def _open(source: str | os.PathLike, split: str | None, cache_dir: str | None) -> tuple[Source, str]:
    """The source and how its tasks read it: "uri" (objects), "local" (files on this node) or "dataset"."""
    if is_uri(source):
        return UriImageFolderSource(str(source), split), "uri"
    src = open_source(source, split=split, cache_dir=cache_dir)
    return src, "local" if isinstance(src, ImageFolderSource) else "dataset"


def _refuse_out_inside(out: str, src: Source) -> None:
    """Shards written inside the image tree would be read as images by the next ingest of it."""
    if not is_uri(out):
        _refuse_out_inside_source(Path(out), src)
    elif isinstance(src, UriImageFolderSource) and (out == src.name or out.startswith(src.name + "/")):
        raise ValueError(
            f"{out}: is inside the source tree {src.name} (a re-run would read the shards as images); "
            "choose an output location outside it"
        )


def _prepare(
    src: Source,
    kind: str,
    where: tuple[str, pafs.FileSystem, str],
    options: dict[str, Any],
    strict: bool,
    overwrite: bool,
    cache_dir: str | None,
    threads: int | None,
) -> _Job:
    """Everything the driver decides before Ray: the fingerprint, OUT's state, the rows in order and their sizes.
    ``where``: OUT as given, its filesystem and its path there."""
    fp = hashlib.sha256(f"{src.fingerprint()}|{sorted(options.items())}|{SCHEMA_VERSION}".encode()).hexdigest()
    out, fs, base = where
    existing, done = _out_state(fs, base, out, fp, overwrite)
    if is_uri(out) and not done:
        check_writable(fs, base, out)
    skipped = src.unlisted()
    if skipped and strict:
        _report_skipped(skipped, src.name, strict)
    items = [it for s in src.splits() for it in _shuffled(src.items(s))]
    task = TaskSpec(
        out=out,
        token=fp[:12],
        kind=kind,
        source=src.name if kind != "local" else "",
        cache_dir=cache_dir,
        reencode=options["reencode"],
        row_group_rows=options["row_group_rows"],
        threads=threads or (URI_THREADS if kind == "uri" else LOCAL_THREADS),
    )
    sizes = _sizes(src, items) if not done else []
    target = options["shard_size_mb"] * MB
    return _Job(src, task, fs, base, fp, options, strict, items, sizes, skipped, target, existing, done)


def _sizes(src: Source, items: list[Item]) -> list[int]:
    """Bytes of each row as listed (files); for a dataset by name, the mean of a few rows loaded here."""
    listing = getattr(src, "_listing", None)  # ImageFolderSource / UriImageFolderSource: split -> [(rel, size, _)]
    if listing is not None:
        size = {f"{s}/{rel}": n for s, rows in listing().items() for rel, n, _ in rows}
        # an id differs from its listed name only for a name that is not UTF-8 (escaped): stat that file
        return [size[it.id] if it.id in size else os.stat(it.file).st_size for it in items]  # type: ignore[arg-type]
    sample = [len(src.load(it)) for it in items[:: max(1, len(items) // 16)][:16]]
    mean = sum(sample) // max(1, len(sample))
    return [mean] * len(items)


def _out_state(fs: pafs.FileSystem, base: str, out: str, fp: str, overwrite: bool) -> tuple[Manifest | None, bool]:
    """(finished ingest in OUT or None, whether it is this very ingest, intact); ValueError when OUT holds
    something else (another ingest without ``overwrite``, files that are not shards)."""
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        raise ValueError(f"{out}: exists and is not a directory")
    if info.type == pafs.FileType.NotFound:
        return None, False
    if fs.get_file_info(join(base, MANIFEST_FILE)).type == pafs.FileType.File:
        try:
            old, why = read_manifest(out), ""
        except ValueError as e:
            old, why = None, str(e)
        if old is not None and old.fingerprint == fp:
            if _intact(fs, base, old):
                return old, True
            log.warning("%s: shards of a previous ingest are damaged; writing them again", out)
            return old, False
        if not overwrite:
            what = f"{out}: already holds an ingest of {old.source} with different content" if old else why
            raise ValueError(f"{what}; pass overwrite=True (--overwrite) to replace it")
        return old, False
    foreign = [_basename(i.path) for i in fs.get_file_info(pafs.FileSelector(base)) if not _ours(fs, i)]
    if foreign and not overwrite:
        raise ValueError(
            f"{out}: not empty and not a moco-ray shard directory ({', '.join(sorted(foreign)[:3])}); "
            "choose an empty directory or pass overwrite=True (--overwrite)"
        )
    return None, False


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _ours(fs: pafs.FileSystem, info: pafs.FileInfo) -> bool:
    """The manifest, the lock, the write probe, or a folder holding only shard files."""
    name = _basename(info.path)
    if name in (MANIFEST_FILE, MANIFEST_FILE + ".tmp", LOCK_FILE, WRITE_PROBE):
        return True
    if info.type != pafs.FileType.Directory:
        return False
    children = fs.get_file_info(pafs.FileSelector(info.path))
    return all(c.type == pafs.FileType.File and _basename(c.path).startswith(_PART) for c in children)


def _intact(fs: pafs.FileSystem, base: str, m: Manifest) -> bool:
    infos = fs.get_file_info([join(base, s.path) for s in m.shards])
    return all(i.type == pafs.FileType.File and i.size == s.bytes for i, s in zip(infos, m.shards))


def spread_target(total_bytes: float, cpus: float, target_bytes: float) -> float:
    """Shard size: the target, or less when fewer than SHARDS_PER_CPU shards per CPU would leave CPUs idle, not
    below MIN_SPREAD_MB (unless the target itself is smaller)."""
    return min(target_bytes, max(MIN_SPREAD_MB * MB, total_bytes / (SHARDS_PER_CPU * max(1.0, cpus))))


def plan_shards(items: list[Item], sizes: list[int], target_bytes: float) -> list[ShardPlan]:
    """Consecutive rows of each split into shards: a shard ends at the row that takes it to the target (the
    local writer's rule, on listed sizes)."""
    plans: list[ShardPlan] = []
    rows: list[Item] = []
    acc, index = 0, Counter[str]()
    for i, (item, size) in enumerate(zip(items, sizes)):
        rows.append(item)
        acc += size
        last = i + 1 == len(items) or items[i + 1].split != item.split
        if acc >= target_bytes or last:
            plans.append(ShardPlan(item.split, index[item.split], rows))
            index[item.split] += 1
            rows, acc = [], 0
    return plans


def _run(job: _Job, progress: bool) -> RayIngestResult:
    """Plan, run the shard tasks, commit the manifest, then delete the shard files no manifest lists."""
    cpus = ray.cluster_resources().get("CPU", 1.0)
    plans = plan_shards(job.items, job.sizes, spread_target(sum(job.sizes), cpus, job.target_bytes))
    where = _placement(job.pinned, job.task.out)
    if job.existing is not None and job.existing.fingerprint == job.fingerprint:
        job.fs.delete_file(join(job.base, MANIFEST_FILE))  # damaged: its shard names are about to be rewritten
    try:
        results = _execute(plans, job.task, where, _bar(len(job.items), job.src.name, progress))
        manifest = _manifest(job, results)
    except KeyboardInterrupt:
        _discard(job)
        raise KeyboardInterrupt(
            f"ingest into {job.task.out} interrupted; nothing was committed (no new manifest): run it again"
        ) from None
    except BaseException:
        _discard(job)
        raise
    _put_manifest(job.fs, job.base, manifest)  # the commit: from here on, nothing of this ingest is deleted
    _collect_garbage(job.fs, job.base, manifest)
    _warn_one_class(manifest)
    return RayIngestResult(manifest, [r.node for r in results if r.shard is not None])


def _placement(pinned: bool, out: str) -> dict[str, str] | None:
    """The shard tasks' label selector: this node (Ray labels every node with its id) when a local path is
    involved (ValueError when this node has no CPU for them, e.g. a cluster's head); None: anywhere (Ray Data
    spreads them)."""
    if not pinned:
        return None
    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node and n["Alive"]), 0)
    if cpus < 1:
        raise ValueError(
            f"ingest into {out}: a local SOURCE or OUT is this machine's, and this Ray node has no CPU for the "
            "ingest tasks (a cluster's head?); use URIs (s3://...) for both, or run it where the files are"
        )
    return {NODE_ID_LABEL: node}


def _bar(total: int, name: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=f"ingest {name}", unit="img", mininterval=1.0, disable=not enabled or total < 1000)


def _execute(plans: list[ShardPlan], task: TaskSpec, where: dict[str, str] | None, bar: tqdm) -> list[ShardResult]:
    """One Ray Data task per shard plan (plans and results travel pickled: names that are not UTF-8 and typed
    results pass through Arrow as bytes)."""
    results = []
    with _quiet_data_context(), bar:
        ds = ray.data.from_items([{"plan": pickle.dumps(p)} for p in plans], override_num_blocks=len(plans))
        ds = ds.map_batches(
            write_shards,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"task": task},
            num_cpus=1,
            label_selector=where,
        )
        for row in ds.iter_rows():
            result: ShardResult = pickle.loads(row["result"])
            if result.error:
                raise ValueError(f"ingest stopped: {result.error}; nothing was committed") from None
            results.append(result)
            bar.update(result.done)
    if len(results) != len(plans):
        raise RuntimeError(f"ingest: {len(plans)} shard tasks ran but {len(results)} reported")
    return results


@contextmanager
def _quiet_data_context() -> Iterator[None]:
    """No Ray Data progress bars or execution banner: the ingest prints its own progress line."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def _manifest(job: _Job, results: list[ShardResult]) -> Manifest:
    """The manifest of the shards written, after the local ingest's checks (bad files with ``strict``, no rows)."""
    order = {s: i for i, s in enumerate(job.src.splits())}
    results = sorted(results, key=lambda r: (order[r.split], r.index))
    skipped = job.skipped + [s for r in results for s in r.skipped]
    counts: Counter[str] = Counter()
    class_counts: dict[str, Counter[str]] = {s: Counter() for s in job.src.splits()}
    classes = job.src.classes
    for r in results:
        for label, n in r.labels.items():
            counts[r.split] += n
            class_counts[r.split][classes[label] if 0 <= label < len(classes) else "unlabeled"] += n
    _report_skipped(skipped, job.src.name, job.strict)
    shards = [r.shard for r in results if r.shard is not None]
    if not shards:
        raise ValueError(f"{job.src.name}: no valid images found; nothing to ingest")
    return Manifest(
        source=job.src.name,
        classes=list(classes),
        counts={s: counts[s] for s in job.src.splits()},
        class_counts={s: dict(sorted(c.items())) for s, c in class_counts.items()},
        shards=shards,
        skipped=skipped,
        fingerprint=job.fingerprint,
        options=job.options,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        version=__version__,
        schema_version=SCHEMA_VERSION,
        root=job.task.out,
    )


def _put_manifest(fs: pafs.FileSystem, base: str, manifest: Manifest) -> None:
    """Locally temp file + ``os.replace``; in object storage one upload, visible whole or not at all."""
    if isinstance(fs, pafs.LocalFileSystem):
        write_manifest(base, manifest)
        return
    with fs.open_output_stream(join(base, MANIFEST_FILE)) as f:
        f.write((json.dumps(manifest.to_dict(), indent=1) + "\n").encode())


def _shard_files(fs: pafs.FileSystem, base: str) -> list[str]:
    """Paths (relative to `base`) of every shard file in OUT's folders, listed or not."""
    found = []
    for d in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        if d.type != pafs.FileType.Directory:
            continue
        for f in fs.get_file_info(pafs.FileSelector(d.path)):
            name = _basename(f.path)
            if f.type == pafs.FileType.File and name.startswith(_PART) and ".parquet" in name:
                found.append(f"{_basename(d.path)}/{name}")
    return found


def _collect_garbage(fs: pafs.FileSystem, base: str, manifest: Manifest) -> None:
    """After the commit: delete the shard files the manifest does not list (a replaced ingest's, a cut run's)."""
    keep = {s.path for s in manifest.shards}
    emptied = set()
    for rel in _shard_files(fs, base):
        if rel not in keep:
            fs.delete_file(join(base, rel))
            emptied.add(rel.split("/", 1)[0])
    if isinstance(fs, pafs.LocalFileSystem):  # object storage has no folders to leave behind
        for d in emptied:
            if not any(Path(base, d).iterdir()):
                Path(base, d).rmdir()


def _discard(job: _Job) -> None:
    """After a failure: delete this ingest's shard files (best effort; a later ingest deletes what is left)."""
    try:
        for rel in _shard_files(job.fs, job.base):
            if rel.endswith(f"-{job.task.token}.parquet"):
                job.fs.delete_file(join(job.base, rel))
    except OSError as e:
        log.warning("%s: could not delete this ingest's shards (%s); the next ingest will", job.task.out, e)


# ---- the shard tasks (run in Ray workers) ----


def write_shards(batch: pa.Table, task: TaskSpec) -> pa.Table:
    """Ray Data batch function: each row a pickled ShardPlan in, a pickled ShardResult out."""
    results = [pickle.dumps(write_shard(pickle.loads(p), task)) for p in batch["plan"].to_pylist()]
    return pa.table({"result": pa.array(results, type=pa.binary())})


def write_shard(plan: ShardPlan, task: TaskSpec) -> ShardResult:
    """Read, probe and write one shard: with the local ingest's loader and Parquet writer into a temp file,
    hashed there, then put at ``OUT/<split>/part-NNNNN-<token>.parquet``. An object that cannot be read (other
    than missing) or a shard that cannot be written is the result's `error`, reported by the driver in one line."""
    node = ray.get_runtime_context().get_node_id()
    rel = f"{plan.split}/{_PART}{plan.index:05d}-{task.token}.parquet"
    with tempfile.TemporaryDirectory(prefix="moco-ray-shard-") as tmp:
        writer = _ShardWriter(Path(tmp), float("inf"), task.row_group_rows)
        try:
            skipped, labels = _fill(writer, plan, task)
            infos = writer.close()
            if infos:
                local, info = writer.done[0]  # the temp file, and its rows, size and sha256
                _upload(local, task.out, rel)
        except ObjectStoreError as e:
            writer.abort()
            return ShardResult(plan.split, plan.index, None, [], {}, node, error=str(e))
        except OSError as e:  # reads are the loader's (a bad file); this is the temp file or the upload
            writer.abort()
            why = f"cannot write {task.out}/{rel} ({e.strerror or first_line(e)})"
            return ShardResult(plan.split, plan.index, None, [], {}, node, error=why)
        except BaseException:
            writer.abort()
            raise
    shard = (
        ShardInfo(path=rel, split=plan.split, rows=info.rows, bytes=info.bytes, sha256=info.sha256) if infos else None
    )
    return ShardResult(plan.split, plan.index, shard, skipped, labels, node)


def _fill(writer: _ShardWriter, plan: ShardPlan, task: TaskSpec) -> tuple[list[dict[str, str]], dict[int, int]]:
    """Every row of `plan` read, probed and added to `writer` in order: (bad files, rows per label)."""
    load = _loader(_Reader(task), task.reencode)  # type: ignore[arg-type]
    skipped: list[dict[str, str]] = []
    labels: Counter[int] = Counter()
    for item, data, reason in _ordered_map(load, plan.items, task.threads):
        if data is None:
            skipped.append({"path": item.path, "reason": reason})
            continue
        writer.add(item, data)
        labels[item.label] += 1
    return skipped, dict(labels)


def _upload(local: Path, out: str, rel: str) -> None:
    fs, base = _out_fs(out)
    dest = join(base, rel)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dest)
        return
    with open(local, "rb") as src, fs.open_output_stream(dest) as dst:
        shutil.copyfileobj(src, dst, 8 * MB)


@functools.lru_cache(maxsize=4)
def _out_fs(out: str) -> tuple[pafs.FileSystem, str]:
    return resolve_fs(out)  # once per worker process: an S3 client is not free to make


class _Reader:
    """How a shard task reads its rows' bytes: local files, objects under the source URI, or a dataset's rows."""

    def __init__(self, task: TaskSpec) -> None:
        self.task = task

    def load(self, item: Item) -> bytes:
        if self.task.kind == "local":
            return Path(item.file).read_bytes()  # type: ignore[arg-type]
        if self.task.kind == "dataset":
            return _dataset(self.task.source, item.split, self.task.cache_dir).load(item)
        fs, _ = _out_fs(self.task.source)
        try:
            with fs.open_input_stream(item.file) as f:  # type: ignore[arg-type]
                return f.read()
        except FileNotFoundError:
            raise  # deleted since it was listed: a bad file like any other
        except OSError as e:
            raise ObjectStoreError(f"{item.path}: read failed ({first_line(e)})") from None


@functools.lru_cache(maxsize=8)
def _dataset(name: str, split: str, cache_dir: str | None) -> Source:
    """A dataset by name, opened once per worker process; a torchvision one under a lock on its cache folder, so
    the workers of one node download it once."""
    if not name.startswith("torchvision:"):
        return open_source(name, split=split)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".moco-ray-download.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return open_source(name, split=split, cache_dir=str(root))
