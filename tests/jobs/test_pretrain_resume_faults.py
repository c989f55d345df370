"""Nothing a user ran is lost: an interrupted run resumes exactly; a crashed worker restarts from its checkpoint."""

from __future__ import annotations

import hashlib

import pytest
from moco_helpers import TINY_MODEL

pytestmark = pytest.mark.ray

EPOCHS = 3


def _overrides(small_shards, tmp_path, uri, **extra):
    o = {
        "data.shards": str(small_shards),
        "data.limit": 128,
        "data.map_batch_size": 32,
        **TINY_MODEL,
        "moco.queue_size": 80,  # not a multiple of the global batch: the queue wraps mid-batch
        "train.epochs": EPOCHS,
        "train.batch_size": 32,
        "train.num_workers": 1,
        "train.cpus_per_worker": 1,
        "train.storage_path": str(tmp_path / "runs"),
        "eval.knn_every": 0,
        "tracking.tracking_uri": uri,
        "tracking.experiment": "test-faults",
    }
    o.update(extra)
    return o


def _metric_steps(uri, run_id, key="loss"):
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def _queue_sha(state) -> str:
    return hashlib.sha256(state.model["queue.keys"].numpy().tobytes()).hexdigest()


def test_restart_then_interrupt_then_resume_loses_nothing(ray_local, small_shards, tmp_path, mlflow_uri):
    """One run through both recoveries (one run instead of two: each costs ~60 s on 2 CPUs).

    Rank 0 fails mid-way through epoch 2; with train.max_failures=1 Ray Train restarts the workers from epoch 1's
    checkpoint; the run then stops after epoch 2 as an interrupted run would (KILLED). ``--resume last`` finds it
    (the experiment's newest unfinished run) and finishes it: each epoch logged exactly once, and the queue the
    resumed workers start from is the saved one, bit for bit.
    """
    from mlflow.tracking import MlflowClient

    from moco_ray.jobs.pretrain import RunInterrupted, run_pretraining
    from moco_ray.jobs.runs import resolve_resume
    from moco_ray.train.checkpoint import load_state
    from moco_ray.train.hooks import FaultHooks

    steps_per_epoch = 128 // 32
    hooks = FaultHooks(fail_at_step=steps_per_epoch + 2, stop_after_epoch=1)  # fail in epoch 2, stop after it
    over = _overrides(small_shards, tmp_path, mlflow_uri, **{"train.max_failures": 1})
    with pytest.raises(RunInterrupted) as info:
        run_pretraining(None, over, hooks=hooks)
    run_id = info.value.run_id
    c = MlflowClient(mlflow_uri)
    run = c.get_run(run_id)
    assert run.info.status == "KILLED"
    assert (tmp_path / "runs" / f"injected-failure-{run_id}").exists()  # the failure did happen
    assert run.data.tags["moco_ray.restored_from_epoch"] == "1"  # and the restart came from epoch 1's checkpoint
    assert _metric_steps(mlflow_uri, run_id) == [1, 2]  # the restarted epoch logged once (steps: epoch numbers)
    saved = load_state(run.data.tags["moco_ray.checkpoint"])
    assert saved.epoch == 1 and saved.global_step == 2 * steps_per_epoch

    last, resume_over = resolve_resume(
        "last", {"tracking": {"experiment": "test-faults"}}, [f"tracking.tracking_uri={mlflow_uri}"]
    )
    assert last == run_id
    res = run_pretraining(None, resume_over, resume=last)
    assert res.run_id == run_id
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _metric_steps(mlflow_uri, run_id) == list(range(1, EPOCHS + 1))  # no epoch lost or logged twice
    assert run.data.tags["moco_ray.restored_from_epoch"] == "2"
    assert run.data.tags["moco_ray.restored_queue_sha256"] == _queue_sha(saved)
    assert int(run.data.tags["moco_ray.restored_queue_ptr"]) == int(saved.model["queue.ptr"])
    final = load_state(res.checkpoint_path)
    assert final.epoch == EPOCHS - 1
    steps = final.global_step
    assert steps == EPOCHS * steps_per_epoch
    assert int(final.model["queue.ptr"]) == (steps * 32) % 80


def test_worker_failure_without_retries_fails_the_run(ray_local, small_shards, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from moco_ray.jobs.pretrain import run_pretraining
    from moco_ray.train.hooks import FaultHooks

    with pytest.raises(Exception, match="injected"):
        run_pretraining(
            None,
            _overrides(small_shards, tmp_path, mlflow_uri, **{"train.max_failures": 0, "train.epochs": 1}),
            hooks=FaultHooks(fail_at_step=2),
        )
    runs = MlflowClient(mlflow_uri).search_runs(
        [MlflowClient(mlflow_uri).get_experiment_by_name("test-faults").experiment_id]
    )
    assert [r.info.status for r in runs] == ["FAILED"]  # visible, not lost
