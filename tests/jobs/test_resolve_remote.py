"""resolve with a remote ``train.storage_path``: ``--resume`` finds the newest whole checkpoint on object storage
(a real S3 API, moto's server on loopback) and on ``file://``, and the driver and workers load it from there; the
storage is probed for writing before Ray starts. The user-facing lines of unreachable locations, through the CLI,
are in tests/cli/test_bad_input_remote.py; a whole run stopped and resumed on S3 in test_pretrain_resume_remote.py.
"""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest
import torch
from checkpoint_states import train_state

from moco_ray.jobs.resolve import check_writable, latest_checkpoint
from moco_ray.train.checkpoint import STATE_FILE, load_state, save_state

OLD, NEW = "checkpoint_2026-12-03_00-00-00.000000", "checkpoint_2026-12-03_00-00-09.000000"


@pytest.fixture(params=["s3", "file"])
def run_dir(request, tmp_path) -> str:
    """An empty run directory of each kind: ``s3://<bucket>/runs/moco-x`` (moto) or ``file:///<tmp>/runs/moco-x``."""
    if request.param == "file":
        return f"file://{tmp_path}/runs/moco-x"
    return request.getfixturevalue("s3").bucket("resolve-remote") + f"/{tmp_path.name}/runs/moco-x"


def _put(run_dir: str, name: str, data: bytes) -> None:
    """Write ``<run_dir>/<name>/state.pt`` as Ray's upload of a checkpoint leaves it."""
    fs, base = pafs.FileSystem.from_uri(run_dir)
    fs.create_dir(f"{base}/{name}")
    with fs.open_output_stream(f"{base}/{name}/{STATE_FILE}") as f:
        f.write(data)


def test_resume_finds_the_newest_whole_checkpoint_on_remote_storage(run_dir, tmp_path, capsys):
    """Two checkpoints in remote storage: resume takes the newer one, as a URI the driver and the workers load
    (``load_state``); a newer one cut short mid-upload is skipped and said so.

    Mutations caught (each failed here): ``latest_checkpoint`` returning None for any ``://`` path (the issue's
    "no checkpoint found under s3://..." with two checkpoints there); ``load_state`` without its URI branch
    (FileNotFoundError for ``s3:/bucket/...``); the completeness check dropped (the cut one taken).
    """
    weights = {"w": torch.randn(64, 64)}
    local = {n: save_state(tmp_path / n, train_state(weights, e)).read_bytes() for e, n in enumerate((OLD, NEW))}
    for name, data in local.items():
        _put(run_dir, name, data)
    assert latest_checkpoint(run_dir) == f"{run_dir}/{NEW}"
    assert load_state(f"{run_dir}/{NEW}").epoch == 1

    _put(run_dir, NEW, local[NEW][: len(local[NEW]) // 2])  # the upload of the newest stopped half-way
    assert latest_checkpoint(run_dir) == f"{run_dir}/{OLD}"
    assert f"skipping {NEW}: its {STATE_FILE} is incomplete" in capsys.readouterr().out
    assert load_state(latest_checkpoint(run_dir)).epoch == 0
    assert latest_checkpoint(f"{run_dir}-never-written") is None  # the caller's "no checkpoint found"


def test_remote_storage_is_probed_for_writing(s3):
    """An existing bucket passes the write check and keeps nothing of it; a bucket that does not exist is one line
    before Ray starts, not a run that fails at its first checkpoint.

    Mutation caught (failed here): ``check_writable`` returning at once for a URI, as before.
    """
    root = s3.bucket("resolve-writable") + "/runs"
    check_writable(root)
    fs, base = pafs.FileSystem.from_uri(root)
    assert fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True)) == []
    with pytest.raises(ValueError, match=r"^train\.storage_path: s3://no-such-bucket/runs: bucket 'no-such-bucket' "):
        check_writable("s3://no-such-bucket/runs")
