"""A resume cannot lie: every rank restores the one checkpoint the driver chose, MLflow's curve ends up the kept
model's (epochs of a discarded branch logged again over and named in a tag), the run dir keeps
``train.keep_checkpoints`` checkpoints, and a second driver of the same run is refused while the first lives.

Before: Ray Train restored its own record of the last checkpoint into the workers whatever the driver chose, so a
cut latest checkpoint crashed every rank, and after a ``kill -9`` of the driver the workers retrained an epoch from
the checkpoint before while MLflow kept the discarded branch's point for it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from moco_helpers import REPO, cli_env, config_file, run_cli_cases, session_processes, tiny_run, wait_for_run

from moco_ray.jobs.resolve import latest_checkpoint
from moco_ray.jobs.resume import LOCK_FILE, RAY_RECORD, RUN_DIR_TAG
from moco_ray.tracking.run_log import DISCARDED_EPOCHS_TAG
from moco_ray.train.checkpoint import STATE_FILE, load_state

pytestmark = pytest.mark.ray

EXPERIMENT = "test-resume-integrity"


def _overrides(shards: Path, tmp_path: Path, uri: str, epochs: int) -> dict:
    return tiny_run(shards, tmp_path, uri, EXPERIMENT, epochs, **{"train.num_workers": 1, "train.keep_checkpoints": 2})


def _resume_in_process(monkeypatch, argv: list[str]) -> int:
    """``moco-ray pretrain --resume ...`` through the CLI's main on the session's Ray, env as ``cli_env`` leaves it."""
    from moco_ray.cli.main import main

    with monkeypatch.context() as mp:
        for key in ("MLFLOW_TRACKING_URI", "MOCO_RAY_ALLOW_PENDING_GPUS"):
            mp.delenv(key, raising=False)
        return main(["pretrain", "--resume", *argv])


def _check_record_is_the_kept_models(uri: str, run_id: str, keep: int) -> dict[int, int]:
    """MLflow's latest point of each epoch is the final checkpoint's, the run dir holds ``keep`` checkpoints, and
    the plot was drawn; returns {epoch number (MLflow step): points MLflow holds for it} (more than one: a
    discarded branch's too)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    final = load_state(run.data.tags["moco_ray.checkpoint"])
    latest: dict[int, tuple[int, float]] = {}
    points: dict[int, int] = {}
    for m in c.get_metric_history(run_id, "loss"):
        points[m.step] = points.get(m.step, 0) + 1
        latest[m.step] = max(latest.get(m.step, (-1, 0.0)), (m.timestamp, m.value))
    assert {e: v for e, (_, v) in sorted(latest.items())} == {h.epoch + 1: h.loss for h in final.history}
    run_dir = Path(run.data.tags[RUN_DIR_TAG])
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == keep
    assert [a.path for a in c.list_artifacts(run_id, "plots")] == ["plots/training_curves.png"]
    return points


def test_a_cut_latest_checkpoint_whose_epoch_was_logged_is_skipped_and_the_epoch_redone_in_the_record(
    ray_local, small_shards, tmp_path, mlflow_uri, monkeypatch, capsys
):
    """Epoch 3's checkpoint is persisted and its metrics logged, then its state file is cut short. The resume
    continues from epoch 2's, on every rank; epoch 3 is logged again by the kept model and named in the tag.

    Mutations checked by hand: ``forget_ray_record`` dropped from run_pretraining (every rank restored Ray's record,
    the cut checkpoint, and crashed: exit 1); ``log_epochs`` ignoring ``after`` (epoch 3's latest point stayed the
    discarded one); ``mark_discarded`` not called (no tag); ``_prune`` dropped (4 checkpoints left, keep 2).
    """
    from mlflow.tracking import MlflowClient

    from moco_ray.jobs.pretrain import RunInterrupted, run_pretraining
    from moco_ray.train.hooks import FaultHooks

    with pytest.raises(RunInterrupted) as info:
        run_pretraining(None, _overrides(small_shards, tmp_path, mlflow_uri, 4), hooks=FaultHooks(stop_after_epoch=2))
    run_id = info.value.run_id
    newest = latest_checkpoint(MlflowClient(mlflow_uri).get_run(run_id).data.tags[RUN_DIR_TAG])
    assert newest is not None and load_state(newest).epoch == 2
    state = Path(newest) / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    capsys.readouterr()

    assert _resume_in_process(monkeypatch, [run_id, f"tracking.tracking_uri={mlflow_uri}"]) == 0
    assert f"skipping {Path(newest).name}: its {STATE_FILE} is incomplete" in capsys.readouterr().out
    tags = MlflowClient(mlflow_uri).get_run(run_id).data.tags
    assert tags["moco_ray.restored_from_epoch"] == "2"  # epoch 2's checkpoint, on every rank
    assert tags[DISCARDED_EPOCHS_TAG] == "epoch 3 discarded by resume after epoch 2"
    points = _check_record_is_the_kept_models(mlflow_uri, run_id, keep=2)
    assert points == {1: 1, 2: 1, 3: 2, 4: 1}  # MLflow keeps the discarded point; the kept one is the latest


def _cli(args: list[str], tmp_path: Path, name: str, **env: str) -> subprocess.Popen:
    out = (tmp_path / f"{name}.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "moco_ray.cli.main", "pretrain", *args],
        cwd=REPO, env=cli_env(**env), stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def _kill_9(proc: subprocess.Popen) -> None:
    """``kill -9`` of the driver and all it started, at once, waited for until none is left: its workers, which
    would otherwise go on for a few seconds, write nothing after the moment of the kill."""
    for _ in range(300):
        alive = session_processes(proc.pid)
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.poll()
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of session {proc.pid} survive SIGKILL: {session_processes(proc.pid)}")


def _ray_latest(run_dir: Path) -> str:
    return json.loads((run_dir / RAY_RECORD).read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]


@pytest.mark.slow
def test_kill_9_of_the_driver_then_two_resumes_at_once(
    ray_local, small_shards, tmp_path, mlflow_uri, monkeypatch, capsys
):
    """The driver is killed (``kill -9``) after epoch 3's metrics are logged but before Ray registered its
    checkpoint (Ray polls every 5 s here: the window the kill lands in). A resume continues from that checkpoint on
    every rank; a second resume meanwhile is refused in one line naming the first's pid, before Ray starts; the
    first is killed too, and a last resume finishes the run with the kept model's curve.

    Mutations checked by hand: ``forget_ray_record`` dropped (the workers restored epoch 2's checkpoint, Ray's
    record, while the driver said epoch 3: ``restored_from_epoch`` 2, and epoch 3's point in MLflow was the
    discarded branch's); ``lock_run`` dropped from ``resume_target`` (the second resume started Ray and trained).
    """
    from mlflow.tracking import MlflowClient

    c = MlflowClient(mlflow_uri)
    cfg = config_file(_overrides(small_shards, tmp_path, mlflow_uri, 40), tmp_path)
    first = _cli(["-c", str(cfg)], tmp_path, "first", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="5")
    try:
        run_id = wait_for_run(mlflow_uri, EXPERIMENT, first, "metrics.epoch >= 3").info.run_id  # epoch 3 logged
        run_dir = Path(c.get_run(run_id).data.tags[RUN_DIR_TAG])
        assert (run_dir / LOCK_FILE).read_text().split() == [str(first.pid), socket.gethostname(), "trained", run_id]
    finally:
        _kill_9(first)
    newest = latest_checkpoint(str(run_dir))
    assert newest is not None and load_state(newest).epoch >= 2
    assert _ray_latest(run_dir) != Path(newest).name, "the kill landed after Ray registered the newest checkpoint"

    store = f"tracking.tracking_uri={mlflow_uri}"
    resumed = _cli(["--resume", run_id, store], tmp_path, "resumed")
    try:
        restored = wait_for_run(mlflow_uri, EXPERIMENT, resumed, "tags.`moco_ray.restored_from_epoch` != ''")
        assert restored.data.tags["moco_ray.restored_from_epoch"] == str(load_state(newest).epoch + 1)
        res = run_cli_cases({"second": {"argv": ["pretrain", "--resume", run_id, store]}}, tmp_path)["second"]
    finally:
        _kill_9(resumed)
    assert res["rc"] == 2 and not res["ray_started"], res["stderr"]
    assert res["stderr"].strip().splitlines() == [
        f"moco-ray: error: run {run_id} is being resumed by pid {resumed.pid}; wait for it or stop it first"
    ]

    last = latest_checkpoint(str(run_dir))
    assert last is not None
    epochs = f"train.epochs={load_state(last).epoch + 2}"  # one more epoch
    assert _resume_in_process(monkeypatch, [run_id, store, epochs]) == 0, capsys.readouterr().err[-3000:]
    points = _check_record_is_the_kept_models(mlflow_uri, run_id, keep=2)
    if any(n > 1 for n in points.values()):  # a branch was discarded on the way: the run says so
        assert DISCARDED_EPOCHS_TAG in c.get_run(run_id).data.tags
