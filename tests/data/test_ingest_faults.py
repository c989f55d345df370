"""Ingest faults (issue #18): symlink loops and dangling links, an output inside the source tree, a manifest with
wrongly typed fields, the --overwrite hint, empty class folders (refused) and a one-class source (one warning).
Real files, real Parquet; the CLI's line through the real CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ingest_trees import cli_ingest, files_state, image_tree, one_error_line

from moco_ray.data.ingest import ingest
from moco_ray.data.manifest import read_manifest
from moco_ray.data.schema import validate_shards

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
