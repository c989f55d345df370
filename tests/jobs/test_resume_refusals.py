"""``pretrain --resume RUN_ID`` refused in one line, exit 2, before Ray starts and with the run's state unchanged:
while another live driver holds the run dir, and when the checkpoint to continue from is not a moco-ray state.

No Ray: the stopped runs are made as the trainer leaves them (config.yaml, the run-dir tag, a checkpoint in that
dir) in a fresh sqlite store; a live driver's lock is taken through ``lock_run`` (by this process, and by a
second one for the kill test), as a training driver does. Both refusals go through the real CLI entry point in
one subprocess (imports paid once).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_states import train_state
from mlflow.tracking import MlflowClient
from moco_helpers import REPO, run_cli_cases

from moco_ray.config import load_config
from moco_ray.jobs.resolve import with_absolute_paths
from moco_ray.jobs.resume import LOCK_FILE, RUN_DIR_TAG, lock_run, release_run, resume_target
from moco_ray.tracking.run_log import create_run
from moco_ray.train.checkpoint import STATE_FILE, save_state

RUN = {
    "model.arch": "resnet18",
    "model.small_stem": True,
    "model.dim": 16,
    "aug.image_size": 16,
    "moco.queue_size": 1024,
    "train.epochs": 2,
    "train.batch_size": 32,
    "eval.knn_every": 0,
    "tracking.experiment": "resume-refusals",
}
# a driver holding the run dir, as `moco-ray pretrain --resume` does from resume_target until its run ends
HOLD = """
import sys, time
from moco_ray.jobs.resume import lock_run
lock_run(sys.argv[1], sys.argv[2], "resumed")
print("locked", flush=True)
time.sleep(600)
"""


class _RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``: the marker shows whether anything in the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _stopped_run(uri: str, tmp: Path, shards: Path, status: str) -> tuple[str, Path]:
    """A run stopped after its first epoch (``status``: KILLED, FAILED); returns (run id, its checkpoint dir)."""
    over = {**RUN, "tracking.tracking_uri": uri, "train.storage_path": str(tmp / "runs"), "data.shards": str(shards)}
    cfg = with_absolute_paths(load_config(None, over))
    log = create_run(uri, cfg.tracking.experiment, status.lower(), cfg.flat(), {}, cfg.to_yaml())
    run_dir = tmp / "runs" / f"moco-{log.run_id}"
    checkpoint = run_dir / "checkpoint_2026-12-03_00-00-00.000000"
    save_state(checkpoint, train_state({}, epoch=0))
    log.set_tags({RUN_DIR_TAG: str(run_dir)})
    log.finish(status)
    return log.run_id, checkpoint


@pytest.fixture(scope="module")
def refused(tmp_path_factory, _empty_store, small_shards):
    """Three stopped runs: one held by this process (a live driver, as ``resume_target`` leaves it), one whose
    checkpoint was replaced by a pickle that would run code, both resumed through the CLI; and one held by a second
    process (started alongside, for the kill test). Yields what the tests check."""
    tmp = tmp_path_factory.mktemp("refusals")
    shutil.copyfile(_empty_store, tmp / "mlflow.db")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    held, held_ckpt = _stopped_run(uri, tmp, small_shards, "KILLED")
    tampered, tampered_ckpt = _stopped_run(uri, tmp, small_shards, "FAILED")
    other, other_ckpt = _stopped_run(uri, tmp, small_shards, "KILLED")
    marker = tmp / "code-ran"
    torch.save({"model": _RunsCode(marker), "epoch": 0}, tampered_ckpt / STATE_FILE)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(other_ckpt.parent), other], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    lock_run(str(held_ckpt.parent), held, "resumed")
    try:
        store = f"tracking.tracking_uri={uri}"
        cases = {
            "held": {"argv": ["pretrain", "--resume", held, store]},
            "tampered": {"argv": ["pretrain", "--resume", tampered, store]},
        }
        res = run_cli_cases(cases, tmp)
        yield {"uri": uri, "res": res, "held": held, "tampered": tampered, "marker": marker, "other": other,
               "holder": holder, "tmp": tmp, "shards": small_shards}  # fmt: skip
    finally:
        release_run(held)
        if holder.poll() is None:
            holder.kill()
        holder.wait()


def _one_error_line(res: dict) -> str:
    assert res["rc"] == 2, res["stderr"]
    lines = res["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moco-ray: error: "), res["stderr"]
    assert not res["ray_started"]
    return lines[0].removeprefix("moco-ray: error: ")


def test_a_second_resume_of_a_held_run_is_refused_naming_the_holder(refused):
    """Before: both drivers trained in one folder, one's clean-up deleted the other's checkpoint.

    Mutation checked by hand: ``lock_run`` dropped from ``resume_target``: the second resume started Ray, reopened
    the run and trained.
    """
    msg = _one_error_line(refused["res"]["held"])
    assert msg.startswith(f"run {refused['held']} is being resumed by pid {os.getpid()};"), msg
    assert MlflowClient(refused["uri"]).get_run(refused["held"]).info.status == "KILLED"


def test_a_checkpoint_that_is_no_moco_ray_state_is_refused_and_the_run_keeps_its_state(refused):
    """Before: a 21-line UnpicklingError suggesting ``weights_only=False``, and the FAILED run left RUNNING.

    Mutation checked by hand: ``_read_state`` without its UnpicklingError branch: a traceback, no exit 2.
    """
    msg = _one_error_line(refused["res"]["tampered"])
    assert msg.startswith(f"run {refused['tampered']}: checkpoint ") and "is not a moco-ray checkpoint" in msg
    assert not refused["marker"].exists()  # nothing in the file ran
    assert MlflowClient(refused["uri"]).get_run(refused["tampered"]).info.status == "FAILED"


def test_the_lock_dies_with_a_killed_holder(refused):
    """A driver killed with ``kill -9`` (no clean-up runs) frees its run for the next resume.

    Mutation checked by hand: ``lock_run`` refusing while the lock file names a holder (a pid file instead of the
    flock) kept the run refused after the kill.
    """
    holder, uri = refused["holder"], refused["uri"]
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    with pytest.raises(ValueError, match=f"is being resumed by pid {holder.pid};"):
        resume_target(refused["other"], {"tracking.tracking_uri": uri})
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    target = resume_target(refused["other"], {"tracking.tracking_uri": uri})
    try:
        assert target.epoch == 0 and (Path(target.run_dir) / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    finally:
        release_run(refused["other"])


def test_a_resume_refused_after_taking_the_lock_frees_it(refused):
    """A check after ``resume_target`` (here: shards that are not there) refuses the resume; the run dir's lock is
    released with it, or an API user's process would keep the run from every other resume until it exits.

    Mutation checked by hand: without the ``except BaseException: release_run(...)`` around ``_open`` in
    run_pretraining the lock stayed held (the flock below: BlockingIOError).
    """
    from moco_ray.jobs.pretrain import run_pretraining

    run_id, ckpt = _stopped_run(refused["uri"], refused["tmp"], refused["shards"], "KILLED")
    over = {"tracking.tracking_uri": refused["uri"], "data.shards": str(refused["tmp"] / "no-shards")}
    with pytest.raises(ValueError, match="no manifest.json"):
        run_pretraining(None, over, resume=run_id)
    with open(ckpt.parent / LOCK_FILE) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another driver could take it now
