"""Ingest to Parquet shards, manifest, validation and decoding: real files, real Parquet, no Ray."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from moco_ray.data.decode import CorruptImageError, decode_batch, decode_image
from moco_ray.data.ingest import ingest
from moco_ray.data.manifest import read_manifest
from moco_ray.data.schema import SHARD_SCHEMA, validate_shards
from moco_ray.data.sources import DatasetUnavailableError


def _tree_files(root: Path) -> dict[str, Path]:
    """id ("split/class/file") -> path, for every image of an ImageFolder tree."""
    return {
        f"{p.parent.parent.name}/{p.parent.name}/{p.name}": p
        for p in root.glob("*/*/*")
        if p.is_file() and not p.name.startswith(".")
    }


def _rows(out: Path) -> list[dict]:
    m = read_manifest(out)
    return [r for s in m.shards for r in pq.read_table(out / s.path).to_pylist()]


def _small_tree(src: Path, dst: Path, per_class: int = 3, classes: int = 2) -> Path:
    for cls_dir in sorted((src / "train").iterdir())[:classes]:
        (dst / "train" / cls_dir.name).mkdir(parents=True)
        for f in sorted(cls_dir.iterdir())[:per_class]:
            shutil.copyfile(f, dst / "train" / cls_dir.name / f.name)
    return dst


@pytest.fixture(scope="module")
def ingested(image_root, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("shards") / "full"
    # small shards so the split into several files and the row-group limit are exercised
    return out, ingest(image_root, out, shard_size_mb=0.5, row_group_rows=256, progress=False)


def test_ingest_counts_bytes_and_manifest(image_root, ingested):
    out, m = ingested
    files = _tree_files(image_root)
    classes = sorted(d.name for d in (image_root / "train").iterdir() if d.is_dir())
    assert m.classes == classes
    for split in ("train", "test"):
        assert m.counts[split] == sum(1 for i in files if i.startswith(split + "/"))
        for c in classes:
            assert m.class_counts[split][c] == sum(1 for i in files if i.startswith(f"{split}/{c}/"))
    assert len(m.shards_of("train")) > 1  # 0.5 MB target on a multi-MB split
    rows = _rows(out)
    assert len(rows) == len(files) and len({r["id"] for r in rows}) == len(rows)
    first = [r["label"] for r in rows if r["id"].startswith("train/")][:100]
    assert len(set(first)) >= len(classes) // 2  # rows are permuted, not class by class: limits stay mixed
    for r in rows:  # bytes unchanged, label consistent with the class directory
        assert r["image"] == files[r["id"]].read_bytes()
        assert classes[r["label"]] == r["id"].split("/")[1]
        assert Path(r["path"]) == files[r["id"]].resolve()
    for s in m.shards:
        data = (out / s.path).read_bytes()
        assert s.bytes == len(data) and s.sha256 == hashlib.sha256(data).hexdigest()
        pf = pq.ParquetFile(out / s.path)
        assert pf.metadata.num_rows == s.rows
        assert all(pf.metadata.row_group(i).num_rows <= 256 for i in range(pf.metadata.num_row_groups))
        assert pf.metadata.row_group(0).column(0).compression == "UNCOMPRESSED"  # the image column
        assert pf.schema_arrow.equals(SHARD_SCHEMA)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["schema_version"] == 1 and on_disk["skipped"] == [] and on_disk["version"]
    assert validate_shards(out, checksums=True).counts == m.counts


def test_second_ingest_is_a_noop(image_root, ingested):
    out, m = ingested
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = ingest(image_root, out, shard_size_mb=0.5, row_group_rows=256, progress=False)
    assert again.fingerprint == m.fingerprint and again.shards == m.shards
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert not list(out.rglob("*.tmp"))


def _bad_tree(small_image_root: Path, dst: Path) -> tuple[Path, dict[str, str]]:
    root = _small_tree(small_image_root, dst)
    cls = sorted((root / "train").iterdir())[0]
    good = next(cls.iterdir()).read_bytes()
    buf = io.BytesIO()
    Image.open(io.BytesIO(good)).convert("RGB").resize((64, 64)).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    bad = {
        "empty.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "notes.jpg": b"this is a text file, not a JPEG\n",
        "readme.txt": b"hello\n",
    }
    for name, data in bad.items():
        (cls / name).write_bytes(data)
    return root, {str((cls / n).resolve()): n for n in bad}


def test_bad_files_are_skipped_and_listed(small_image_root, tmp_path, caplog):
    root, bad = _bad_tree(small_image_root, tmp_path / "src")
    with caplog.at_level("WARNING"):
        m = ingest(root, tmp_path / "out", progress=False)
    assert {s["path"] for s in m.skipped} == set(bad)
    reasons = {bad[s["path"]]: s["reason"] for s in m.skipped}
    assert "empty" in reasons["empty.jpg"]
    assert "undecodable JPEG" in reasons["truncated.jpg"]
    assert "not an image" in reasons["notes.jpg"] and "not an image" in reasons["readme.txt"]
    assert m.counts["train"] == 6  # 2 classes x 3 good images
    assert read_manifest(tmp_path / "out").skipped == m.skipped
    assert "skipped 4 bad image file(s)" in caplog.text


def test_strict_fails_naming_the_files_and_writes_nothing(small_image_root, tmp_path):
    root, _ = _bad_tree(small_image_root, tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"4 bad image file\(s\).*empty\.jpg") as e:
        ingest(root, out, strict=True, progress=False)
    assert "\n" not in str(e.value)
    assert not out.exists()


def test_existing_different_output_needs_overwrite(small_image_root, tmp_path):
    a = _small_tree(small_image_root, tmp_path / "a", per_class=2)
    b = _small_tree(small_image_root, tmp_path / "b", per_class=4)
    out = tmp_path / "out"
    ingest(a, out, progress=False)
    with pytest.raises(ValueError, match="different content; pass overwrite=True"):
        ingest(b, out, progress=False)
    assert read_manifest(out).counts == {"train": 4}
    m = ingest(b, out, overwrite=True, progress=False)
    assert m.counts == {"train": 8} and sum(s.rows for s in read_manifest(out).shards) == 8
    assert sorted(p.name for p in (out / "train").iterdir()) == [s.path.split("/")[1] for s in m.shards]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match="not a moco-ray shard directory"):
        ingest(a, foreign, progress=False)


def test_flat_class_layout_is_one_train_split(small_image_root, tmp_path):
    tree = _small_tree(small_image_root, tmp_path / "nested", per_class=2)
    flat = tree / "train"  # class/image
    m = ingest(flat, tmp_path / "out", progress=False)
    assert m.splits == ["train"] and m.counts == {"train": 4}
    assert _rows(tmp_path / "out")[0]["id"].startswith("train/")


def test_digits_ingest_offline(tmp_path):
    m = ingest("digits", tmp_path / "digits", progress=False)
    assert m.source == "digits" and m.classes == [str(i) for i in range(10)]
    assert m.counts == {"train": 1438, "test": 359}  # scikit-learn's 1,797 digits, 80/20
    row = pq.read_table(tmp_path / "digits" / m.shards[0].path).slice(0, 1).to_pylist()[0]
    assert row["id"].startswith("digits/train/") and row["path"].startswith("sklearn:digits:train:")
    assert decode_image(row["image"]).shape == (3, 32, 32)


def test_torchvision_download_failure_is_one_clear_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):  # the network edge: no route to the download server
        raise urllib.error.URLError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetUnavailableError, match=r"torchvision:cifar10: not in .* download failed") as e:
        ingest("torchvision:cifar10", tmp_path / "out", cache_dir=str(tmp_path / "cache"), progress=False)
    assert "\n" not in str(e.value) and "Network is unreachable" in str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="unknown dataset"):
        ingest("torchvision:mnistx", tmp_path / "out")


# ---- validate_shards: each damage gives its own clear error ----


@pytest.fixture
def shards(small_image_root, tmp_path) -> Path:
    out = tmp_path / "shards"
    ingest(_small_tree(small_image_root, tmp_path / "src", per_class=5, classes=3), out, progress=False)
    return out


def _rewrite_shard(root: Path, table: pa.Table) -> None:
    """Replace the first shard by `table` and make the manifest agree (so only the content is wrong)."""
    m = json.loads((root / "manifest.json").read_text())
    s = m["shards"][0]
    pq.write_table(table, root / s["path"])
    data = (root / s["path"]).read_bytes()
    s.update(rows=table.num_rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (root / "manifest.json").write_text(json.dumps(m))


def test_validate_missing_manifest(shards):
    (shards / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest.json"):
        validate_shards(shards)


def test_validate_missing_and_truncated_shard(shards):
    shard = next(shards.glob("train/part-*.parquet"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"part-00000.parquet has \d+ bytes.*truncated"):
        validate_shards(shards)
    shard.write_bytes(data[:-16] + b"\0" * 16)  # same size, broken footer
    with pytest.raises(ValueError, match="part-00000.parquet is not a readable Parquet file"):
        validate_shards(shards)
    shard.unlink()
    with pytest.raises(ValueError, match="part-00000.parquet listed in the manifest is missing"):
        validate_shards(shards)


def test_validate_checksum_mismatch(shards):
    shard = next(shards.glob("train/part-*.parquet"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # inside the first image: the footer still reads
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fails its sha256 checksum"):
        validate_shards(shards, checksums=True)
    assert validate_shards(shards, checksums=False).counts["train"] == 15  # the cheap mode skips the hash


def test_validate_wrong_schema_and_missing_column(shards):
    t = pq.read_table(next(shards.glob("train/part-*.parquet")))
    _rewrite_shard(shards, t.drop_columns(["path"]))
    with pytest.raises(ValueError, match=r"missing column\(s\) path"):
        validate_shards(shards)
    _rewrite_shard(shards, t.set_column(1, "label", pa.array([str(v) for v in t["label"].to_pylist()])))
    with pytest.raises(ValueError, match="column 'label' has type string, expected int64"):
        validate_shards(shards)


def test_validate_empty_dataset(shards):
    m = json.loads((shards / "manifest.json").read_text())
    m["shards"], m["counts"] = [], {"train": 0}
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="empty dataset"):
        validate_shards(shards)


# ---- decode ----


def test_decode_modes_and_corrupt_bytes():
    rgba = np.zeros((5, 7, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    for mode, arr in (("L", rgba[..., 0]), ("RGBA", rgba), ("RGB", rgba[..., :3])):
        buf = io.BytesIO()
        Image.fromarray(arr, mode=mode).save(buf, format="PNG")
        t = decode_image(buf.getvalue())
        assert t.shape == (3, 5, 7) and t.dtype == torch.uint8 and int(t[0, 0, 0]) == 200
    with pytest.raises(CorruptImageError, match="corrupt image"):
        decode_image(b"\x89PNG\r\n\x1a\n garbage")


def test_decode_batch_replaces_and_flags_corrupt():
    good = []
    for v in (10, 90):
        buf = io.BytesIO()
        Image.fromarray(np.full((4, 4, 3), v, dtype=np.uint8)).save(buf, format="PNG")
        good.append(buf.getvalue())
    imgs, corrupt = decode_batch([good[0], b"junk", good[1]])
    assert corrupt.tolist() == [0, 1, 0] and len(imgs) == 3
    assert torch.equal(imgs[1], imgs[0]) or torch.equal(imgs[1], imgs[2])  # a valid neighbour stands in
    imgs, corrupt = decode_batch([b"", b"junk"])
    assert corrupt.tolist() == [1, 1] and all(int(t.float().mean()) == 128 for t in imgs)


def test_data_package_imports_without_ray():
    code = (
        "import sys, moco_ray.data, moco_ray.data.ingest, moco_ray.data.schema, moco_ray.data.stream, "
        "moco_ray.data.views, moco_ray.data.eval_images, moco_ray.data.gpu_augment; "
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
