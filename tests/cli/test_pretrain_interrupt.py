"""Ctrl-C of a real ``moco-ray pretrain`` (SIGINT to its whole process group, as a terminal sends it): the MLflow
run ends KILLED, one line names ``moco-ray pretrain --resume RUN_ID``, the exit code is 130, and ``--resume``
continues the run to FINISHED (run through the CLI's ``main`` in the test's process: only the Ctrl-C needs a process
of its own).

Ray Train V2's ``fit()`` installs its own SIGINT handler, which aborts the controller and ends in ``SystemExit``:
before the fix that was exit 1, nothing printed and the run FAILED.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from moco_helpers import TINY_MODEL, cli_env, wait_for_run

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "test-ctrl-c"


def _config(small_shards: Path, tmp_path: Path, uri: str, epochs: int) -> Path:
    over = {
        "data.shards": str(small_shards),
        "data.limit": 64,
        "data.map_batch_size": 32,
        **TINY_MODEL,
        "moco.queue_size": 64,
        "train.epochs": epochs,
        "train.batch_size": 32,
        "train.max_steps_per_epoch": 1,
        "train.storage_path": str(tmp_path / "runs"),
        "eval.knn_every": 0,
        "tracking.tracking_uri": uri,
        "tracking.experiment": EXPERIMENT,
    }
    doc: dict = {}
    for k, v in over.items():
        section, key = k.split(".")
        doc.setdefault(section, {})[key] = v
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_ctrl_c_kills_the_run_and_resume_finishes_it(
    ray_local, small_shards, tmp_path, mlflow_uri, monkeypatch, capsys
):
    from mlflow.tracking import MlflowClient

    from moco_ray.cli.main import main

    cfg = _config(small_shards, tmp_path, mlflow_uri, epochs=40)
    cmd = [sys.executable, "-m", "moco_ray.cli.main", "pretrain", "-c", str(cfg)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        first_epoch = "attributes.status = 'RUNNING' and metrics.loss > 0"  # the run, once epoch 0 is logged
        run_id = wait_for_run(mlflow_uri, EXPERIMENT, proc, first_epoch).info.run_id
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the driver and everything in its group
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    # No traceback from the driver. The Ray processes' output is muted once the driver handles the SIGINT
    # (moco_ray.jobs.local_ray.mute_worker_logs); lines already on their way (the workers get the SIGINT at the
    # same moment) may still show, with their "(Name pid=N)" prefix.
    assert not any(ln.startswith("Traceback") for ln in err.splitlines()), err[-3000:]
    hint = [ln for ln in err.splitlines() if "--resume" in ln]
    resume = f"moco-ray pretrain --resume {run_id} tracking.tracking_uri={mlflow_uri}"  # the store is not the default
    assert hint == [f"moco-ray: run {run_id} interrupted (KILLED); continue with: {resume}"]
    c = MlflowClient(mlflow_uri)
    run = c.get_run(run_id)
    assert run.info.status == "KILLED"
    done = len(c.get_metric_history(run_id, "loss"))
    assert 1 <= done < 40

    # --resume continues the same run (the two remaining epochs only: the epoch count is an override), through the
    # CLI's entry point in this process, on the session's Ray: the Ctrl-C above needed a process of its own, the
    # resume does not (a second CLI process would pay its imports, a Ray start and cold workers again)
    with monkeypatch.context() as mp:
        for key in ("MLFLOW_TRACKING_URI", "MOCO_RAY_ALLOW_PENDING_GPUS"):  # as cli_env() leaves them out
            mp.delenv(key, raising=False)
        rc = main([*resume.split()[1:], f"train.epochs={done + 2}"])  # the hint as printed, plus more epochs
    assert rc == 0, capsys.readouterr().err[-3000:]
    assert c.get_run(run_id).info.status == "FINISHED"
    assert len(c.get_metric_history(run_id, "loss")) >= done + 1
