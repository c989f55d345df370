"""Two ``moco-ray ingest`` into one OUT at once (issue #18): real processes through the real CLI.

Decided behaviour: one ingest at a time holds ``OUT/.moco-ray-ingest.lock`` (an flock); another one started
meanwhile fails at once, exit 2, with one line naming the holder's pid, and touches nothing. The tests hold the
lock themselves rather than racing two ingests, so nothing depends on timing. The winner's output
is intact (every shard's size and sha256 as its manifest records). The kernel drops the lock of a killed ingest,
so the lock file it leaves behind blocks nobody and is not a foreign file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

from ingest_trees import cli_ingest, files_state, image_tree, one_error_line

from moco_ray.data.ingest import LOCK_FILE, ingest
from moco_ray.data.schema import validate_shards


@contextlib.contextmanager
def _held_lock(out: Path):
    """The lock an ingest holds, taken by this process (as a writer would: flock + its pid in the file)."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the flock


def _assert_intact(out: Path, rows: int) -> None:
    m = validate_shards(out, checksums=True)  # every shard's size, rows and sha256 as recorded
    assert sum(m.counts.values()) == rows
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert on_disk == sorted(["manifest.json", *(s.path for s in m.shards)])  # no .tmp, no lock, nothing else


def test_ingest_while_another_holds_the_lock_fails_in_one_line(tmp_path):
    """Deterministic: the lock is held by this test for the whole second ingest, so no timing is involved."""
    src, out = image_tree(tmp_path / "src"), tmp_path / "out"
    with _held_lock(out):
        before = files_state(out)
        b = cli_ingest(src, out)
        assert b.returncode == 2
        line = one_error_line(b)
        assert line == (
            f"moco-ray: error: {out}: another ingest is writing here (pid {os.getpid()}); "
            "wait for it or choose another directory"
        )
        assert files_state(out) == before  # the loser touched nothing
    first = cli_ingest(src, out)  # the lock is free again: the ingest goes through
    assert first.returncode == 0, first.stderr
    _assert_intact(out, 6)
    state = files_state(out)
    again = cli_ingest(src, out)  # the same ingest again: a no-op
    assert again.returncode == 0, again.stderr
    assert files_state(out) == state


def test_lock_left_by_a_killed_holder_blocks_nobody(tmp_path):
    """A holder killed with SIGKILL leaves its lock file behind; the kernel dropped the flock, so it is stale."""
    src, out = image_tree(tmp_path / "src"), tmp_path / "out"
    out.mkdir()
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli_ingest(src, out).returncode == 2  # held: refused
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.communicate(timeout=60)
    assert (out / LOCK_FILE).read_text().strip() == str(holder.pid)  # stale: nobody holds it any more
    b = cli_ingest(src, out)
    assert b.returncode == 0, b.stderr
    _assert_intact(out, 6)


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
