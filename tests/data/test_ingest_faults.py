"""Ingest faults (issues #18, #33): symlink loops and dangling links, an output inside the source tree, a manifest
with wrongly typed fields, the --overwrite hint, empty class folders (refused), a one-class source (one warning),
file names that are not UTF-8, and an output that cannot be written (a file in the way, a read-only or full file
system: real tmpfs mounts). Real files, real Parquet; the CLI's line through the real CLI."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest
from ingest_trees import cli_ingest, files_state, image_tree, one_error_line
from moco_helpers import remount_read_only, tmpfs

from moco_ray.data import ingest as ingest_module
from moco_ray.data.ingest import ingest
from moco_ray.data.manifest import read_manifest
from moco_ray.data.schema import validate_shards
from moco_ray.data.sources import path_bytes, path_text

# ---- symlinks ----


def _linked_tree(root: Path) -> tuple[Path, dict[str, str]]:
    """A 2x3 image tree plus broken links at each level ImageFolder looks at; returns (root, {path: reason})."""
    image_tree(root)
    a, b = root / "train" / "c00", root / "train" / "c01"
    os.symlink("loop2.png", a / "loop1.png")  # a cycle of file links: ELOOP
    os.symlink("loop1.png", a / "loop2.png")
    os.symlink("self.png", b / "self.png")  # a link to itself
    os.symlink("gone.png", b / "dangling.png")
    os.symlink("..", a / "up")  # a directory link to an ancestor: a walk following it never ends
    os.symlink(root, root / "train" / "c99")  # a "class" that is the whole tree again
    os.symlink("nowhere", root / "train" / "c98")  # a dangling "class" directory
    os.symlink("000.png", a / "alias.png")  # a good link: followed, a row like any file
    expect = {
        a / "loop1.png": "symlink loop",
        a / "loop2.png": "symlink loop",
        b / "self.png": "symlink loop",
        b / "dangling.png": "dangling symlink",
        a / "up": "symlink loop",
        root / "train" / "c99": "symlink loop",
        root / "train" / "c98": "dangling symlink",
    }
    return root, {str(p): r for p, r in expect.items()}


def test_broken_symlinks_are_skipped_and_listed(tmp_path, caplog):
    root, broken = _linked_tree(tmp_path / "src")
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        m = ingest(root, out, progress=False)
    assert {s["path"]: s["reason"] for s in m.skipped} == broken
    assert m.classes == ["c00", "c01"] and m.counts == {"train": 7}  # 6 images + the good alias
    assert read_manifest(out).skipped == m.skipped
    assert f"skipped {len(broken)} bad image file(s)" in caplog.text
    assert validate_shards(out, checksums=True).counts == {"train": 7}
    before = files_state(out)
    assert ingest(root, out, progress=False).fingerprint == m.fingerprint  # the re-run is a no-op
    assert files_state(out) == before
    os.unlink(root / "train" / "c01" / "dangling.png")  # a repaired tree is a different source
    with pytest.raises(ValueError, match="different content"):
        ingest(root, out, progress=False)


def test_broken_symlinks_with_strict_are_one_error_and_nothing_written(tmp_path):
    root, broken = _linked_tree(tmp_path / "src")
    out = tmp_path / "out"
    line = one_error_line(cli_ingest(root, out, "--strict"))
    assert f"{len(broken)} bad image file(s) in {root}" in line
    assert "c00/loop1.png (symlink loop)" in line and "c01/dangling.png (dangling symlink)" in line
    assert line.endswith("; and 2 more")  # the first five, sorted by path
    assert not out.exists()


def test_flat_tree_with_a_looping_class_directory(tmp_path):
    root = image_tree(tmp_path / "src") / "train"  # class/image
    os.symlink(root, root / "again")
    os.symlink(".", root / "c00" / "here")
    m = ingest(root, tmp_path / "out", progress=False)
    assert m.classes == ["c00", "c01"] and m.counts == {"train": 6}
    assert {s["path"]: s["reason"] for s in m.skipped} == {
        str(root / "again"): "symlink loop",
        str(root / "c00" / "here"): "symlink loop",
    }


# ---- an output directory inside the source tree ----


def test_output_inside_the_source_tree_is_refused(tmp_path):
    root = image_tree(tmp_path / "imgs")
    for inside in (root / "shards", root / "train" / "shards", root):
        line = one_error_line(cli_ingest(root, inside))
        assert f"{inside}: is inside the source tree {root}" in line and "choose an output directory outside" in line
        assert not (root / "shards").exists() and not (root / "train" / "shards").exists()
    again = cli_ingest(root, root / "shards")  # the re-run: the same refusal, still nothing written
    assert "is inside the source tree" in one_error_line(again)
    link = tmp_path / "link"
    link.symlink_to(root)  # the same tree through a symlink
    assert "is inside the source tree" in one_error_line(cli_ingest(root, link / "shards"))
    # beside it is fine, and the re-run is a no-op
    out = tmp_path / "imgs-shards"
    assert cli_ingest(root, out).returncode == 0
    before = files_state(out)
    assert cli_ingest(root, out).returncode == 0 and files_state(out) == before
    assert validate_shards(out, checksums=True).counts == {"train": 6}


# ---- the --overwrite hint ----


def test_refusals_name_the_cli_flag(tmp_path):
    a, b = image_tree(tmp_path / "a", per_class=2), image_tree(tmp_path / "b", per_class=3)
    out = tmp_path / "out"
    ingest(a, out, progress=False)
    line = one_error_line(cli_ingest(b, out))
    assert "different content; pass overwrite=True (--overwrite) to replace it" in line
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.md").write_text("mine")
    line = one_error_line(cli_ingest(a, foreign))
    assert "not a moco-ray shard directory (notes.md)" in line and "pass overwrite=True (--overwrite)" in line


# ---- empty class folders and a single class ----


def test_empty_class_folders_are_refused_by_name_and_nothing_written(tmp_path):
    """Mutation: without ``ImageFolderSource._refuse_empty`` the tree ingests, c02 and c03 classes of 0 images."""
    root = image_tree(tmp_path / "src")
    (root / "train" / "c02").mkdir()
    (root / "train" / "c03").mkdir()
    (root / "train" / "c03" / ".DS_Store").write_bytes(b"\0")  # hidden files are no data: still empty
    out = tmp_path / "out"
    line = one_error_line(cli_ingest(root, out))
    assert f"{root}: no files in class folder(s) train/c02, train/c03; an empty class would still take a label" in line
    assert not out.exists()
    flat = root / "train"  # class/image: the folder is named as it sits under the root
    assert "no files in class folder(s) c02, c03;" in one_error_line(cli_ingest(flat, out))
    for empty, full in (("c02", "c00"), ("c03", "c01")):
        (root / "train" / empty / "000.png").write_bytes((root / "train" / full / "000.png").read_bytes())
    ingest(root, out, progress=False)  # a finished ingest, then a class folder emptied: refused, it stays intact
    before = files_state(out)
    (root / "train" / "c03" / "000.png").unlink()
    with pytest.raises(ValueError, match=r"no files in class folder\(s\) train/c03;"):
        ingest(root, out, overwrite=True, progress=False)
    assert files_state(out) == before


def test_one_class_is_ingested_with_one_warning(tmp_path):
    """Unlabeled images as one folder are allowed, with one warning line (mutation: without ``_warn_one_class`` the
    stderr is empty); two classes give no warning."""
    root = image_tree(tmp_path / "src", classes=1) / "train"  # class/image: one class, c00
    p = cli_ingest(root, tmp_path / "out")
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [
        f"moco-ray: warning: {root} has one class (c00): kNN/linear accuracy will be meaningless"
    ]
    assert read_manifest(tmp_path / "out").counts == {"train": 3}
    p = cli_ingest(image_tree(tmp_path / "two"), tmp_path / "out2")
    assert (p.returncode, p.stderr) == (0, "")


# ---- file names that are not UTF-8 ----

LATIN1 = b"caf\xe9"  # "café" as Latin-1 wrote it: not valid UTF-8


def _rename_bytes(path: Path, name: bytes) -> bytes:
    """Rename `path` to the raw file name `name` in the same directory; returns the new path's bytes."""
    new = os.fsencode(path.parent) + b"/" + name
    os.rename(os.fsencode(path), new)
    return new


def _all_rows(out: Path) -> list[dict]:
    return [r for s in read_manifest(out).shards for r in pq.read_table(out / s.path).to_pylist()]


def test_non_utf8_names_are_ingested_byte_exact_with_stable_ids(tmp_path):
    """A Latin-1 file name and a Latin-1 class folder: rows like any other, the path column gives the exact bytes
    back, the id is the same every ingest. Mutation: `Item.path` as plain ``str(base / rel)`` again (no
    `path_text`) fails the whole ingest with "'utf-8' codec can't encode character '\\udce9' ... surrogates not
    allowed" (as did ids and class names without `shown_name`)."""
    root = image_tree(tmp_path / "src")
    latin_file = _rename_bytes(root / "train" / "c00" / "000.png", LATIN1 + b".png")
    latin_class = _rename_bytes(root / "train" / "c01", LATIN1)
    out = tmp_path / "out"
    p = cli_ingest(root, out)
    assert (p.returncode, p.stderr) == (0, ""), p.stderr
    m = read_manifest(out)
    assert m.classes == ["c00", "caf\\xe9"] and m.counts == {"train": 6} and m.skipped == []
    rows = _all_rows(out)
    for r in rows:  # every stored path gives back the file's exact bytes, and the file holds the stored image
        with open(path_bytes(r["path"]), "rb") as f:
            assert f.read() == r["image"]
    by_id = {r["id"]: r for r in rows}
    assert path_bytes(by_id["train/c00/caf\\xe9.png"]["path"]) == latin_file
    assert by_id["train/c00/caf\\xe9.png"]["path"] == "file://" + quote(str(root)) + "/train/c00/caf%E9.png"
    assert {r["label"] for r in rows if r["id"].startswith("train/caf\\xe9/")} == {1}
    assert sorted(i for i in by_id if i.startswith("train/caf")) == [f"train/caf\\xe9/{i:03d}.png" for i in range(3)]
    assert all(path_bytes(r["path"]).startswith(latin_class) for r in rows if r["label"] == 1)
    assert validate_shards(out, checksums=True).counts == {"train": 6}
    before = files_state(out)
    rerun = ingest(root, out, shard_size_mb=64.0, progress=False)  # as the CLI passes it (64 and 64.0 differ)
    assert rerun.fingerprint == m.fingerprint and files_state(out) == before  # the re-run is a no-op
    ingest(root, tmp_path / "again", progress=False)
    assert {r["id"] for r in _all_rows(tmp_path / "again")} == set(by_id)  # another ingest: the same ids


def test_path_text_round_trips_and_leaves_utf8_paths_alone():
    assert path_text("/data/train/c00/café.png") == "/data/train/c00/café.png"  # valid UTF-8: as it was
    raw = b"/data/a b/%41/caf\xe9.png"
    text = path_text(os.fsdecode(raw))
    assert text == "file:///data/a%20b/%2541/caf%E9.png" and path_bytes(text) == raw


def test_non_utf8_name_whose_escaped_form_is_taken_is_skipped_and_listed(tmp_path):
    """b"caf\\xe9.png" beside a file really named ``caf\\xe9.png`` (a backslash in it): both would get the id
    train/c00/caf\\xe9.png, so the undecodable one is skipped and listed. Mutation: without that check in
    ``ImageFolderSource._class_files`` both are rows under one id."""
    root = image_tree(tmp_path / "src")
    c00 = root / "train" / "c00"
    (c00 / "caf\\xe9.png").write_bytes((c00 / "002.png").read_bytes())
    latin = _rename_bytes(c00 / "001.png", LATIN1 + b".png")
    m = ingest(root, tmp_path / "out", progress=False)
    assert m.skipped == [
        {
            "path": path_text(os.fsdecode(latin)),
            "reason": "name not UTF-8, and its escaped form caf\\xe9.png is another file's name",
        }
    ]
    ids = [r["id"] for r in _all_rows(tmp_path / "out")]
    assert len(ids) == len(set(ids)) == 6 and "train/c00/caf\\xe9.png" in ids


# ---- an output that cannot be written ----


def _source(tmp_path: Path, per_class: int = 8) -> Path:
    """Random 48 px PNGs, about 7 KB each: `per_class` = 8 is ~110 KB, more than the 64 KB disks below."""
    return image_tree(tmp_path / "src", per_class=per_class, size=48)


def test_output_under_a_regular_file_is_one_line_naming_it(tmp_path):
    """Mutation: without the blocker check in ``ingest._check_out`` the line is mkdir's bare "Not a directory" for
    the output, not naming the file in the way."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = afile / "sub" / "shards"
    line = one_error_line(cli_ingest(_source(tmp_path, 2), out))
    assert line.endswith(f"{out}: cannot create it ({afile} is not a directory)"), line


def test_read_only_output_is_one_line_and_nothing_written(tmp_path):
    """A real read-only tmpfs (EROFS even for root). Mutation: without ``except OSError`` in ``ingest`` this is a
    20-line OSError traceback, exit 1."""
    with tmpfs(tmp_path / "ro", "64k") as ro:
        remount_read_only(ro)
        out = ro / "shards"
        line = one_error_line(cli_ingest(_source(tmp_path, 2), out))
        expect = f"ingest into {out}: cannot write {out} (Read-only file system, errno EROFS); nothing of this"
        assert line.endswith(f"{expect} ingest was kept"), line
        assert list(ro.iterdir()) == []


def test_disk_full_is_one_line_and_removes_the_temp_shards(tmp_path):
    """A real 64 KB tmpfs that fills up mid-shard (ENOSPC from pyarrow's writer). Mutations: without ``except
    OSError`` in ``ingest``, a traceback and exit 1; without ``writer.abort()`` in ``_write_ingest``, the
    ``train/part-00000.parquet.tmp`` stays."""
    with tmpfs(tmp_path / "disk", "64k") as disk:
        out = disk / "shards"
        line = one_error_line(cli_ingest(_source(tmp_path), out))
        assert re.search(
            rf"ingest into {re.escape(str(out))}: cannot write .*\(No space left on device, errno ENOSPC\)", line
        )
        assert line.endswith("; nothing of this ingest was kept"), line
        assert list(disk.rglob("*")) == []


def test_disk_full_on_overwrite_keeps_the_previous_ingest(tmp_path):
    """The previous ingest is only replaced once the new shards are complete: a full disk leaves it intact and
    valid. Mutation: ``_remove_outputs`` before the rows are written (not after) leaves no ingest at all."""
    small = image_tree(tmp_path / "small", per_class=1, size=16)
    with tmpfs(tmp_path / "disk", "64k") as disk:
        out = disk / "shards"
        ingest(small, out, progress=False)
        before = files_state(out)
        line = one_error_line(cli_ingest(_source(tmp_path), out, "--overwrite"))
        assert "(No space left on device, errno ENOSPC)" in line
        assert files_state(out) == before
        assert validate_shards(out, checksums=True).counts == {"train": 2}


def test_manifest_write_failing_removes_the_committed_shards(tmp_path, monkeypatch):
    """ENOSPC injected at the manifest write (the one write after the shards are renamed into place; too small to
    fill a disk on cue): shards without a manifest would be a half-written ingest, so they go too. Mutation:
    without the ``try`` around ``write_manifest`` in ``_write_ingest``, train/part-00000.parquet is left."""

    def full(root, manifest):
        (Path(root) / "manifest.json.tmp").write_text("{")  # what a write cut short leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(root) / "manifest.json.tmp"))

    monkeypatch.setattr(ingest_module, "write_manifest", full)
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match=r"cannot write .*manifest\.json\.tmp \(No space left on device, errno ENOSPC\)"
    ):
        ingest(_source(tmp_path, 2), out, progress=False)
    assert not out.exists()


# ---- a manifest with wrongly typed fields ----


@pytest.fixture
def shards(tmp_path) -> Path:
    out = tmp_path / "shards"
    ingest(image_tree(tmp_path / "src"), out, progress=False)
    return out


BROKEN_FIELDS = {
    "counts_list": (lambda m: m.update(counts=[6]), r"field counts is a list, expected an object"),
    "counts_value": (
        lambda m: m.update(counts={"train": "6"}),
        r"field counts\['train'\] is a string, expected an integer",
    ),
    "classes_str": (lambda m: m.update(classes="c00"), r"field classes is a string, expected a list"),
    "shards_obj": (lambda m: m.update(shards={}), r"field shards is an object, expected a list"),
    "shard_rows": (lambda m: m["shards"][0].update(rows=None), r"field shards\[0\]\.rows is null, expected an integer"),
    "shard_no_sha": (lambda m: m["shards"][0].pop("sha256"), r"field shards\[0\]\.sha256 is missing"),
    "class_counts": (
        lambda m: m["class_counts"]["train"].update(c00=1.5),
        r"field class_counts\['train'\]\['c00'\] is a number, expected an integer",
    ),
    "skipped_item": (lambda m: m.update(skipped=["x"]), r"field skipped\[0\] is a string, expected an object"),
    "schema_bool": (lambda m: m.update(schema_version=True), r"field schema_version is a boolean, expected an integer"),
    "no_counts": (lambda m: m.pop("counts"), r"field counts is missing"),
    "no_fields": (lambda m: m.clear(), r"field source is missing"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FIELDS))
def test_wrongly_typed_manifest_field_is_one_line(shards, case):
    damage, expect = BROKEN_FIELDS[case]
    m = json.loads((shards / "manifest.json").read_text())
    damage(m)
    (shards / "manifest.json").write_text(json.dumps(m))
    for check in (read_manifest, validate_shards):
        with pytest.raises(ValueError, match=expect) as e:
            check(shards)
        msg = str(e.value)
        assert msg.startswith(f"{shards / 'manifest.json'}: unreadable manifest (") and "\n" not in msg


def test_manifest_that_is_not_an_object(shards):
    (shards / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"manifest\.json: unreadable manifest \(the top level is a list"):
        read_manifest(shards)


def test_wrongly_typed_manifest_through_the_cli(shards, tmp_path):
    m = json.loads((shards / "manifest.json").read_text())
    m["counts"] = [6]
    (shards / "manifest.json").write_text(json.dumps(m))
    line = one_error_line(cli_ingest(tmp_path / "src", shards))
    assert f"{shards / 'manifest.json'}: unreadable manifest (field counts is a list, expected an object)" in line
    assert "pass overwrite=True (--overwrite)" in line
    assert cli_ingest(tmp_path / "src", shards, "--overwrite").returncode == 0  # replaced, as the line says
    assert validate_shards(shards, checksums=True).counts == {"train": 6}
