"""``export_run``'s failure guarantees, in the directory form: OUT that cannot be written (under a regular file, a real
read-only mount) is refused in one line before the encoder is downloaded; a full disk (a real 1 MB tmpfs) leaves no
temp directory and an earlier export as it was; a new OUT is made with its parents, and its directory and files get
the user's umask, not a temp directory's private 0700."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from moco_helpers import TINY_MODEL, log_like_trainer, remount_read_only, tmpfs


@pytest.fixture(scope="module")
def run(_empty_store, tmp_path_factory) -> dict:
    """A run as the trainer leaves it (resnet18, small stem) in its own sqlite store."""
    import shutil

    import torch

    from moco_ray.config import load_config
    from moco_ray.core.encoders import torchvision_backbone

    base = tmp_path_factory.mktemp("export_failures")
    shutil.copyfile(_empty_store, base / "mlflow.db")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    cfg = load_config(None, {**TINY_MODEL, "tracking.experiment": "export-failures"})
    torch.manual_seed(0)
    return {"uri": uri, "id": log_like_trainer(uri, cfg, torchvision_backbone("resnet18", True), "export-failures")}


@pytest.fixture
def downloads(monkeypatch) -> list[str]:
    """The run ids whose encoder was downloaded (RunLog.encoder still runs)."""
    from moco_ray.tracking.run_log import RunLog

    seen: list[str] = []
    real = RunLog.encoder
    monkeypatch.setattr(RunLog, "encoder", lambda self: seen.append(self.run_id) or real(self))
    return seen


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A real 1 MB tmpfs (a resnet18 export is ~45 MB: it cannot fit)."""
    with tmpfs(tmp_path / "disk", "1m") as path:
        yield path


def _earlier_export(out: Path, run_id: str) -> dict[str, bytes]:
    """A small stand-in for an earlier export of ``run_id`` in ``out``: what must survive a failed re-export."""
    out.mkdir()
    (out / "encoder.json").write_text(json.dumps({"source": {"run_id": run_id}, "format": "torchvision"}))
    (out / "encoder.pt").write_bytes(b"the old weights")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_new_directory_with_parents_and_modes_follow_umask(run, tmp_path):
    from moco_ray.jobs.export import export_run

    old = os.umask(0o027)
    try:
        res = export_run(run["id"], "torchvision", tmp_path / "a" / "b" / "enc", tracking_uri=run["uri"])
    finally:
        os.umask(old)
    assert res.path == tmp_path / "a" / "b" / "enc" and res.weights.is_file()
    assert stat.S_IMODE(res.path.stat().st_mode) == 0o750
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in res.path.iterdir()} == {
        "encoder.pt": 0o640,
        "encoder.json": 0o640,
        "README.md": 0o640,
    }
    assert [p.name for p in res.path.parent.iterdir()] == ["enc"]  # no temp directory left


def test_out_under_a_regular_file_is_refused_before_download(run, tmp_path, downloads):
    """Mutation: without ``check_writable_dir`` in ``check_export_dir``, the encoder is downloaded and the failure is
    mkdir's "(File exists, errno EEXIST)" after the work, not naming the file in the way."""
    from moco_ray.jobs.export import export_run

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError) as e:
        export_run(run["id"], "moco", afile / "enc", tracking_uri=run["uri"])
    assert str(e.value) == f"export: cannot write {afile}/enc ({afile} is not a directory)"
    assert downloads == [] and afile.read_text() == "x"


@pytest.mark.parametrize("fmt", ["torchvision", "moco"])
def test_full_disk_leaves_the_earlier_export_and_no_temp_directory(run, small_disk, fmt):
    """ENOSPC for real, on a re-export over an earlier export of the same run. Mutation: without the temp
    directory's removal in ``save_export_dir``'s ``finally``, a ``.enc.*.tmp`` directory stays on the disk."""
    from moco_ray.jobs.export import export_run

    out = small_disk / "enc"
    before = _earlier_export(out, run["id"])
    with pytest.raises(ValueError) as e:
        export_run(run["id"], fmt, out, tracking_uri=run["uri"])
    assert str(e.value) == f"export: cannot write {out} (No space left on device, errno ENOSPC)"
    assert [p.name for p in small_disk.iterdir()] == ["enc"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_read_only_mount_is_refused_before_download(run, small_disk, downloads):
    """EROFS, found by the probe before the encoder is downloaded (mutation: without the probe, the failure comes
    from mkdtemp after the download and serialisation: the same line, but `downloads` is not empty)."""
    from moco_ray.jobs.export import export_run

    out = small_disk / "enc"
    before = _earlier_export(out, run["id"])
    remount_read_only(small_disk)
    with pytest.raises(ValueError) as e:
        export_run(run["id"], "torchvision", out, tracking_uri=run["uri"])
    assert str(e.value) == f"export: cannot write {out} (Read-only file system, errno EROFS)"
    assert downloads == [] and {p.name: p.read_bytes() for p in out.iterdir()} == before
