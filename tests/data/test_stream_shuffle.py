"""Each epoch's order of the view-pair stream (issue #36), on real shards with a real local Ray (2 CPUs).

The official loaders reshuffle the whole data set every epoch, so two epochs' batches share a pair of images
about as often as two random permutations do: co-batch fraction (B-1)/(N-1) (`moco_ray.data.shuffle_quality`).
Here N = 400 (small_shards' train split, one shard), B = 32: expected 0.0746. The streams are consumed the way
training consumes them (`iter_pairs` with a DataConfig) for two consecutive epochs.

The local buffer is scaled to the split: 64 of 400 rows. The production default (1,024) holds this whole split,
which makes any order look random here; against CIFAR-10's 50,000 rows the same buffer left consecutive epochs
11x the random co-batch fraction (1 shard) and 4x (shards of 580 rows), benchmarks/bench_shuffle.py.
"""

from __future__ import annotations

from typing import get_args, get_type_hints

import pytest
import torch

from moco_ray.config import AugConfig, DataConfig, from_dict
from moco_ray.data.manifest import read_manifest, steps_per_epoch
from moco_ray.data.shuffle_quality import co_batch_fraction, expected_co_batch_fraction
from moco_ray.data.stream import SHUFFLES, iter_pairs, pair_dataset

B, SEED = 32, 3
SCALED_BUFFER = 64  # rows: see the module docstring
Epoch = tuple[list[str], dict[str, tuple[torch.Tensor, torch.Tensor]]]


def _epochs(shards: str, cfg: DataConfig, count: int, epoch_offset: int = 0) -> list[Epoch]:
    """`count` consecutive epochs of one stream: the ids in the order consumed, and each id's (q, k)."""
    aug = AugConfig(preset="v2", image_size=8)
    ds = pair_dataset(shards, "train", aug, seed=SEED, epoch_offset=epoch_offset, keep_id=True, shuffle=cfg.shuffle)
    steps = steps_per_epoch(read_manifest(shards), "train", B)
    out = []
    for _ in range(count):
        order, views = [], {}
        for b in iter_pairs(ds, B, steps, cfg):
            order += b["id"]
            views |= {rid: (b["q"][i], b["k"][i]) for i, rid in enumerate(b["id"])}
        out.append((order, views))
    return out


@pytest.fixture(scope="module")
def streams(ray_local, small_shards) -> dict[str, list[Epoch]]:
    """Two epochs of the default order and of the "files" order, and a resumed default stream's first epoch."""
    root = str(small_shards)
    return {
        "default": _epochs(root, DataConfig(shuffle_buffer=SCALED_BUFFER), 2),
        "files": _epochs(root, DataConfig(shuffle="files", shuffle_buffer=SCALED_BUFFER), 2),
        "resumed": _epochs(root, DataConfig(shuffle_buffer=SCALED_BUFFER), 1, epoch_offset=1),
    }


@pytest.mark.ray
def test_default_order_reshuffles_like_a_random_permutation(streams, small_shards):
    """Default order: co-batch fraction within 0.75-1.25x of random; "files" order above 1.5x.

    Spread measured over seeds 0-15 through this stream (2026-12-05, 2 CPUs, load 13): default 0.0697-0.0832
    (0.93-1.12x), the "files" order with this buffer 0.1378-0.1487 (1.85-1.99x; buffer 32: 1.77-1.93x). Of two
    NumPy permutations, 200 seeds: 0.87-1.12x, sd 0.044x. Mutations caught: ``DataConfig.shuffle`` defaulting to
    "files" again (1.9x) and the full shuffle without ``reseed_after_execution`` (the same permutation every epoch:
    13.4x) failed here.
    """
    expected = expected_co_batch_fraction(read_manifest(small_shards).rows("train"), B)
    (e0, _), (e1, _) = streams["default"]
    assert len(e0) == len(e1) == 12 * B
    assert 0.75 * expected < co_batch_fraction(e0, e1, B) < 1.25 * expected
    (f0, _), (f1, _) = streams["files"]
    assert co_batch_fraction(f0, f1, B) > 1.5 * expected


@pytest.mark.ray
def test_views_depend_on_seed_epoch_and_id_only(streams):
    """The same (seed, epoch, id) gives the same views in either order and in a run resumed at that epoch; the
    next epoch gives new ones. Mutation caught: each row's generator keyed by its map batch's first id and its
    position there instead of its own id (views then follow the order) failed here."""
    (d0, dv0), (d1, dv1) = streams["default"]
    (_, fv0), (_, fv1) = streams["files"]
    ((_, rv1),) = streams["resumed"]
    for default, other in ((dv0, fv0), (dv1, fv1), (dv1, rv1)):
        common = default.keys() & other.keys()
        assert len(common) >= 350  # each epoch drops a different partial batch (16 of 400 rows)
        assert all(torch.equal(default[i][0], other[i][0]) and torch.equal(default[i][1], other[i][1]) for i in common)
    again = dv0.keys() & dv1.keys()
    assert sum(not torch.equal(dv0[i][0], dv1[i][0]) for i in again) > 0.9 * len(again)


def test_shuffle_setting_is_checked_where_it_is_set(small_shards):
    """``data.shuffle``: the config's values are the stream's, and a bad one is refused in one line."""
    assert get_args(get_type_hints(DataConfig)["shuffle"]) == SHUFFLES
    assert DataConfig().shuffle == "full"
    with pytest.raises(ValueError, match=r"data.shuffle: 'rows' is not one of full, files"):
        from_dict({"data": {"shuffle": "rows"}})
    with pytest.raises(ValueError, match=r"shuffle: 'rows' is out of range; allowed: full, files"):
        pair_dataset(str(small_shards), "train", AugConfig(image_size=8), seed=0, shuffle="rows")
