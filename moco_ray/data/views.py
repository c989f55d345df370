"""Per-batch work of the stream, run inside Ray Data ``map_batches`` tasks: decode + two views per image, or the
deterministic eval view; corrupt images handled by the one rule of `moco_ray.data.decode.replacement_rows`.

Batches carry uint8 ``q``/``k`` [B,3,S,S], ``label`` int64 and ``corrupt`` int64 (1 where a corrupt image was
replaced by another image of its batch). uint8 ships 4x fewer bytes than float; normalisation happens on the
device. With ``aug.device == "gpu"`` the CPU work is reading bytes only: batches carry ``jpeg`` (the encoded images
as stored) and ``label``; the training worker decodes them on its device in one batched call, counts corrupt rows
and draws the views there (`moco_ray.data.gpu_augment.sources_from_bytes`, same rule).

Randomness: with a seed, row ``id``'s views in epoch ``e`` come from a torch.Generator seeded by
(seed, e, crc32(id)), so they are reproducible and differ between epochs. Each epoch of Ray Train is one execution
of the dataset; Ray Data counts executions in ``DataContext._execution_idx`` (private, the counter
``FileShuffleConfig(reseed_after_execution=True)`` uses; checked on Ray 2.60 to be visible inside map_batches tasks
and to advance per execution, also through ``streaming_split`` and partly consumed iterators), so
``epoch = epoch_offset + execution index`` (``epoch_offset`` is the first epoch of a resumed run). Any other
execution of the same Dataset object (e.g. ``ds.take()`` on the driver) also advances the counter.
"""

from __future__ import annotations

import functools
import os
import zlib
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from moco_ray.data.augment import ViewAugment, build_view_augment, draw_uniforms, eval_view, params_from_uniforms
from moco_ray.data.decode import (
    FALLBACK_SIZE,
    CorruptImageError,
    corrupt_flags,
    decode_batch,
    load_upright_rgb,
    open_image,
    replacement_rows,
    upright_size,
)

DRAFT_FACTORS = (8, 4, 2)  # libjpeg's DCT-domain downscales (Image.draft)
_OBJECT_TYPES = {"jpeg": pa.binary(), "id": pa.string()}  # the object columns' Arrow types (see `_block`)


def row_seed(seed: int, epoch: int, row_id: str) -> int:
    """A 64-bit generator seed from (seed, epoch, crc32(id)), well mixed by NumPy's SeedSequence."""
    entropy = [seed % (1 << 64), epoch % (1 << 64), zlib.crc32(row_id.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def current_epoch(epoch_offset: int) -> int:
    """epoch_offset + the index of the running execution of this Dataset (see the module docstring)."""
    from ray.data import DataContext  # lazy: Ray only inside map tasks; importing moco_ray.data stays Ray-free

    return epoch_offset + int(getattr(DataContext.get_current(), "_execution_idx", 0))


@functools.cache
def _view_augment(preset: str, image_size: int, strength: float, crop_min: float) -> ViewAugment:
    """One augmenter per (preset, size, strength, crop_min) per worker process: built once, reused by every batch."""
    return build_view_augment(preset, image_size, strength, crop_min)


def _generators(seed: int | None, epoch_offset: int, ids: list[str]) -> list[torch.Generator]:
    """One generator per row, seeded by `row_seed`; without a seed one fresh-entropy generator shared by the batch
    (torch's default seed is the same in every Ray worker process)."""
    if seed is None:
        shared = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        return [shared] * len(ids)
    epoch = current_epoch(epoch_offset)
    return [torch.Generator().manual_seed(row_seed(seed, epoch, rid)) for rid in ids]


def _drop(batch: dict[str, np.ndarray], drop_ids: frozenset[str]) -> dict[str, np.ndarray]:
    if not drop_ids:
        return batch
    keep = np.array([i not in drop_ids for i in batch["id"]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}


def _draft_factor(crops_hw: list[tuple[int, int]], size: int) -> int:
    """The largest JPEG draft reduction that keeps every crop at least ``size`` px on each side (1 = none), so
    the reduced decode is still downscaled by the final resize and no view loses resolution."""
    smallest = min(min(h, w) for h, w in crops_hw)
    return next((k for k in DRAFT_FACTORS if smallest >= k * size), 1)


def _open_or_none(data: bytes | None) -> Image.Image | None:
    try:
        return open_image(data) if data is not None else None
    except CorruptImageError:
        return None


class _Sources:
    """A batch's encoded images, opened lazily (header only) and decoded at most once per draft reduction.

    ``heads[j]`` is None for a corrupt image: unreadable header, or (found in `load`) undecodable pixels.
    """

    def __init__(self, images: list[bytes | None]) -> None:
        self.images = images
        self.heads = [_open_or_none(data) for data in images]
        self.loaded: dict[tuple[int, int], tuple[Image.Image, tuple[float, float]]] = {}

    @functools.cached_property
    def stand_in(self) -> Image.Image:
        return Image.new("RGB", (FALLBACK_SIZE, FALLBACK_SIZE), (128, 128, 128))

    def rows(self) -> list[int]:
        return replacement_rows([h is not None for h in self.heads])

    def upright_hw(self, j: int) -> tuple[int, int]:
        return upright_size(self.heads[j]) if j >= 0 else (FALLBACK_SIZE, FALLBACK_SIZE)

    def load(self, j: int, reduce: int) -> tuple[Image.Image, tuple[float, float]]:
        """Image j (-1: the stand-in) decoded upright RGB at 1/reduce, and its (x, y) scale relative to the
        full-size upright image (`load_upright_rgb`); CorruptImageError marks it corrupt."""
        if j < 0:
            return self.stand_in, (1.0, 1.0)
        key = (j, reduce)
        if key not in self.loaded:
            # a lazy image decodes once: another reduction of the same image needs a fresh open
            fresh = any(k[0] == j for k in self.loaded)
            try:
                self.loaded[key] = load_upright_rgb(open_image(self.images[j]) if fresh else self.heads[j], reduce)
            except CorruptImageError:
                self.heads[j] = None
                raise
        return self.loaded[key]


def _crop_params(aug: ViewAugment, draws: list[dict[str, torch.Tensor]], hw: list[tuple[int, int]]) -> dict:
    """Each row's two draws (q then k) turned into view parameters on its source's upright size, in one call."""
    if not draws:
        return {}
    u = {k: torch.cat([d[k] for d in draws]) for k in draws[0]}
    return params_from_uniforms(u, aug.params, [h for h, _ in hw for _ in "qk"], [w for _, w in hw for _ in "qk"])


def _decode_views(
    src: _Sources, rows: list[int], p: dict, size: int
) -> tuple[list[Image.Image], list[tuple[float, float]]]:
    """The decoded source of every view (two per row) and its (x, y) scale; a JPEG whose both crops are >= 2x the
    output is decoded at reduced size (`_draft_factor`). Raises CorruptImageError when an image fails to decode."""
    boxes = torch.stack([p["height"], p["width"]], 1).tolist() if rows else []
    views: list[Image.Image] = []
    scales: list[tuple[float, float]] = []
    for i, j in enumerate(rows):
        im, scale = src.load(j, _draft_factor(boxes[2 * i : 2 * i + 2], size))
        views += [im, im]
        scales += [scale, scale]
    return views, scales


def _train_pairs(
    aug: ViewAugment, images: list[bytes | None], gens: list[torch.Generator]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two views of each encoded image -> (q, k uint8 [B, 3, S, S], corrupt flags int64 [B]).

    Row i's draws come from ``gens[i]`` (two views: q then k, exactly ``sample_params(2, ..., gens[i])``) and are
    turned into crop boxes for the whole batch at once, on each image's upright size read from its header. A
    corrupt row gets another image of the batch by `replacement_rows` (views drawn with its own generator) and is
    flagged. An image whose header reads but whose pixels do not decode is only found while decoding: it is marked
    corrupt and the boxes are drawn again on the replacement rows (same draws).
    """
    src = _Sources(images)
    draws = [draw_uniforms(2, g) for g in gens]
    while True:
        rows = src.rows()
        p = _crop_params(aug, draws, [src.upright_hw(j) for j in rows])
        try:
            views, scales = _decode_views(src, rows, p, aug.image_size)
            break
        except CorruptImageError:  # _Sources marked the image corrupt: another pass with its replacement
            continue
    S = aug.image_size
    out = np.empty((len(views), S, S, 3), dtype=np.uint8)
    if views:
        aug.apply_into(out, views, p, scales)
    q = np.ascontiguousarray(out[0::2].transpose(0, 3, 1, 2))
    k = np.ascontiguousarray(out[1::2].transpose(0, 3, 1, 2))
    return q, k, corrupt_flags(rows)


def make_pairs(
    batch: dict[str, np.ndarray],
    *,
    preset: str,
    image_size: int,
    strength: float,
    device: str,
    seed: int | None,
    crop_min: float = 0.0,
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
        aug = _view_augment(preset, image_size, strength, crop_min)
        gens = _generators(seed, epoch_offset, ids)
        out["q"], out["k"], corrupt = _train_pairs(aug, list(batch["image"]), gens)
    out["label"] = np.asarray(batch["label"], dtype=np.int64)
    if corrupt is not None:
        out["corrupt"] = corrupt
    if keep_id:
        out["id"] = np.asarray(ids, dtype=object)
    return _block(out)


def make_eval(batch: dict[str, np.ndarray], *, image_size: int, drop_ids: frozenset[str] = frozenset()) -> dict:
    """map_batches body of the eval stream: deterministic resize + center crop."""
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
    from ray.data.extensions import ArrowTensorArray  # lazy: Ray only inside map tasks (see current_epoch)

    def column(k: str, v: np.ndarray) -> Any:
        if v.ndim > 1:
            return ArrowTensorArray.from_numpy(v)
        return pa.array(v.tolist(), type=_OBJECT_TYPES[k]) if v.dtype == object else pa.array(v)

    return pa.table({k: column(k, v) for k, v in out.items()})


def _stack(ts: list[torch.Tensor], size: int) -> np.ndarray:
    if not ts:  # every row of the batch was cut by the limit
        return np.zeros((0, 3, size, size), dtype=np.uint8)
    return torch.stack(ts).numpy()
