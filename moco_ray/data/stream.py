"""Ray Data view-pair stream: read_parquet -> file shuffle -> decode + two augmentations (map_batches) -> (q, k).

Batches carry uint8 ``q``/``k`` [B,3,S,S], ``label`` int64 and ``corrupt`` int64 (1 where a corrupt image was
replaced by another image of its batch, see `moco_ray.data.decode`). uint8 ships 4x fewer bytes than float;
normalisation happens on the device. With ``aug.device == "gpu"`` the CPU work is reading bytes only: batches
carry ``jpeg`` (the encoded images as stored, a list of ``bytes`` after `iter_pairs`) and ``label``; the training
worker decodes them on its device in one batched call, counts corrupt rows and draws the views there.

Randomness: with a seed, row ``id``'s views in epoch ``e`` come from a torch.Generator seeded by
(seed, e, crc32(id)), so they are reproducible and differ between epochs. Each epoch of Ray Train is one execution
of the dataset; Ray Data counts executions in ``DataContext._execution_idx`` (private, the counter
``FileShuffleConfig(reseed_after_execution=True)`` uses; checked on Ray 2.60 to be visible inside map_batches tasks
and to advance per execution, also through ``streaming_split`` and partly consumed iterators), so
``epoch = epoch_offset + execution index`` (``epoch_offset`` is the first epoch of a resumed run). Any other
execution of the same Dataset object (e.g. ``ds.take()`` on the driver) also advances the counter.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moco_ray.data.decode import decode_batch
from moco_ray.data.manifest import Manifest, join, read_manifest, resolve_fs

if TYPE_CHECKING:
    import ray.data

    from moco_ray.config import AugConfig, DataConfig

READ_COLUMNS = ["image", "label", "id"]


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


def usable_rows(manifest: Manifest, split: str, limit: int = 0) -> int:
    rows = manifest.rows(split)
    return min(rows, limit) if limit > 0 else rows


def steps_per_epoch(manifest: Manifest, split: str, global_batch: int, limit: int = 0, max_steps: int = 0) -> int:
    """Steps every worker takes per epoch: full global batches only (drop_last), capped by `max_steps` (0 = none).

    ``streaming_split(equal=True)`` gives each of W workers floor(rows / W) rows, and
    floor(floor(rows / W) / (global_batch / W)) == floor(rows / global_batch), so all workers can take this many.
    """
    steps = usable_rows(manifest, split, limit) // global_batch
    return min(steps, max_steps) if max_steps > 0 else steps


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
    `data_cfg` unless given. Stopping after `steps` keeps every worker's step count equal.
    """
    buf = shuffle_buffer if shuffle_buffer is not None else (data_cfg.shuffle_buffer if data_cfg else 0)
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


def _pair_collate() -> Any:
    """iter_torch_batches' collate: Ray's default for the view batches; for ``jpeg`` batches (aug.device=gpu) the
    bytes as a Python list (Arrow binary has no tensor form) beside the tensor columns, all left on the CPU
    (Ray moves only pure tensor batches to the device; the bytes must stay host-side for the decoder)."""
    from ray.data.collate_fn import ArrowBatchCollateFn, DefaultCollateFn

    class PairCollate(ArrowBatchCollateFn):
        def __init__(self) -> None:
            super().__init__()
            self.default = DefaultCollateFn(combine_chunks=not _train_device_is_cuda())

        def __call__(self, batch: Any) -> Any:
            if "jpeg" not in batch.column_names:
                return self.default(batch)
            out = {c: torch.tensor(batch[c].to_numpy()) for c in batch.column_names if c not in ("jpeg", "id")}
            return {**out, "jpeg": batch["jpeg"].to_pylist()}

    return PairCollate()


def _train_device_is_cuda() -> bool:
    """Whether Ray moves batches to a CUDA device here (what iter_torch_batches' device="auto" resolves to)."""
    try:
        import ray.train.torch

        return ray.train.torch.get_device().type == "cuda"
    except Exception:  # not in a Train worker
        return False


def split_files(shards: str, manifest: Manifest, split: str, limit: int = 0) -> tuple[list[str], frozenset[str]]:
    """Shard files of `split` (full paths in the shard filesystem) and the ids to drop to honour `limit`.

    The limit takes the first `limit` rows in manifest order, so the subset is the same every epoch whatever the
    file shuffle; only the last file read may be cut, by id.
    """
    _, base = resolve_fs(shards)
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
    import pyarrow.parquet as pq

    fs, _ = resolve_fs(shards)
    ids = pq.read_table(files[-1], columns=["id"], filesystem=fs)["id"].to_pylist()
    return files, frozenset(ids[keep_in_last:])


def row_seed(seed: int, epoch: int, row_id: str) -> int:
    """A 64-bit generator seed from (seed, epoch, crc32(id)), well mixed by NumPy's SeedSequence."""
    entropy = [seed % (1 << 64), epoch % (1 << 64), zlib.crc32(row_id.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def current_epoch(epoch_offset: int) -> int:
    """epoch_offset + the index of the running execution of this Dataset (see the module docstring)."""
    from ray.data import DataContext

    return epoch_offset + int(getattr(DataContext.get_current(), "_execution_idx", 0))


_AUG_CACHE: dict[tuple[str, int, float], Any] = {}


def _view_augment(preset: str, image_size: int, strength: float) -> Any:
    key = (preset, image_size, strength)
    if key not in _AUG_CACHE:
        from moco_ray.data.augment import build_view_augment

        _AUG_CACHE[key] = build_view_augment(preset, image_size, strength)
    return _AUG_CACHE[key]


def _drop(batch: dict[str, np.ndarray], drop_ids: frozenset[str]) -> dict[str, np.ndarray]:
    if not drop_ids:
        return batch
    keep = np.array([i not in drop_ids for i in batch["id"]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}


DRAFT_FACTORS = (8, 4, 2)  # libjpeg's DCT-domain downscales (Image.draft)


def _draft_factor(crops_hw: list[tuple[int, int]], size: int) -> int:
    """The largest JPEG draft reduction that keeps every crop at least ``size`` px on each side (1 = none), so
    the reduced decode is still downscaled by the final resize and no view loses resolution."""
    smallest = min(min(h, w) for h, w in crops_hw)
    return next((k for k in DRAFT_FACTORS if smallest >= k * size), 1)


def _nearest(valid: list[int], i: int) -> int:
    return min(valid, key=lambda j: (abs(j - i), j))


def _train_pairs(
    aug: Any, images: list[bytes | None], gens: list[torch.Generator]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two views of each encoded image -> (q, k uint8 [B, 3, S, S], corrupt flags int64 [B]).

    Row i's draws come from ``gens[i]`` (two views: q then k, exactly ``sample_params(2, ..., gens[i])``) and are
    turned into crop boxes for the whole batch at once. Each image is opened lazily: its header gives the upright
    size the crops are drawn on, and a JPEG whose every crop is >= 2x the output is decoded at reduced size
    (draft, see `_draft_factor`; the boxes are scaled to match). Corrupt images are handled as `decode_batch` does:
    the row gets the nearest valid image of the batch (views drawn with its own generator) and is flagged; a batch
    with no valid image uses mid-grey stand-ins.
    """
    from PIL import Image

    from moco_ray.data.augment import draw_uniforms, params_from_uniforms
    from moco_ray.data.decode import FALLBACK_SIZE, CorruptImageError, load_upright_rgb, open_image, upright_size

    n, S = len(images), aug.image_size
    heads: list[Any] = []
    for data in images:
        try:
            heads.append(open_image(data) if data is not None else None)
        except CorruptImageError:
            heads.append(None)
    draws = [draw_uniforms(2, g) for g in gens]
    stand_in = Image.new("RGB", (FALLBACK_SIZE, FALLBACK_SIZE), (128, 128, 128))
    loaded: dict[tuple[int, int], tuple[Any, float]] = {}
    while True:  # a second pass only when some image fails to decode after its header read fine
        valid = [i for i, h in enumerate(heads) if h is not None]
        src = [i if heads[i] is not None else (_nearest(valid, i) if valid else -1) for i in range(n)]
        hw = [upright_size(heads[j]) if j >= 0 else (FALLBACK_SIZE, FALLBACK_SIZE) for j in src]
        p = {}
        if n:
            u = {k: torch.cat([d[k] for d in draws]) for k in draws[0]}
            p = params_from_uniforms(u, aug.params, [h for h, _ in hw for _ in "qk"], [w for _, w in hw for _ in "qk"])
        boxes = torch.stack([p["height"], p["width"]], 1).tolist() if n else []
        views: list[Any] = []
        scales: list[float] = []
        failed = False
        for i, j in enumerate(src):
            if j < 0:
                im, scale = stand_in, 1.0
            else:
                key = (j, _draft_factor(boxes[2 * i : 2 * i + 2], S))
                if key not in loaded:
                    # a lazy image decodes once: another reduction of the same image needs a fresh open
                    fresh = any(k[0] == j for k in loaded)
                    try:
                        loaded[key] = load_upright_rgb(open_image(images[j]) if fresh else heads[j], key[1])
                    except CorruptImageError:
                        heads[j], failed = None, True
                        break
                im, scale = loaded[key]
            views += [im, im]
            scales += [scale, scale]
        if not failed:
            break
    out = np.empty((2 * n, S, S, 3), dtype=np.uint8)
    if n:
        aug.apply_into(out, views, p, scales)
    corrupt = np.array([h is None for h in heads], dtype=np.int64)
    q = np.ascontiguousarray(out[0::2].transpose(0, 3, 1, 2))
    k = np.ascontiguousarray(out[1::2].transpose(0, 3, 1, 2))
    return q, k, corrupt


def make_pairs(
    batch: dict[str, np.ndarray],
    *,
    preset: str,
    image_size: int,
    strength: float,
    device: str,
    seed: int | None,
    epoch_offset: int,
    drop_ids: frozenset[str] = frozenset(),
    keep_id: bool = False,
) -> dict[str, np.ndarray]:
    """map_batches body: decode, then two views per image (``q``, ``k``), or with ``device == "gpu"`` the encoded
    bytes unchanged (``jpeg``, any format; the consumer decodes them, counts corrupt rows and draws the views:
    `moco_ray.data.gpu_augment.sources_from_bytes`)."""
    batch = _drop(batch, drop_ids)
    ids = [str(i) for i in batch["id"]]
    out: dict[str, np.ndarray] = {}
    if device == "gpu":  # the bytes as read: decode, resize and views happen on the training device
        out["jpeg"] = np.asarray(batch["image"], dtype=object)
        corrupt = None
    else:
        aug = _view_augment(preset, image_size, strength)
        epoch = current_epoch(epoch_offset)
        if seed is None:  # fresh entropy: torch's default seed is the same in every Ray worker process
            shared = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
            gens = [shared] * len(ids)
        else:
            gens = [torch.Generator().manual_seed(row_seed(seed, epoch, rid)) for rid in ids]
        out["q"], out["k"], corrupt = _train_pairs(aug, list(batch["image"]), gens)
    out["label"] = np.asarray(batch["label"], dtype=np.int64)
    if corrupt is not None:
        out["corrupt"] = corrupt
    if keep_id:
        out["id"] = np.asarray(ids, dtype=object)
    return _block(out)


def make_eval(batch: dict[str, np.ndarray], *, image_size: int, drop_ids: frozenset[str] = frozenset()) -> dict:
    """map_batches body of the eval stream: deterministic resize + center crop."""
    from moco_ray.data.augment import eval_view

    batch = _drop(batch, drop_ids)
    imgs, corrupt = decode_batch(list(batch["image"]))
    return _block(
        {
            "img": _stack([eval_view(im, image_size) for im in imgs], image_size),
            "label": np.asarray(batch["label"], dtype=np.int64),
            "corrupt": corrupt,
        }
    )


def _block(out: dict[str, np.ndarray]) -> dict[str, np.ndarray] | Any:
    """A map_batches result whose image columns stay tensor columns when the batch is empty.

    A batch whose every row was cut by ``data.limit`` gives 0-row [0,3,S,S] arrays. Ray Data converts only
    non-empty arrays to its tensor type; an empty one fails Arrow's conversion, is pickled as Python objects and
    warns once per worker ("Failed to convert column 'q' into pyarrow array"). Typed here instead.
    """
    if next(iter(out.values())).shape[0] > 0:
        return out
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    objects = {"jpeg": pa.binary(), "id": pa.string()}  # the object columns' types when not empty

    def column(k: str, v: np.ndarray) -> Any:
        if v.ndim > 1:
            return ArrowTensorArray.from_numpy(v)
        return pa.array(v.tolist(), type=objects[k]) if v.dtype == object else pa.array(v)

    return pa.table({k: column(k, v) for k, v in out.items()})


def _stack(ts: list[torch.Tensor], size: int) -> np.ndarray:
    if not ts:  # every row of the batch was cut by the limit
        return np.zeros((0, 3, size, size), dtype=np.uint8)
    return torch.stack(ts).numpy()


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
    import ray.data

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
) -> ray.data.Dataset:
    """The training stream of `split`: file-shuffled per execution, views drawn in map_batches tasks.

    ``keep_id`` adds the string ``id`` column (tests and debugging; ``iter_torch_batches`` cannot collate it);
    ``manifest``: the shards' manifest when the caller already read it.
    """
    import ray.data

    manifest = manifest or read_manifest(shards)
    files, drop_ids = split_files(shards, manifest, split, limit)
    if seed is None:
        shuffle: Any = "files"
    else:  # epoch_offset in the seed: a resumed run does not replay the first run's file orders
        shuffle_seed = (seed * 1_000_003 + epoch_offset) % (1 << 31)
        shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    fn = partial(
        make_pairs,
        preset=aug.preset,
        image_size=aug.image_size,
        strength=aug.strength,
        device=aug.device,
        seed=seed,
        epoch_offset=epoch_offset,
        drop_ids=drop_ids,
        keep_id=keep_id,
    )
    return _read(shards, files, shuffle).map_batches(
        fn, batch_size=map_batch_size, batch_format="numpy", num_cpus=num_cpus_per_task
    )


def quiet_progress() -> None:
    """Ray Data without per-operator progress bars: the epoch lines are the progress people read."""
    import ray.data

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


def original_images(shards: str, split: str, limit: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """The labelled split decoded in this process at the images' own sizes (uint8 [3, H, W] each, EXIF-upright),
    for protocols that crop afresh every epoch (the official linear probe). Corrupt rows are left out and counted.
    """
    import pyarrow.parquet as pq

    from moco_ray.data.decode import CorruptImageError, decode_image

    manifest = read_manifest(shards)
    files, drop_ids = split_files(shards, manifest, split, limit)
    fs, _ = resolve_fs(shards)
    imgs: list[torch.Tensor] = []
    labels: list[int] = []
    corrupt = 0
    for f in files:
        table = pq.read_table(f, columns=["image", "label", "id"], filesystem=fs)
        for data, label, row_id in zip(*(table[c].to_pylist() for c in ("image", "label", "id"))):
            if row_id in drop_ids:
                continue
            try:
                imgs.append(decode_image(data))
                labels.append(int(label))
            except CorruptImageError:
                corrupt += 1
    return imgs, torch.tensor(labels, dtype=torch.long), corrupt


def eval_arrays(shards: str, split: str, image_size: int, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The labelled eval split decoded in this process: (uint8 [N,3,S,S], int64 labels [N], corrupt count).

    The kNN monitor inside the training loop uses this instead of a Ray Dataset: it is read once per run and kept
    in memory, and it takes no Ray Data resources away from the training stream it runs beside (a second
    execution inside a Train worker can wait on the same CPU budget as the training stream).
    """
    import pyarrow.parquet as pq

    manifest = read_manifest(shards)
    files, drop_ids = split_files(shards, manifest, split, limit)
    fs, _ = resolve_fs(shards)
    imgs, labels, corrupt = [], [], 0
    for f in files:
        table = pq.read_table(f, columns=READ_COLUMNS, filesystem=fs)
        batch = {c: np.asarray(table[c].to_pylist(), dtype=object) for c in READ_COLUMNS}
        out = make_eval(batch, image_size=image_size, drop_ids=drop_ids)
        imgs.append(torch.from_numpy(out["img"]))
        labels.append(torch.from_numpy(out["label"]))
        corrupt += int(out["corrupt"].sum())
    if not imgs:
        return torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8), torch.zeros(0, dtype=torch.long), 0
    return torch.cat(imgs), torch.cat(labels), corrupt
