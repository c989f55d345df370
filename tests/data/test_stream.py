"""The Ray Data view-pair stream on real shards with a real local Ray (2 CPUs), plus its driver-side helpers."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moco_ray.config import AugConfig, DataConfig
from moco_ray.data.ingest import ingest
from moco_ray.data.manifest import check_enough_rows, read_manifest, split_files, steps_per_epoch
from moco_ray.data.stream import eval_dataset, iter_pairs, pair_dataset
from moco_ray.data.views import make_eval, make_pairs

S = 16  # output side: tiny keeps the augmentations cheap


@pytest.fixture(scope="module")
def shards(small_image_root, tmp_path_factory) -> Path:
    """small_image_root ingested into about 40-row shards, so the "files" order has several files to permute."""
    files = [p for p in (small_image_root / "train").rglob("*") if p.is_file()]
    mean = sum(p.stat().st_size for p in files) / len(files)
    out = tmp_path_factory.mktemp("stream") / "shards"
    ingest(small_image_root, out, shard_size_mb=40 * mean / 2**20, progress=False)
    assert len(read_manifest(out).shards_of("train")) >= 6
    return out


def _rows_in_order(root: Path, split: str) -> list[dict]:
    m = read_manifest(root)
    return [r for s in m.shards_of(split) for r in pq.read_table(root / s.path).to_pylist()]


def _collect(ds) -> tuple[list[str], dict[str, dict[str, np.ndarray]]]:
    """One execution of `ds`: row ids in output order and each row's columns."""
    order, rows = [], {}
    for b in ds.iter_batches(batch_size=64, batch_format="numpy"):
        for i, rid in enumerate(b["id"]):
            order.append(str(rid))
            rows[str(rid)] = {k: v[i] for k, v in b.items() if k != "id"}
    return order, rows


def test_driver_side_checks(shards):
    m = read_manifest(shards)
    n = m.rows("train")
    assert steps_per_epoch(m, "train", 32) == n // 32
    assert steps_per_epoch(m, "train", 32, limit=100) == 3
    assert steps_per_epoch(m, "train", 32, max_steps=2) == 2
    assert check_enough_rows(m, "train", n) == n
    with pytest.raises(ValueError, match=r"split 'train' has 10 rows \(data.limit = 10\), fewer than one global"):
        check_enough_rows(m, "train", 32, limit=10)
    with pytest.raises(ValueError, match=r"split 'val' is not in the shards .*splits: test, train"):
        check_enough_rows(m, "val", 32)
    files, drop = split_files(str(shards), m, "train", limit=30)
    first_rows = _rows_in_order(shards, "train")
    kept = [r["id"] for f in files for r in pq.read_table(f).to_pylist() if r["id"] not in drop]
    assert kept == [r["id"] for r in first_rows[:30]]


@pytest.mark.ray
def test_pairs_are_seeded_per_epoch_and_shuffled(ray_local, shards):
    aug = AugConfig(preset="v2", image_size=S, strength=1.0)
    ds = pair_dataset(str(shards), "train", aug, seed=7, limit=300, map_batch_size=32, keep_id=True)
    ds.context.execution_options.preserve_order = True  # output order == the execution's shuffled order
    order0, e0 = _collect(ds)
    order1, e1 = _collect(ds)
    source = {r["id"]: r for r in _rows_in_order(shards, "train")[:300]}
    assert set(e0) == set(e1) == set(source) and len(order0) == 300  # limit: the same first 300 rows each epoch
    for rid, r in e0.items():
        assert r["q"].shape == r["k"].shape == (3, S, S) and r["q"].dtype == np.uint8
        assert r["label"] == source[rid]["label"] and r["corrupt"] == 0
    assert 0 < np.mean([r["q"].mean() for r in e0.values()]) < 255
    assert np.mean([not np.array_equal(r["q"], r["k"]) for r in e0.values()]) > 0.9  # two independent views
    assert np.mean([not np.array_equal(e0[i]["q"], e1[i]["q"]) for i in e0]) > 0.9  # new views each epoch
    assert order0 != order1  # rows reshuffled per execution
    # A fresh dataset resumed at epoch 1 draws exactly epoch 1's views: views = f(seed, epoch, id).
    resumed = pair_dataset(str(shards), "train", aug, seed=7, epoch_offset=1, limit=300, keep_id=True)
    _, r1 = _collect(resumed)
    assert all(np.array_equal(r1[i]["q"], e1[i]["q"]) and np.array_equal(r1[i]["k"], e1[i]["k"]) for i in e1)


@pytest.mark.ray
def test_views_are_drawn_in_parallel_tasks_and_no_listing_actors_start(ray_local, shards):
    """Ray 2.60's default Parquet reader packed a small split into one read task and one block (so one view task,
    one busy core) and started 32 footer-reading actors per epoch (``ListFiles``); the stream must not use it."""
    import re

    ds = pair_dataset(str(shards), "train", AugConfig(preset="v2", image_size=S), seed=0, map_batch_size=32)
    rows = sum(len(b["q"]) for b in ds.iter_batches(batch_size=64, batch_format="numpy"))
    stats = ds.stats()
    assert rows == read_manifest(shards).rows("train")
    assert "ListFiles" not in stats, stats
    tasks = re.search(r"Operator \d+ [^\n]*MapBatches\(make_pairs\)[^\n]*: (\d+) tasks executed", stats)
    assert tasks and int(tasks.group(1)) >= 2, stats


@pytest.mark.ray
def test_strength_zero_gives_identical_views_and_gpu_mode_ships_bytes(ray_local, shards):
    plain = AugConfig(preset="v2", image_size=S, strength=0.0)
    _, rows = _collect(pair_dataset(str(shards), "train", plain, seed=None, limit=40, keep_id=True))
    assert len(rows) == 40 and all(np.array_equal(r["q"], r["k"]) for r in rows.values())
    gpu = AugConfig(preset="v2", image_size=S, device="gpu")
    gpu_ds = pair_dataset(str(shards), "train", gpu, seed=0, limit=8)
    batch = next(iter_pairs(gpu_ds, 8, 1))  # the bytes as stored, collated as a list beside the label tensor
    assert set(batch) == {"jpeg", "label"} and len(batch["jpeg"]) == 8 and isinstance(batch["jpeg"][0], bytes)
    assert batch["label"].shape == (8,)


@pytest.mark.ray
def test_eval_dataset_is_deterministic_and_ordered(ray_local, shards):
    ds = eval_dataset(str(shards), "test", S)
    a = ds.take_batch(1000, batch_format="numpy")
    b = ds.take_batch(1000, batch_format="numpy")
    expected = [r["label"] for r in _rows_in_order(shards, "test")]
    assert a["img"].shape == (len(expected), 3, S, S) and a["img"].dtype == np.uint8
    assert a["label"].tolist() == expected  # manifest order kept
    assert np.array_equal(a["img"], b["img"])


@pytest.mark.ray
def test_corrupt_image_is_counted_not_dropped(ray_local, shards, tmp_path):
    import shutil

    root = tmp_path / "damaged"
    shutil.copytree(shards, root)
    m = json.loads((root / "manifest.json").read_text())
    s = next(x for x in m["shards"] if x["split"] == "train")
    t = pq.read_table(root / s["path"])
    images = t["image"].to_pylist()
    images[3] = b"\xff\xd8\xff\xe0 not really a jpeg"
    pq.write_table(t.set_column(0, "image", pa.array(images, pa.binary())), root / s["path"])
    data = (root / s["path"]).read_bytes()
    s.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (root / "manifest.json").write_text(json.dumps(m))
    aug = AugConfig(preset="v2", image_size=S)
    batch = pair_dataset(str(root), "train", aug, seed=0).take_batch(10_000, batch_format="numpy")
    assert len(batch["label"]) == m["counts"]["train"]  # the row stays (replaced by a batch neighbour)
    assert int(batch["corrupt"].sum()) == 1


@pytest.mark.ray
def test_iter_pairs_streaming_split_equal_steps(ray_local, shards):
    m = read_manifest(shards)
    global_batch, limit, workers = 32, 100, 2
    steps = steps_per_epoch(m, "train", global_batch, limit)
    ds = pair_dataset(str(shards), "train", AugConfig(image_size=S), seed=1, limit=limit)
    its = ds.streaming_split(workers, equal=True)
    got: list[list[tuple]] = [[] for _ in range(workers)]
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            for _epoch in range(2):
                batches = list(iter_pairs(its[rank], global_batch // workers, steps, DataConfig()))
                got[rank].append(tuple((b["q"].shape, b["q"].dtype, int(b["corrupt"].sum())) for b in batches))
        except BaseException as e:  # surfaced below: a thread's assert would be lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    expected = tuple(((global_batch // workers, 3, S, S), torch.uint8, 0) for _ in range(steps))
    assert got == [[expected, expected]] * workers


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_a_batch_cut_empty_by_the_limit_keeps_the_column_types(shards, device):
    """data.limit can cut every row of a batch. The empty result must keep the columns' Arrow types (before: a
    0-row [0,3,S,S] array failed Ray Data's tensor conversion, was pickled as Python objects and warned)."""
    from ray.data.extensions import ArrowTensorArray

    rows = pq.read_table(next(Path(shards).glob("**/*.parquet")), columns=["image", "label", "id"]).slice(0, 3)
    batch = {c: rows[c].to_numpy(zero_copy_only=False) for c in rows.column_names}
    kw = {"preset": "v2", "image_size": 16, "strength": 1.0, "device": device, "seed": 0, "epoch_offset": 0}
    for body, extra in ((make_pairs, {**kw, "keep_id": True}), (make_eval, {"image_size": 16})):
        full = body(batch, **extra)
        empty = body(batch, **extra, drop_ids=frozenset(str(i) for i in batch["id"]))
        assert isinstance(empty, pa.Table) and empty.num_rows == 0
        assert set(empty.column_names) == set(full)
        for name, values in full.items():
            typed = ArrowTensorArray.from_numpy(values) if values.ndim > 1 else pa.array(list(values))
            assert empty.schema.field(name).type == typed.type, name
