"""The Ray Data ingest (`moco_ray.data.ray_ingest`) on the session's real local Ray against a real S3 API (moto's
server on loopback; trees uploaded with s3fs): the local ingest's rows, the manifest as the commit point, reruns.

Mutations each test was checked against (put back by hand, the test failed) are in the test's docstring.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from s3_trees import BAD_FILES, add_bad_files, image_tree, objects, put, upload

from moco_ray.data.ingest import ingest
from moco_ray.data.manifest import Manifest, read_manifest, resolve_fs
from moco_ray.data.ray_ingest import ShardPlan, TaskSpec, _bar, _execute, plan_shards, ray_ingest, spread_target
from moco_ray.data.schema import validate_shards
from moco_ray.data.sources import Item

pytestmark = pytest.mark.ray

BUCKET = "ray-ingest"


def _rows(root: str | Path, m: Manifest) -> list[tuple[str, int, bytes]]:
    """(id, label, image bytes) of every row, in manifest order."""
    fs, base = resolve_fs(root)
    return [
        (r["id"], r["label"], r["image"])
        for s in m.shards
        for r in pq.read_table(f"{base}/{s.path}", filesystem=fs, columns=["id", "label", "image"]).to_pylist()
    ]


def _skipped(m: Manifest, root: str) -> list[tuple[str, str]]:
    """The skipped files as (path below the source root, reason), in manifest order."""
    return [(s["path"].removeprefix(root).lstrip("/"), s["reason"]) for s in m.skipped]


def _shards_and_manifest(uri: str) -> set[str]:
    return {k for k in objects(uri) if k == "manifest.json" or "/part-" in k}


@pytest.fixture(scope="module")
def tree(s3, tmp_path_factory) -> tuple[Path, str]:
    """A two-split, three-class tree with three bad files, locally and uploaded to S3."""
    local = add_bad_files(image_tree(tmp_path_factory.mktemp("tree") / "src", 4, 3, ("train", "test")))
    return local, upload(local, f"{s3.bucket(BUCKET)}/tree")


def test_an_uploaded_tree_ingests_into_the_local_rows(ray_local, tree, tmp_path, s3):
    """Same ids, labels and bytes in the same order, the same bad files with the same reasons, counts and classes;
    sha256 per shard holds over S3. Mutations: the decode probe dropped from the shard task (a loader returning the
    bytes unchecked: the truncated PNG became a row); rows in listing order instead of `_shuffled`'s."""
    local, uri = tree
    expected = ingest(local, tmp_path / "local", progress=False)
    out = f"{s3.bucket(BUCKET)}/same-rows"
    m = ray_ingest(uri, out, shard_size_mb=64, progress=False).manifest  # the local default: the same options

    assert _rows(out, m) == _rows(tmp_path / "local", expected)
    assert _skipped(m, uri) == _skipped(expected, str(local)) and len(m.skipped) == len(BAD_FILES)
    assert [r for _, r in _skipped(m, uri)] == [r for _, r in _skipped(expected, str(local))]
    assert (m.classes, m.counts, m.class_counts) == (expected.classes, expected.counts, expected.class_counts)
    assert m.options == expected.options and m.source == uri
    assert read_manifest(out).to_dict() == m.to_dict()
    assert validate_shards(out, checksums=True).counts == {"train": 12, "test": 12}
    assert all(re.fullmatch(rf"{s.split}/part-\d{{5}}-{m.fingerprint[:12]}\.parquet", s.path) for s in m.shards)
    assert _shards_and_manifest(out) == {"manifest.json", *(s.path for s in m.shards)}


def test_a_rerun_is_a_noop_and_a_replacement_deletes_the_old_shards(ray_local, s3, tmp_path):
    """The same ingest again touches no object; a changed source is refused without overwrite and leaves OUT as it
    was; with overwrite its shards replace the old ones, which are deleted. Mutations: `_out_state` never reporting
    "done" (the rerun rewrote the manifest and shards); `_collect_garbage` skipped (the old shards stayed)."""
    uri = upload(image_tree(tmp_path / "src"), f"{s3.bucket(BUCKET)}/rerun-src")
    out = f"{s3.bucket(BUCKET)}/rerun-out"
    first = ray_ingest(uri, out, progress=False)
    before = objects(out)

    again = ray_ingest(uri, out, progress=False)
    assert again.already_done and again.nodes == [] and again.manifest.to_dict() == first.manifest.to_dict()
    assert objects(out) == before

    put(f"{uri}/train/c01/extra.png", (tmp_path / "src" / "train" / "c00" / "000.png").read_bytes())
    with pytest.raises(ValueError, match="different content; pass overwrite=True") as e:
        ray_ingest(uri, out, progress=False)
    assert "\n" not in str(e.value) and objects(out) == before

    new = ray_ingest(uri, out, overwrite=True, progress=False).manifest
    assert new.counts == {"train": 7} and new.fingerprint != first.manifest.fingerprint
    assert _shards_and_manifest(out) == {"manifest.json", *(s.path for s in new.shards)}
    assert validate_shards(out, checksums=True).counts == {"train": 7}


def test_strict_refuses_and_keeps_nothing(ray_local, tree, s3):
    """strict: the bad files named in one error after the tasks ran, and neither a manifest nor any shard left.
    Mutation: `_discard` not called on failure (the written shards stayed)."""
    _, uri = tree
    out = f"{s3.bucket(BUCKET)}/strict"
    with pytest.raises(ValueError, match=r"3 bad image file\(s\) in s3://.*empty\.png \(empty file") as e:
        ray_ingest(uri, out, strict=True, shard_size_mb=0.001, progress=False)
    assert "\n" not in str(e.value)
    assert _shards_and_manifest(out) == set()


def test_a_cut_ingest_is_no_ingest_and_the_next_one_replaces_its_leftovers(ray_local, tree, s3):
    """Shards without a manifest (what a killed ingest leaves, as a kill leaves them) are no finished ingest; the
    next ingest writes its own and deletes them. Mutation: `_collect_garbage` skipped (the leftover stayed)."""
    _, uri = tree
    out = f"{s3.bucket(BUCKET)}/cut"
    put(f"{out}/train/part-00003-0123456789ab.parquet", b"PAR1 half a shard")
    with pytest.raises(ValueError, match="no manifest.json"):
        validate_shards(out)
    m = ray_ingest(uri, out, progress=False).manifest
    assert _shards_and_manifest(out) == {"manifest.json", *(s.path for s in m.shards)}
    assert validate_shards(out, checksums=True).counts == m.counts


def test_a_dataset_by_name_ingests_into_the_local_rows(ray_local, s3, tmp_path):
    """``digits`` (opened on the workers, tasks anywhere) into S3: the local ingest's rows. Mutation: the
    dataset's name not passed to the tasks (`TaskSpec.source` empty: every task failed)."""
    expected = ingest("digits", tmp_path / "local", split="test", progress=False)
    out = f"{s3.bucket(BUCKET)}/digits"
    m = ray_ingest("digits", out, split="test", progress=False).manifest
    assert _rows(out, m) == _rows(tmp_path / "local", expected)
    assert m.counts == {"test": 359}


def test_small_data_is_spread_over_the_cpus_and_shards_follow_the_writers_rule():
    """Shards shrink to give every CPU two, not below 1 MB; a shard ends at the row that reaches the target, and
    never spans two splits."""
    mb = 1 << 20
    assert spread_target(40 * mb, 2, 128 * mb) == 10 * mb
    assert spread_target(2 * mb, 2, 128 * mb) == 1 * mb  # small data: 1 MB shards, not 0.5 MB
    assert spread_target(10_000 * mb, 16, 128 * mb) == 128 * mb
    assert spread_target(2 * mb, 2, 0.1 * mb) == 0.1 * mb  # an asked-for small target stays
    items = [Item("train", 0, f"train/{i}", str(i)) for i in range(5)] + [Item("test", 0, "test/0", "t")]
    plans = plan_shards(items, [3, 3, 3, 3, 3, 1], 6)
    assert [(p.split, p.index, [it.id for it in p.items]) for p in plans] == [
        ("train", 0, ["train/0", "train/1"]),
        ("train", 1, ["train/2", "train/3"]),
        ("train", 2, ["train/4"]),
        ("test", 0, ["test/0"]),
    ]


def test_an_unreadable_object_or_an_unwritable_shard_stops_the_ingest_in_one_line(ray_local, tree, s3):
    """A read that fails for another reason than a missing object (here: nobody listening at the endpoint, after
    the client's retries), and a shard upload that fails (no such bucket), each stop the shard tasks with one line
    naming the object, instead of a bad-file entry or a worker traceback. Mutation: `ObjectStoreError` not raised
    by `_Reader` (the unreachable object was listed as a bad file and the shard task succeeded)."""
    _, uri = tree
    item = Item(
        "train", 0, "train/c00/000.png", f"{uri}/train/c00/000.png", f"{uri.removeprefix('s3://')}/train/c00/000.png"
    )
    plans = [ShardPlan("train", 0, [item])]
    task = TaskSpec(f"{s3.bucket(BUCKET)}/errors", "0123456789ab", "uri", uri, None, None, 1024, 2)
    dead = replace(task, source=f"{uri}?endpoint_override=127.0.0.1:9&scheme=http")
    with pytest.raises(ValueError, match=r"ingest stopped: s3://.*/train/c00/000\.png: read failed \(.*NETWORK") as e:
        _execute(plans, dead, None, _bar(1, uri, False))
    assert "\n" not in str(e.value) and str(e.value).endswith("; nothing was committed")
    with pytest.raises(ValueError, match=r"cannot write s3://no-such-bucket-here/x/train/part-00000-0123456789ab"):
        _execute(plans, replace(task, out="s3://no-such-bucket-here/x"), None, _bar(1, uri, False))
