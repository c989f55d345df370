"""``pretrain --resume RUN_ID [overrides]``: an override the checkpoint cannot take is refused in one line before
Ray starts and before the run is touched; any other is announced and written into the run's record.

No Ray: the stopped run is made as the trainer leaves it (params, config.yaml, the run-dir tag, a checkpoint in
that dir, KILLED) in a fresh sqlite store.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from checkpoint_states import train_state
from mlflow.tracking import MlflowClient
from moco_helpers import run_cli_cases

from moco_ray.config import load_config
from moco_ray.jobs import pretrain
from moco_ray.jobs.resolve import with_absolute_paths
from moco_ray.jobs.resume import RESUME_CHANGES_TAG, RUN_DIR_TAG, record_resume, resume_target
from moco_ray.tracking.run_log import CONFIG_FILE, RunLog, create_run
from moco_ray.train.checkpoint import save_state

RUN = {
    "model.arch": "resnet18",
    "model.small_stem": True,
    "model.dim": 16,
    "aug.image_size": 16,
    "moco.queue_size": 1024,
    "moco.temperature": 0.2,
    "train.epochs": 2,
    "train.batch_size": 32,
    "eval.knn_every": 0,
    "tracking.experiment": "resume-overrides",
}


def _stopped_run(uri: str, tmp_path: Path, **extra) -> tuple[str, Path]:
    """A KILLED run after its first epoch, as the trainer leaves it; returns (run id, its checkpoint dir)."""
    over = {**RUN, "tracking.tracking_uri": uri, "train.storage_path": str(tmp_path / "runs"), **extra}
    cfg = with_absolute_paths(load_config(None, over))
    log = create_run(uri, cfg.tracking.experiment, "stopped", cfg.flat(), {}, cfg.to_yaml())
    run_dir = tmp_path / "runs" / f"moco-{log.run_id}"
    checkpoint = run_dir / "checkpoint_2026-12-03_00-00-00.000000"
    save_state(checkpoint, train_state({}, epoch=0))
    log.set_tags({RUN_DIR_TAG: str(run_dir)})
    log.finish("KILLED")
    return log.run_id, checkpoint


def _artifacts(uri: str, run_id: str, path: str | None = None) -> list[str]:
    return sorted(a.path for a in MlflowClient(uri).list_artifacts(run_id, path))


def _artifact_config(uri: str, run_id: str, path: str, tmp_path: Path):
    return load_config(RunLog(uri, run_id).download(path, tmp_path / "dl" / path.replace("/", "_")))


def test_a_shape_key_is_refused_naming_it_and_the_run_stays_killed(mlflow_uri, tmp_path):
    """K (the queue buffer), the head width and the optimizer kind cannot change: one ValueError naming each, and
    the run is neither reopened nor written to.

    Mutation checked by hand: without ``refuse_fixed`` in ``resume_target`` this accepted all three (the trainer
    then failed after Ray started with ``size mismatch for queue.keys``).
    """
    run_id, _ = _stopped_run(mlflow_uri, tmp_path)
    over = {"tracking.tracking_uri": mlflow_uri, "moco.queue_size": 2048, "model.dim": 32, "optim.optimizer": "lars"}
    with pytest.raises(ValueError, match="cannot change on resume") as info:
        resume_target(run_id, over)
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("moco.queue_size: 1024 -> 2048", "model.dim: 16 -> 32", 'optim.optimizer: "sgd" -> "lars"'):
        assert part in msg
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert RESUME_CHANGES_TAG not in run.data.tags
    assert _artifacts(mlflow_uri, run_id) == [CONFIG_FILE]


VIT = {"model.arch": "vit_small", "model.small_stem": False, "model.patch_size": 4, "model.vit_width": 64,
       "model.vit_depth": 2, "model.vit_heads": 4, "aug.image_size": 32}  # fmt: skip


def test_a_vit_run_keeps_its_image_size_a_resnet_run_does_not(mlflow_uri, tmp_path):
    """A ViT's fixed position embedding has one row per patch, so ``aug.image_size`` is fixed on its resume (the
    trainer failed with a ``pos_embed`` size mismatch after Ray started); a ResNet's weights do not depend on it.
    Mutations (each failed here): the ViT-only rule dropped; ``resume_target`` not telling ``refuse_fixed`` the run
    is a ViT."""
    vit_run, _ = _stopped_run(mlflow_uri, tmp_path / "vit", **VIT)
    over = {"tracking.tracking_uri": mlflow_uri, "aug.image_size": 64}
    with pytest.raises(ValueError, match=r"aug.image_size: 32 -> 64 \(a ViT's position embedding"):
        resume_target(vit_run, over)
    assert MlflowClient(mlflow_uri).get_run(vit_run).info.status == "KILLED"
    resnet_run, _ = _stopped_run(mlflow_uri, tmp_path / "resnet")
    target = resume_target(resnet_run, over)
    assert target.config.aug.image_size == 64


def test_the_cli_refuses_a_shape_change_in_one_line_before_ray(mlflow_uri, tmp_path, small_shards):
    """Through moco-ray's main: exit 2, one ``moco-ray: error:`` line naming the key, Ray never started, the run
    still KILLED (a refused resume reopened nothing). Real shards, so nothing else stops the resume first.

    Mutation checked by hand: without ``refuse_fixed`` Ray was started, the run reopened and the trainer failed.
    """
    run_id, _ = _stopped_run(mlflow_uri, tmp_path, **{"data.shards": str(small_shards)})
    argv = ["pretrain", "--resume", run_id, f"tracking.tracking_uri={mlflow_uri}", "moco.queue_size=2048"]
    res = run_cli_cases({"queue": {"argv": argv}}, tmp_path)["queue"]
    assert res["rc"] == 2, res["stderr"]
    lines = res["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moco-ray: error: run "), res["stderr"]
    assert "moco.queue_size: 1024 -> 2048" in lines[0]
    assert not res["ray_started"]
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "KILLED"


def test_an_allowed_change_is_announced_and_recorded(mlflow_uri, tmp_path, capsys):
    """``moco.temperature`` and ``train.epochs`` may change: one line each, the effective config returned, then
    the record (tag, new config.yaml, the replaced one kept); a second resume appends, and with no override keeps
    the recorded values.

    Mutation checked by hand: with ``record_resume`` writing nothing, the tag was missing and config.yaml still
    said temperature 0.2 (what MLflow showed before this change, while 0.5 trained).
    """
    run_id, checkpoint = _stopped_run(mlflow_uri, tmp_path)
    over = {"tracking.tracking_uri": mlflow_uri, "moco.temperature": 0.5, "train.epochs": 4}
    target = resume_target(run_id, over)
    assert (target.config.moco.temperature, target.config.train.epochs) == (0.5, 4)
    assert (target.checkpoint, target.epoch) == (str(checkpoint), 0)
    assert capsys.readouterr().err.splitlines() == [
        "moco-ray: resume changes moco.temperature: 0.2 -> 0.5",
        "moco-ray: resume changes train.epochs: 2 -> 4",
    ]
    record_resume(target)
    c = MlflowClient(mlflow_uri)
    run = c.get_run(run_id)
    assert run.info.status == "KILLED"  # recording is not reopening
    assert run.data.tags[RESUME_CHANGES_TAG] == "after epoch 1: moco.temperature: 0.2 -> 0.5; train.epochs: 2 -> 4"
    assert run.data.params["moco.temperature"] == "0.2"  # params are immutable: the tag says what changed
    assert _artifact_config(mlflow_uri, run_id, CONFIG_FILE, tmp_path).moco.temperature == 0.5
    old = _artifact_config(mlflow_uri, run_id, "config_history/config-1.yaml", tmp_path)
    assert (old.moco.temperature, old.train.epochs) == (0.2, 2)

    again = resume_target(run_id, {"tracking.tracking_uri": mlflow_uri, "train.epochs": 6})
    assert again.config.moco.temperature == 0.5  # the recorded config, not the one the run started with
    assert [str(ch) for ch in again.changes] == ["train.epochs: 4 -> 6"]
    record_resume(again)
    assert c.get_run(run_id).data.tags[RESUME_CHANGES_TAG].splitlines()[1] == "after epoch 1: train.epochs: 4 -> 6"
    assert _artifacts(mlflow_uri, run_id, "config_history") == [
        "config_history/config-1.yaml",
        "config_history/config-2.yaml",
    ]
    assert _artifact_config(mlflow_uri, run_id, "config_history/config-2.yaml", tmp_path).train.epochs == 4


def test_no_change_prints_nothing_and_writes_nothing(mlflow_uri, tmp_path, capsys):
    """No override, the run's own values repeated (the original command with ``--resume`` added) and tracking.*
    (how the run is found) are no change: no line, no tag, config.yaml untouched, no config_history/.

    Mutation checked by hand: comparing tracking.* too reported tracking.log_every_steps as a change.
    """
    run_id, _ = _stopped_run(mlflow_uri, tmp_path)
    same = {"tracking.tracking_uri": mlflow_uri, "moco.queue_size": 1024, "tracking.log_every_steps": 7}
    for over in ({"tracking.tracking_uri": mlflow_uri}, same):
        target = resume_target(run_id, over)
        assert target.changes == []
        record_resume(target)
    assert capsys.readouterr().err == ""
    assert RESUME_CHANGES_TAG not in MlflowClient(mlflow_uri).get_run(run_id).data.tags
    assert _artifacts(mlflow_uri, run_id) == [CONFIG_FILE]


class _TrainerReached(Exception):
    """Raised where run_pretraining would build the TorchTrainer: everything before it has happened."""


def test_run_pretraining_records_the_change_then_reopens_and_trains_with_it(
    mlflow_uri, tmp_path, small_shards, monkeypatch
):
    """The driver itself, Ray stubbed out: a refused resume never reaches Ray and leaves the run KILLED; an
    accepted one records its changes, reopens the run and hands the trainer the new value and the checkpoint.

    Mutations checked by hand: ``record_resume(target)`` dropped from run_pretraining (no tag); ``init_ray()``
    moved before ``resume_target`` (Ray was started for a refused resume).
    """
    run_id, checkpoint = _stopped_run(mlflow_uri, tmp_path, **{"data.shards": str(small_shards)})
    started, seen = [], {}

    def trainer(spec, callbacks, epoch_offset):
        seen.update(spec=spec, epoch_offset=epoch_offset)
        raise _TrainerReached

    monkeypatch.setattr(pretrain, "init_ray", lambda: started.append(True))
    monkeypatch.setattr(pretrain, "check_resources", lambda *a, **k: None)
    monkeypatch.setattr(pretrain, "_trainer", trainer)
    with pytest.raises(ValueError, match="moco.queue_size"):
        pretrain.run_pretraining(None, {"tracking.tracking_uri": mlflow_uri, "moco.queue_size": 2048}, resume=run_id)
    assert not started and MlflowClient(mlflow_uri).get_run(run_id).info.status == "KILLED"

    with pytest.raises(_TrainerReached):
        pretrain.run_pretraining(None, {"tracking.tracking_uri": mlflow_uri, "moco.temperature": 0.5}, resume=run_id)
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.tags[RESUME_CHANGES_TAG] == "after epoch 1: moco.temperature: 0.2 -> 0.5"
    assert seen["spec"].config.moco.temperature == 0.5
    assert (seen["spec"].resume_from, seen["epoch_offset"]) == (str(checkpoint), 1)
