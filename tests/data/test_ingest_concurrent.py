"""Two ``moco-ray ingest`` into one OUT at once (issue #18): real processes through the real CLI.

Decided behaviour: one ingest at a time holds ``OUT/.moco-ray-ingest.lock`` (an flock); another one started
meanwhile fails at once, exit 2, with one line naming the holder's pid, and touches nothing. The winner's output
is intact (every shard's size and sha256 as its manifest records). The kernel drops the lock of a killed ingest,
so the lock file it leaves behind blocks nobody and is not a foreign file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ingest_trees import REPO, cli_env, cli_ingest, files_state, image_tree, one_error_line

from moco_ray.data.ingest import LOCK_FILE, ingest
from moco_ray.data.schema import validate_shards

# flat 3000 px squares: tiny files, but each full decode takes ~0.3 s, so an ingest lasts a few seconds
SLOW = {"per_class": 16, "classes": 2, "big": 3000}


def _start(src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "moco_ray.cli.main", "ingest", str(src), str(out), "--workers", "1"],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_lock(p: subprocess.Popen, out: Path, timeout: float = 60) -> None:
    """Until `p` holds the lock (its pid is in the lock file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (out / LOCK_FILE).read_text().strip() == str(p.pid):
                return
        except FileNotFoundError:
            pass
        assert p.poll() is None, p.communicate()
        time.sleep(0.02)
    pytest.fail(f"pid {p.pid} never took the lock on {out}")


def _assert_intact(out: Path, rows: int) -> None:
    m = validate_shards(out, checksums=True)  # every shard's size, rows and sha256 as recorded
    assert sum(m.counts.values()) == rows
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert on_disk == sorted(["manifest.json", *(s.path for s in m.shards)])  # no .tmp, no lock, nothing else


def test_ingest_while_another_is_writing_fails_in_one_line(tmp_path):
    src, out = image_tree(tmp_path / "src", **SLOW), tmp_path / "out"
    a = _start(src, out)
    try:
        _wait_for_lock(a, out)
        b = cli_ingest(src, out)
    finally:
        a_out, a_err = a.communicate(timeout=300)
    assert b.returncode != 0, "the first ingest ended before the second one tried: make SLOW slower"
    line = one_error_line(b)
    assert line == (
        f"moco-ray: error: {out}: another ingest is writing here (pid {a.pid}); wait for it or choose another directory"
    )
    assert a.returncode == 0, a_err
    _assert_intact(out, 32)
    before = files_state(out)
    again = cli_ingest(src, out)  # the same ingest again: a no-op
    assert again.returncode == 0, again.stderr
    assert files_state(out) == before


def test_two_ingests_started_together_one_wins(tmp_path):
    src, out = image_tree(tmp_path / "src", **SLOW), tmp_path / "out"
    procs = [_start(src, out), _start(src, out)]
    results = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in procs]
    assert sorted(r[3] for r in results) == [0, 2], results
    (winner,) = [r for r in results if r[3] == 0]
    (loser,) = [r for r in results if r[3] == 2]
    assert "Traceback" not in loser[2] and len(loser[2].strip().splitlines()) == 1, loser[2]
    assert f"{out}: another ingest is writing here (pid {winner[0]})" in loser[2]
    _assert_intact(out, 32)


def test_lock_left_by_a_killed_ingest_blocks_nobody(tmp_path):
    src, out = image_tree(tmp_path / "src", **SLOW), tmp_path / "out"
    a = _start(src, out)
    _wait_for_lock(a, out)
    time.sleep(0.5)  # let it write part of a shard
    os.kill(a.pid, signal.SIGKILL)
    a.communicate(timeout=60)
    assert (out / LOCK_FILE).read_text().strip() == str(a.pid)  # stale: nobody holds it any more
    b = cli_ingest(src, out)
    assert b.returncode == 0, b.stderr
    _assert_intact(out, 32)


def test_lock_file_is_not_foreign_and_keeps_the_rerun_a_noop(tmp_path):
    src, out = image_tree(tmp_path / "src"), tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text("999999\n")  # a stale lock in an otherwise empty OUT
    m = ingest(src, out, progress=False)
    _assert_intact(out, 6)
    (out / LOCK_FILE).write_text("999999\n")  # and one left in a finished OUT
    before = files_state(out)
    assert ingest(src, out, progress=False).fingerprint == m.fingerprint
    after = files_state(out)
    assert after == {k: v for k, v in before.items() if k != LOCK_FILE}  # a no-op that only cleared the lock
