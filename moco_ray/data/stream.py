"""Ray Data view-pair stream: read_parquet -> epoch order (data.shuffle) -> per-batch views (map_batches) -> (q, k).

The per-batch work (decode, views, the corrupt-image rule, the seeded draws) is `moco_ray.data.views`; this module
wires it into Ray Data: which files are read (`moco_ray.data.manifest.split_files`), each execution's row order
(a full reshuffle, or a file shuffle: `_epoch_order`), the map_batches tasks, and how a Train worker consumes its
shard (`iter_pairs`). With
``aug.device == "gpu"`` the batches carry the encoded bytes (``jpeg``, a list of ``bytes`` after `iter_pairs`).

Ray is imported inside the functions that use it: importing ``moco_ray.data`` stays free of Ray (the driver's
checks and ``moco-ray ingest`` do not need it; tests/data/test_ingest.py checks).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from moco_ray.data.manifest import Manifest, read_manifest, resolve_fs, split_files
from moco_ray.data.schema import READ_COLUMNS
from moco_ray.data.views import make_eval, make_pairs

# data.shuffle's values (moco_ray.config.DataConfig): how each epoch's order is made (see `_epoch_order`)
SHUFFLES = ("full", "files")

if TYPE_CHECKING:
    import ray.data

    from moco_ray.config import AugConfig, DataConfig


def iter_pairs(
    shard: Any,
    batch_size: int,
    steps: int,
    data_cfg: DataConfig | None = None,
    *,
    shuffle_buffer: int | None = None,
    prefetch_batches: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Exactly `steps` full batches (fewer only if the shard runs dry) from a Ray DataIterator / Dataset.

    `shard` is ``ray.train.get_dataset_shard("train")``; the local shuffle buffer and prefetch depth come from
    `data_cfg` unless given (the buffer only with ``data.shuffle == "files"``: a fully reshuffled stream gains
    nothing from it). Stopping after `steps` keeps every worker's step count equal.
    """
    buf = shuffle_buffer if shuffle_buffer is not None else _local_buffer(data_cfg)
    prefetch = prefetch_batches if prefetch_batches is not None else (data_cfg.prefetch_batches if data_cfg else 1)
    batches = iter(
        shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=buf or None,
            prefetch_batches=prefetch,
            collate_fn=_pair_collate(),
        )
    )
    try:
        for _ in range(steps):
            try:
                yield next(batches)
            except StopIteration:
                return
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _local_buffer(data_cfg: DataConfig | None) -> int:
    """Rows of iter_torch_batches' local shuffle buffer for `data_cfg`: ``shuffle_buffer`` with the "files" order,
    0 (none) with "full", whose rows arrive in random order already (a buffer would only copy them again)."""
    if data_cfg is None or data_cfg.shuffle == "full":
        return 0
    return data_cfg.shuffle_buffer


def _pair_collate() -> Any:
    """iter_torch_batches' collate: Ray's default for the view batches; for ``jpeg`` batches (aug.device=gpu) the
    bytes as a Python list (Arrow binary has no tensor form) beside the tensor columns, all left on the CPU
    (Ray moves only pure tensor batches to the device; the bytes must stay host-side for the decoder). The
    ``id`` column of a ``keep_id`` stream comes out as a list of strings (what the shuffle benchmark and test read)."""
    from ray.data.collate_fn import ArrowBatchCollateFn, DefaultCollateFn  # lazy: keeps this module Ray-free

    class PairCollate(ArrowBatchCollateFn):
        def __init__(self) -> None:
            super().__init__()
            self.default = DefaultCollateFn(combine_chunks=not _train_device_is_cuda())

        def __call__(self, batch: Any) -> Any:
            ids = {"id": batch["id"].to_pylist()} if "id" in batch.column_names else {}
            if "jpeg" not in batch.column_names:
                return {**self.default(batch.drop_columns(list(ids))), **ids}
            out = {c: torch.tensor(batch[c].to_numpy()) for c in batch.column_names if c not in ("jpeg", "id")}
            return {**out, "jpeg": batch["jpeg"].to_pylist(), **ids}

    return PairCollate()


def _train_device_is_cuda() -> bool:
    """Whether Ray moves batches to a CUDA device here (what iter_torch_batches' device="auto" resolves to)."""
    try:
        import ray.train.torch  # lazy: keeps this module Ray-free

        return ray.train.torch.get_device().type == "cuda"
    except Exception:  # not in a Train worker
        return False


def _read(shards: str, files: list[str], shuffle: Any) -> ray.data.Dataset:
    """read_parquet of the split's files through Ray Data's file-list Parquet reader (``use_datasource_v2=False``).

    Measured on Ray 2.60 (benchmarks/bench_stream_vs_loader.py, 10,000 CIFAR JPEGs, 2 CPUs, idle machine): the
    default (V2) reader starts a ``ListFiles`` task per execution that creates 32 ``FooterReaderActor`` processes
    to read footers (1-6 s of each epoch, the raylet's "worker processes ... startup concurrency" warning), and
    packs small files into one read task emitting one block, so ``map_batches`` ran as a single task on one core:
    0.89x a DataLoader with 1 shard, 0.73x with 36. The file-list reader reads the footers we name up front and
    splits the rows into enough blocks for every CPU: 1.29x with 1 shard, 1.07x with 36 (see RESULTS.md).
    ``read_parquet`` reads the switch from the current DataContext when called; it is restored right after.
    """
    import ray.data  # lazy: keeps this module Ray-free

    fs, _ = resolve_fs(shards)
    ctx = ray.data.DataContext.get_current()
    before, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, filesystem=fs, columns=READ_COLUMNS, shuffle=shuffle)
    finally:
        ctx.use_datasource_v2 = before


def pair_dataset(
    shards: str,
    split: str,
    aug: AugConfig,
    *,
    seed: int | None,
    epoch_offset: int = 0,
    limit: int = 0,
    map_batch_size: int = 128,
    num_cpus_per_task: float = 1,
    keep_id: bool = False,
    manifest: Manifest | None = None,
    shuffle: str = "full",
) -> ray.data.Dataset:
    """The training stream of `split`: reshuffled per execution (`shuffle`), views drawn in map_batches tasks.

    ``shuffle`` (``data.shuffle``): "full" = a new random permutation of all rows every epoch, as the official
    loaders; "files" = only the file order changes (plus `iter_pairs`' local buffer). See `_epoch_order`.
    ``keep_id`` adds the string ``id`` column (tests, the shuffle benchmark; `iter_pairs` yields it as a list);
    ``manifest``: the shards' manifest when the caller already read it.
    """
    manifest = manifest or read_manifest(shards)
    files, drop_ids = split_files(shards, manifest, split, limit)
    fn = partial(
        make_pairs,
        preset=aug.preset,
        image_size=aug.image_size,
        strength=aug.strength,
        crop_min=aug.crop_min,
        device=aug.device,
        seed=seed,
        epoch_offset=epoch_offset,
        drop_ids=drop_ids,
        keep_id=keep_id,
    )
    return _epoch_order(shards, files, shuffle, seed, epoch_offset).map_batches(
        fn, batch_size=map_batch_size, batch_format="numpy", num_cpus=num_cpus_per_task
    )


def _epoch_order(shards: str, files: list[str], shuffle: str, seed: int | None, epoch_offset: int) -> ray.data.Dataset:
    """The encoded rows of `files` in this execution's order, before any view is drawn.

    "full": ``random_shuffle`` of the encoded rows (bytes, not views: ~1 KB per CIFAR row), reseeded per
    execution, so consecutive epochs share batch-mates no more than two random permutations do
    (`moco_ray.data.shuffle_quality`); it is an all-to-all step: each epoch reads its whole split into the object
    store (spilled to disk when larger) before the first view task starts. "files": the file order only, streamed.
    Measured in benchmarks/bench_shuffle.py (RESULTS.md). With a seed, Ray seeds the shuffle from it and the
    execution index; epoch_offset is in the seed so a resumed run does not replay the first run's orders. The
    views never depend on the order: they are keyed by (seed, epoch, id) in `moco_ray.data.views`.
    """
    import ray.data  # lazy: keeps this module Ray-free

    if shuffle not in SHUFFLES:
        raise ValueError(f"shuffle: {shuffle!r} is out of range; allowed: {', '.join(SHUFFLES)}")
    order_seed = None if seed is None else (seed * 1_000_003 + epoch_offset) % (1 << 31)
    if shuffle == "files":
        if order_seed is None:
            return _read(shards, files, "files")
        return _read(shards, files, ray.data.FileShuffleConfig(seed=order_seed, reseed_after_execution=True))
    rows = _read(shards, files, None)
    if order_seed is None:  # Ray seeds it from the clock when each execution is planned
        return rows.random_shuffle()
    return rows.random_shuffle(seed=ray.data.RandomSeedConfig(seed=order_seed, reseed_after_execution=True))


def quiet_progress() -> None:
    """Ray Data without per-operator progress bars: the epoch lines are the progress people read."""
    import ray.data  # lazy: keeps this module Ray-free

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def eval_dataset(
    shards: str, split: str, image_size: int, limit: int = 0, *, map_batch_size: int = 256
) -> ray.data.Dataset:
    """Deterministic ``img`` (eval_view) + ``label`` of `split`, in manifest order (kNN / linear probes)."""
    manifest = read_manifest(shards)
    files, drop_ids = split_files(shards, manifest, split, limit)
    fn = partial(make_eval, image_size=image_size, drop_ids=drop_ids)
    ds = _read(shards, files, None).map_batches(fn, batch_size=map_batch_size, batch_format="numpy")
    ds.context.execution_options.preserve_order = True  # this Dataset's own context copy
    return ds
