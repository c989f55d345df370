"""``moco-ray pretrain --resume last``: which run it continues, read from a real MLflow sqlite store whose runs are
made as the trainer leaves them (params, config.yaml, the run-dir tag, a real checkpoint, the logged epochs, the
end state), and that the chosen run is then resumed as its id would be: the lock of a live driver refuses it,
and the driver hands the trainer that run's checkpoint. No Ray (the trainer is stubbed where Ray would start, as
in test_pretrain_resume_overrides.py); the console script's lines are tests/cli/test_main_shipped.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from checkpoint_states import EPOCH_0, train_state
from mlflow.tracking import MlflowClient

from moco_ray.config import load_config
from moco_ray.jobs import pretrain
from moco_ray.jobs.resolve import with_absolute_paths
from moco_ray.jobs.resume import LOCK_FILE, RUN_DIR_TAG, release_run, resume_target
from moco_ray.jobs.runs import last_unfinished, resolve_resume
from moco_ray.tracking.history import EpochMetrics
from moco_ray.tracking.run_log import create_run
from moco_ray.train.checkpoint import save_state

EXP = "resume-last"
RUN = {
    "model.arch": "resnet18",
    "model.small_stem": True,
    "model.dim": 16,
    "aug.image_size": 16,
    "moco.queue_size": 1024,
    "train.epochs": 4,
    "train.batch_size": 32,
    "eval.knn_every": 0,
}


def _run(uri: str, tmp_path: Path, name: str, status: str, *, epochs: int = 2, checkpoint: bool = True,
         trained: bool = True, parent: str | None = None, experiment: str = EXP, **extra) -> str:  # fmt: skip
    """A run as the trainer leaves it after ``epochs`` epochs (a checkpoint of the last one unless not
    ``checkpoint``; no run dir at all unless ``trained``), ended ``status`` (RUNNING: left open)."""
    over = {**RUN, "tracking.tracking_uri": uri, "tracking.experiment": experiment, **extra}
    cfg = with_absolute_paths(load_config(None, {**over, "train.storage_path": str(tmp_path / "runs")}))
    log = create_run(uri, experiment, name, cfg.flat(), {}, cfg.to_yaml(), parent)
    log.log_epochs([EpochMetrics.from_dict({**EPOCH_0, "epoch": e}) for e in range(epochs)])
    if trained:
        run_dir = tmp_path / "runs" / f"moco-{log.run_id}"
        run_dir.mkdir(parents=True)
        if checkpoint:
            save_state(run_dir / "checkpoint_2026-12-03_00-00-00.000000", train_state({}, epoch=epochs - 1))
        log.set_tags({RUN_DIR_TAG: str(run_dir)})
    if status != "RUNNING":
        log.finish(status)
    return log.run_id


@pytest.fixture
def runs(mlflow_uri: str, tmp_path: Path) -> dict[str, str]:
    """Oldest first: the candidates, then newer runs that ``last`` must pass over, each for one reason."""
    ids = {"failed-old": _run(mlflow_uri, tmp_path, "failed-old", "FAILED", epochs=1)}
    ids["killed"] = _run(mlflow_uri, tmp_path, "killed", "KILLED", epochs=3)
    ids["no-checkpoint"] = _run(mlflow_uri, tmp_path, "no-checkpoint", "KILLED", checkpoint=False)
    ids["never-trained"] = _run(mlflow_uri, tmp_path, "never-trained", "FAILED", trained=False)
    ids["finished"] = _run(mlflow_uri, tmp_path, "finished", "FINISHED", epochs=4)
    sweep = create_run(mlflow_uri, EXP, "sweep", {}, {}, None)  # a sweep's parent: no run dir of its own
    ids["trial"] = _run(mlflow_uri, tmp_path, "trial", "KILLED", parent=sweep.run_id)
    _run(mlflow_uri, tmp_path, "elsewhere", "KILLED", experiment="another")  # newest, in another experiment
    return ids


def test_last_is_the_newest_unfinished_run_with_a_checkpoint(mlflow_uri, runs):
    """FINISHED runs, sweep trials (child runs), runs that never trained or stopped before their first checkpoint,
    and other experiments' runs are passed over.

    Mutations checked by hand (each picked another run): the FINISHED test dropped ("finished"); the child-run
    test dropped ("trial"); the checkpoint test dropped ("no-checkpoint"); oldest first ("failed-old")."""
    found = last_unfinished(EXP, mlflow_uri)
    assert (found.run_id, found.name, found.state, found.last_epoch) == (runs["killed"], "killed", "KILLED", 2)
    assert str(found) == f"{runs['killed']} (killed, KILLED, last epoch 3 of 4) of experiment {EXP}"


def test_the_next_one_and_then_none(mlflow_uri, runs):
    """Once it finishes the older unfinished run is next; with none left, one line listing the experiment's runs
    newest first, saying which stopped before a checkpoint."""
    client = MlflowClient(mlflow_uri)
    client.set_terminated(runs["killed"], "FINISHED")
    assert last_unfinished(EXP, mlflow_uri).run_id == runs["failed-old"]
    client.set_terminated(runs["failed-old"], "FINISHED")
    with pytest.raises(ValueError) as info:
        last_unfinished(EXP, mlflow_uri)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(
        f"--resume last: no unfinished run with a checkpoint in experiment '{EXP}'"
    )
    assert f"no-checkpoint {runs['no-checkpoint']} KILLED (no checkpoint)" in msg
    assert msg.index("finished") < msg.index("never-trained") < msg.index("failed-old")  # newest first
    with pytest.raises(ValueError, match="^--resume last: no experiment 'nope' in .*experiments there: .*resume-last"):
        last_unfinished("nope", mlflow_uri)


def test_a_run_its_driver_still_trains_is_refused_by_its_lock(mlflow_uri, tmp_path):
    """RUNNING with a live driver: ``last`` names it (it is the newest) and the resume is refused by the run dir's
    lock, as for its id; RUNNING whose driver died (no lock held): resumed. The live driver here is a process
    holding the lock as ``jobs.resume.lock_run`` takes it (flock, "pid host doing run_id")."""
    dead = _run(mlflow_uri, tmp_path, "driver-died", "RUNNING")
    live = _run(mlflow_uri, tmp_path, "still-training", "RUNNING")
    lock = tmp_path / "runs" / f"moco-{live}" / LOCK_FILE
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(lock), live], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert last_unfinished(EXP, mlflow_uri).run_id == live
        with pytest.raises(ValueError, match=f"^run {live} is being trained by pid {holder.pid}; wait for it"):
            resume_target(live, {"tracking.tracking_uri": mlflow_uri})
    finally:
        holder.kill()
        holder.wait()
    MlflowClient(mlflow_uri).set_terminated(live, "FINISHED")
    assert last_unfinished(EXP, mlflow_uri).run_id == dead
    target = resume_target(dead, {"tracking.tracking_uri": mlflow_uri})
    release_run(dead)
    assert target.epoch == 1


_HOLD_LOCK = f"""
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.write(f"{{os.getpid()}} {socket.gethostname()} trained {{sys.argv[2]}}\\n")
f.flush()
print("locked", flush=True)
time.sleep(120)
"""  # the line lock_run writes into the lock file, read back by its refusal


def test_resolve_resume_finds_the_store_the_config_file_names(mlflow_uri, runs, tmp_path):
    """The experiment and store come from the config (the file's ``tracking`` section here); the store is added
    to the overrides, as a resume reads it from there. Mutation checked by hand: the store never added (the
    resume then looks in the default ``./mlflow.db``: tests/cli/test_main_shipped.py). A run id is returned as
    given, its config not even read."""
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"tracking": {"experiment": EXP, "tracking_uri": mlflow_uri}}))
    uri = f"tracking.tracking_uri={mlflow_uri}"
    assert resolve_resume("last", cfg, ["train.epochs=6"]) == (runs["killed"], ["train.epochs=6", uri])
    assert resolve_resume("last", cfg, None) == (runs["killed"], [uri])
    assert resolve_resume("last", cfg, {"train.epochs": 6}) == (
        runs["killed"],
        {"train.epochs": 6, "tracking.tracking_uri": mlflow_uri},
    )
    assert resolve_resume("last", cfg, [uri]) == (runs["killed"], [uri])  # named already: kept as given
    assert resolve_resume("abc123", tmp_path / "missing.yaml", ["x"]) == ("abc123", ["x"])


class _TrainerReached(Exception):
    """Raised where run_pretraining would build the TorchTrainer: everything before it has happened."""


def test_the_driver_continues_the_run_last_names(mlflow_uri, tmp_path, small_shards, monkeypatch, capsys):
    """``last`` resolved, then the driver as for ``--resume RUN_ID``: the run reopened and the trainer handed its
    checkpoint and the epoch after it (Ray stubbed where it would start)."""
    run_id = _run(mlflow_uri, tmp_path, "to-resume", "KILLED", epochs=2, **{"data.shards": str(small_shards)})
    seen = {}

    def trainer(spec, callbacks, epoch_offset):
        seen.update(spec=spec, epoch_offset=epoch_offset)
        raise _TrainerReached

    monkeypatch.setattr(pretrain, "init_ray", lambda: None)
    monkeypatch.setattr(pretrain, "check_resources", lambda *a, **k: None)
    monkeypatch.setattr(pretrain, "_trainer", trainer)
    resume, over = resolve_resume("last", {"tracking": {"experiment": EXP}}, {"tracking.tracking_uri": mlflow_uri})
    assert resume == run_id
    assert f"moco-ray: resuming run {run_id} (to-resume, KILLED, last epoch 2 of 4)" in capsys.readouterr().err
    with pytest.raises(_TrainerReached):
        pretrain.run_pretraining(None, over, resume=resume)
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "RUNNING"
    assert seen["spec"].resume_from.startswith(str(tmp_path / "runs" / f"moco-{run_id}"))
    assert seen["epoch_offset"] == 2
