"""SOURCE -> ``OUT/<split>/part-NNNNN.parquet`` + ``OUT/manifest.json`` (schema in `moco_ray.data.schema`).

- Rows are written in a fixed permutation of the source order (see ROW_ORDER); ids stay stable.
- Bytes are stored as found (no re-encode unless ``reencode`` is asked), uncompressed in the ``image`` column
  (JPEG/PNG do not compress further; compressing would only cost CPU on every read).
- Each file is validated (header check + full decode); bad files are skipped, counted, listed in the manifest and
  warned about, or, with ``strict``, raise a ValueError naming them and nothing is written.
- Atomic: shards are written as ``*.tmp`` and renamed once all are complete, the manifest last, so a directory
  without a manifest is never mistaken for a finished ingest.
- Idempotent: the manifest keeps a fingerprint of the source (file list, sizes, mtimes) and the options; the same
  ingest again is a no-op; a different one into a finished OUT is refused unless ``overwrite``.
- Exclusive: one ingest at a time writes into an OUT (an ``flock`` on ``OUT/.moco-ray-ingest.lock``); another
  one started meanwhile fails at once with one line naming the holder's pid.
- An ImageFolder class directory without files is refused (it would still take a label); a source of one class
  is ingested with one warning (every accuracy on it would be 1.0).
- Symlinks are followed; dangling ones and loops are skipped and listed like bad files. An OUT inside the source
  tree is refused (its shards would be read as images next time).
- A write that fails (disk full, read-only mount, a parent that is a file) is one ValueError naming the path and
  the errno; what this ingest wrote is removed (a previous ingest in OUT stays as it was unless the failure came
  after its replacement had started: then OUT holds no finished ingest at all, never a half-written one).
- File names that are not UTF-8 are ingested like any other (see `moco_ray.data.sources`); 16-bit and float
  images are re-encoded (``reencode``) by the 0..255 rule of `moco_ray.data.decode.to_rgb`.
- Parallel: files are read and validated by a thread pool (PIL releases the GIL while decoding) in a bounded
  window, so memory stays flat on ImageNet-sized trees.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from moco_ray.data.decode import CorruptImageError, to_rgb, verify_image
from moco_ray.data.manifest import (
    MANIFEST_FILE,
    Manifest,
    ShardInfo,
    file_sha256,
    read_manifest,
    write_manifest,
)
from moco_ray.data.schema import SCHEMA_VERSION, SHARD_SCHEMA
from moco_ray.data.sources import Item, Source, open_source
from moco_ray.version import __version__

log = logging.getLogger(__name__)

MB = 1 << 20
ROW_GROUP_ROWS = 1024
ROW_GROUP_BYTES = 4 * MB  # a row group ends at whichever limit comes first: small reads for streaming
REENCODE = (None, "jpeg", "png")
# Rows are written in a fixed pseudo-random order (not class by class as a tree lists them), so every shard and
# row group mixes classes, the file shuffle + local buffer give class-mixed batches, and `data.limit` /
# `eval.knn_max_bank` (the first N rows) are a random, roughly class-balanced subset.
ROW_ORDER = "permuted-seed0"

_PART = "part-"
LOCK_FILE = ".moco-ray-ingest.lock"  # held (flock) by the one ingest writing into a directory
T = TypeVar("T")
R = TypeVar("R")


def ingest(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str | None = None,
    shard_size_mb: float = 64,
    row_group_rows: int = ROW_GROUP_ROWS,
    strict: bool = False,
    overwrite: bool = False,
    num_workers: int | None = None,
    reencode: str | None = None,
    progress: bool = True,
    cache_dir: str | None = None,
) -> Manifest:
    """Ingest `source` (ImageFolder dir, ``torchvision:cifar10|cifar100|stl10``, or ``digits``) into `out`.

    ``split`` ingests only that split (for a flat ``class/image`` tree: the name of its one split).
    Returns the manifest (the existing one when the same ingest was already done).
    """
    uri = next((str(p) for p in (source, out) if "://" in str(p)), None)
    if uri:  # object storage: the Ray Data ingest (moco_ray.data.ray_ingest), which needs Ray started
        raise ValueError(
            f"{uri}: ingest() reads and writes local paths; for object storage use `moco-ray ingest` "
            "(moco_ray.jobs.ingest_job.run_ingest), which runs the Ray ingest"
        )
    _check_options(shard_size_mb, row_group_rows, reencode)
    src = open_source(source, split=split, cache_dir=cache_dir)
    out = Path(out).expanduser().resolve()
    _refuse_out_inside_source(out, src)
    options = {
        "split": split,
        "shard_size_mb": shard_size_mb,
        "row_group_rows": row_group_rows,
        "reencode": reencode,
        "row_order": ROW_ORDER,
    }
    fp = hashlib.sha256(f"{src.fingerprint()}|{sorted(options.items())}|{SCHEMA_VERSION}".encode()).hexdigest()
    existed = _check_out(out)
    try:
        with _exclusive(out):
            if _prepare_out(out, fp, overwrite):
                log.info("%s: already ingested from %s (same fingerprint); nothing to do", out, src.name)
                return read_manifest(out)
            workers = num_workers or min(32, os.cpu_count() or 1)
            m = _write_ingest(src, out, fp, options, strict=strict, workers=workers, progress=progress)
            _warn_one_class(m)
            return m
    except OSError as e:
        if e.errno is None:  # e.g. DatasetUnavailableError: a message of its own
            raise
        why = f"{os.strerror(e.errno)}, errno {errno.errorcode.get(e.errno, e.errno)}"
        raise ValueError(
            f"ingest into {out}: cannot write {e.filename or out} ({why}); nothing of this ingest was kept"
        ) from None
    finally:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed first ingest leaves nothing behind


def _check_out(out: Path) -> bool:
    """Whether `out` exists; ValueError when it, or the nearest existing directory above it, is a file."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    blocker = next((q for q in out.parents if q.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"{out}: cannot create it ({blocker} is not a directory)")
    return out.exists()


def _warn_one_class(m: Manifest) -> None:
    """One class is allowed (unlabeled images ingested as one folder) but every accuracy on it is 1.0: say so once."""
    if len(m.classes) == 1:
        log.warning(
            "moco-ray: warning: %s has one class (%s): kNN/linear accuracy will be meaningless", m.source, m.classes[0]
        )


def _check_options(shard_size_mb: float, row_group_rows: int, reencode: str | None) -> None:
    if reencode not in REENCODE:
        raise ValueError(f"reencode: {reencode!r} is not one of jpeg, png (or None to keep the bytes)")
    if shard_size_mb <= 0:
        raise ValueError(f"shard_size_mb: {shard_size_mb!r} is out of range; allowed: > 0")
    if row_group_rows < 1:
        raise ValueError(f"row_group_rows: {row_group_rows!r} is out of range; allowed: >= 1")


def _refuse_out_inside_source(out: Path, src: Source) -> None:
    """Shards written inside an image tree would be listed as its images by the next ingest: refused up front."""
    root = getattr(src, "root", None)
    if isinstance(root, Path) and (out == root or root in out.parents):
        raise ValueError(
            f"{out}: is inside the source tree {root} (a re-run would read the shards as images); "
            "choose an output directory outside it"
        )


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` (creating it) while ingesting into it; ValueError when another holds it.

    An ``fcntl.flock`` on ``OUT/.moco-ray-ingest.lock``, which holds the writer's pid: the kernel releases it when
    the process dies, so a lock file left by a killed ingest is no obstacle. The holder deletes the file before
    letting go; whoever locked a file already deleted that way retries on the current one.
    """
    path = out / LOCK_FILE
    while True:
        out.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # `out` removed meanwhile by a failed first ingest: create it again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {pid})" if pid.isdigit() else ""
            raise ValueError(
                f"{out}: another ingest is writing here{who}; wait for it or choose another directory"
            ) from None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _write_ingest(
    src: Source, out: Path, fp: str, options: dict[str, Any], *, strict: bool, workers: int, progress: bool
) -> Manifest:
    """Read, validate and write every row as shards, then the manifest; on any failure, remove what was written."""
    for stale in out.glob(f"*/{_PART}*.tmp"):  # an interrupted ingest's leftovers
        stale.unlink()
    skipped = src.unlisted()  # dangling or looping symlinks: known before reading anything
    if skipped and strict:
        _report_skipped(skipped, src.name, strict)
    writer = _ShardWriter(out, options["shard_size_mb"] * MB, options["row_group_rows"])
    try:
        counts, class_counts, bad = _write_rows(src, writer, _loader(src, options["reencode"]), workers, progress)
        skipped += bad
        shards = writer.close()
        _report_skipped(skipped, src.name, strict)
        if not shards:
            raise ValueError(f"{src.name}: no valid images found; nothing to ingest")
        _remove_outputs(out)  # the previous ingest (overwrite), now that the new one is complete
        shards = writer.commit()
    except BaseException:
        writer.abort()
        raise
    manifest = Manifest(
        source=src.name,
        classes=list(src.classes),
        counts={s: counts[s] for s in src.splits()},
        class_counts={s: dict(sorted(c.items())) for s, c in class_counts.items()},
        shards=shards,
        skipped=skipped,
        fingerprint=fp,
        options=options,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        version=__version__,
        schema_version=SCHEMA_VERSION,
        root=str(out),
    )
    try:
        write_manifest(out, manifest)
    except BaseException:  # committed shards without a manifest are no finished ingest: removed too
        _remove_outputs(out)
        (out / f"{MANIFEST_FILE}.tmp").unlink(missing_ok=True)
        raise
    return manifest


def _write_rows(
    src: Source,
    writer: _ShardWriter,
    load: Callable[[Item], tuple[Item, bytes | None, str]],
    workers: int,
    progress: bool,
) -> tuple[Counter[str], dict[str, Counter[str]], list[dict[str, str]]]:
    """Every row of `src` through `load` into `writer`: (rows per split, rows per split and class, bad files)."""
    items = [it for s in src.splits() for it in _shuffled(src.items(s))]
    skipped: list[dict[str, str]] = []
    counts: Counter[str] = Counter()
    class_counts: dict[str, Counter[str]] = {s: Counter() for s in src.splits()}
    results = _ordered_map(load, items, workers if len(items) >= 64 else 1)
    for item, data, reason in _progress(results, len(items), f"ingest {src.name}", progress):
        if data is None:
            skipped.append({"path": item.path, "reason": reason})
            continue
        writer.add(item, data)
        counts[item.split] += 1
        name = src.classes[item.label] if 0 <= item.label < len(src.classes) else "unlabeled"
        class_counts[item.split][name] += 1
    return counts, class_counts, skipped


def _report_skipped(skipped: list[dict[str, str]], source: str, strict: bool) -> None:
    """Warn about the skipped files, naming the first few; with `strict`, raise a ValueError naming them instead."""
    if not skipped:
        return
    listing = "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:5])
    more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    if strict:
        raise ValueError(f"{len(skipped)} bad image file(s) in {source}: {listing}{more}")
    log.warning(
        "skipped %d bad image file(s) in %s (listed in %s): %s%s", len(skipped), source, MANIFEST_FILE, listing, more
    )


def _prepare_out(out: Path, fingerprint: str, overwrite: bool) -> bool:
    """True when `out` already holds this very ingest, intact. Raise when it holds something else."""
    if (out / MANIFEST_FILE).is_file():
        try:
            old, why = read_manifest(out), ""
        except ValueError as e:
            old, why = None, str(e)
        if old is not None and old.fingerprint == fingerprint:
            if _intact(out, old):
                return True
            log.warning("%s: shards of a previous ingest are damaged; writing them again", out)
            return False
        if not overwrite:
            what = f"{out}: already holds an ingest of {old.source} with different content" if old else why
            raise ValueError(f"{what}; pass overwrite=True (--overwrite) to replace it")
        return False
    foreign = [p.name for p in out.iterdir() if not _ours(p)]
    if foreign and not overwrite:
        raise ValueError(
            f"{out}: not empty and not a moco-ray shard directory ({', '.join(sorted(foreign)[:3])}); "
            "choose an empty directory or pass overwrite=True (--overwrite)"
        )
    return False  # leftovers of an interrupted ingest are replaced


def _ours(p: Path) -> bool:
    """The manifest, the lock, or a split directory holding only shard files (of a finished or interrupted ingest)."""
    if p.name in (MANIFEST_FILE, MANIFEST_FILE + ".tmp", LOCK_FILE):
        return True
    return p.is_dir() and all(c.is_file() and c.name.startswith(_PART) for c in p.iterdir())


def _intact(out: Path, m: Manifest) -> bool:
    return all((out / s.path).is_file() and (out / s.path).stat().st_size == s.bytes for s in m.shards)


def _remove_outputs(out: Path) -> None:
    """Delete a previous ingest's manifest and shard files (never anything else a user put there)."""
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    if not out.is_dir():
        return
    for d in out.iterdir():
        if d.is_dir():
            ours = list(d.glob(f"{_PART}*.parquet"))
            for f in ours:
                f.unlink()
            if ours and not any(d.iterdir()):
                d.rmdir()


def _shuffled(items: list[Item]) -> list[Item]:
    perm = np.random.default_rng(0).permutation(len(items))
    return [items[i] for i in perm]


def _loader(src: Source, reencode: str | None) -> Callable[[Item], tuple[Item, bytes | None, str]]:
    def load(item: Item) -> tuple[Item, bytes | None, str]:
        try:
            data = src.load(item)
            verify_image(data)
            if reencode:
                data = _reencode(data, reencode)
        except CorruptImageError as e:
            return item, None, str(e)
        except OSError as e:
            return item, None, f"unreadable ({e.strerror or e})"
        return item, data, ""

    return load


def _reencode(data: bytes, fmt: str) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        to_rgb(im).save(buf, format="JPEG" if fmt == "jpeg" else "PNG", quality=95)
    return buf.getvalue()


def _ordered_map(fn: Callable[[T], R], items: list[T], workers: int, window: int = 0) -> Iterator[R]:
    """fn over items in order, at most `window` in flight (bounded memory on huge trees)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    window = window or workers * 16
    with ThreadPoolExecutor(workers, thread_name_prefix="ingest") as pool:
        pending = []
        it = iter(items)
        for x in it:
            pending.append(pool.submit(fn, x))
            if len(pending) >= window:
                break
        head = 0
        while head < len(pending):
            yield pending[head].result()
            pending[head] = None  # type: ignore[call-overload]
            head += 1
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))


def _progress(it: Iterable[T], total: int, desc: str, enabled: bool) -> Iterable[T]:
    if not enabled:
        return it
    return tqdm(it, total=total, desc=desc, unit="img", mininterval=1.0, disable=total < 1000)


class _ShardWriter:
    """Rolls Parquet shards of about `target_bytes`, with small row groups, as ``*.tmp`` until `commit`."""

    def __init__(self, out: Path, target_bytes: float, row_group_rows: int) -> None:
        self.out, self.target, self.rg_rows = out, target_bytes, row_group_rows
        self.done: list[tuple[Path, ShardInfo]] = []  # (tmp file, info with the final path)
        self._split: str | None = None
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._rows: list[tuple[bytes, int, str, str]] = []
        self._rg_bytes = 0
        self._shard_rows = 0
        self._shard_bytes = 0
        self._next: Counter[str] = Counter()

    def add(self, item: Item, data: bytes) -> None:
        if item.split != self._split:
            self._close_shard()
            self._split = item.split
        if self._writer is None:
            self._open()
        self._rows.append((data, item.label, item.id, item.path))
        self._rg_bytes += len(data)
        if len(self._rows) >= self.rg_rows or self._rg_bytes >= ROW_GROUP_BYTES:
            self._flush()
        if self._shard_bytes + self._rg_bytes >= self.target:
            self._close_shard()

    def _open(self) -> None:
        assert self._split is not None
        n = self._next[self._split]
        self._next[self._split] += 1
        d = self.out / self._split
        d.mkdir(parents=True, exist_ok=True)
        self._tmp = d / f"{_PART}{n:05d}.parquet.tmp"
        self._writer = pq.ParquetWriter(
            self._tmp,
            SHARD_SCHEMA,
            compression={"image": "none", "label": "zstd", "id": "zstd", "path": "zstd"},
            use_dictionary=["label"],
            write_statistics=["label"],
        )
        self._shard_rows = self._shard_bytes = 0

    def _flush(self) -> None:
        if not self._rows:
            return
        assert self._writer is not None
        cols = list(zip(*self._rows))
        arrays = [pa.array(c, type=f.type) for c, f in zip(cols, SHARD_SCHEMA)]
        table = pa.Table.from_arrays(arrays, schema=SHARD_SCHEMA)
        self._writer.write_table(table, row_group_size=len(self._rows))
        self._shard_rows += len(self._rows)
        self._shard_bytes += self._rg_bytes
        self._rows, self._rg_bytes = [], 0

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._flush()
        self._writer.close()
        self._writer = None
        tmp = self._tmp
        assert tmp is not None and self._split is not None
        final = tmp.with_name(tmp.name[: -len(".tmp")])
        info = ShardInfo(
            path=f"{self._split}/{final.name}",
            split=self._split,
            rows=self._shard_rows,
            bytes=tmp.stat().st_size,
            sha256=file_sha256(tmp),
        )
        self.done.append((tmp, info))

    def close(self) -> list[ShardInfo]:
        self._close_shard()
        return [info for _, info in self.done]

    def commit(self) -> list[ShardInfo]:
        for tmp, info in self.done:
            os.replace(tmp, self.out / info.path)
        return [info for _, info in self.done]

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self.done.append((self._tmp, None))  # type: ignore[arg-type]
        for tmp, _ in self.done:
            tmp.unlink(missing_ok=True)
        for split in self._next:
            d = self.out / split
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
