"""A real ``moco-ray sweep`` through the console script: a failing trial, Ctrl-C (SIGINT to the whole process
group, as a terminal sends it) while a later trial trains, then ``--resume`` as the printed hint says, stopped in
turn by a SIGTERM to its driver (``kill``, ``ray job stop``, Kubernetes), then ``--resume`` again to the end.

What must hold: exit 130 and one line naming ``moco-ray sweep -c FILE --resume``, no driver traceback; the parent
run KILLED, the failed trial's child FAILED with its error, the cut trial's child KILLED (``interrupted``). The
SIGTERM: exit 143, the same line ("stopped by SIGTERM"), no run left RUNNING. The last resume runs only the cut
trial (in a new child run) and ends the same parent FINISHED. kNN every 2 epochs of 2: the first report has no
knn_top1, which Tune must not treat as an error.

Mutation (failed here): the sweep's SIGTERM left to the C-level handler Ray installs in the driver
(``stop_signals_as_ctrl_c`` a no-op: killed by SIGABRT after its "*** SIGTERM received ... PC:" dump).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from moco_helpers import cli_env, sweep_file, tiny_sweep, wait_for_run

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "sweep-ctrl-c"


def _sweep_file(small_shards: Path, tmp_path: Path, uri: str) -> Path:
    # data.train_split "missing" is a valid config value but no such split exists: that trial fails at run time
    spec = tiny_sweep(
        small_shards, tmp_path, uri, EXPERIMENT, {"data.train_split": {"grid": ["train", "missing", "test"]}},
        eval={"knn_every": 2, "knn_k": 10, "knn_max_bank": 100, "knn_max_queries": 50},
        sweep={"name": "ctrl_c", "metric": "knn_top1", "mode": "max"},
    )  # fmt: skip
    return sweep_file(spec, tmp_path)


def _children(c, parent_id: str) -> list:
    exp = c.get_run(parent_id).info.experiment_id
    return c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def _sigterm_the_resume(cmd: list[str], uri: str, c, parent_id: str, path: Path) -> None:
    """``cmd`` (the printed resume) stopped by SIGTERM to its driver once the cut trial runs again."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        wait_for_run(uri, EXPERIMENT, proc, "params.`data.train_split` = 'test' and attributes.status = 'RUNNING'")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    assert not any(ln.startswith("Traceback") for ln in err.splitlines()), err[-3000:]
    hint = [ln for ln in err.splitlines() if "--resume" in ln]
    assert hint == [f"moco-ray: sweep stopped by SIGTERM; continue with: moco-ray sweep -c {path} --resume"], err
    assert c.get_run(parent_id).info.status == "KILLED"
    assert [r.info.run_id for r in _children(c, parent_id) if r.info.status == "RUNNING"] == []


def test_ctrl_c_of_a_sweep_then_resume_finishes_the_rest(small_shards, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    path = _sweep_file(small_shards, tmp_path, mlflow_uri)
    cmd = [sys.executable, "-m", "moco_ray.cli.main", "sweep", "-c", str(path)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        # trials run in grid order, one at a time: the "test" trial's child run means the other two have ended
        wait_for_run(mlflow_uri, EXPERIMENT, proc, "params.`data.train_split` = 'test'")
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the driver and everything in its group
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    # No traceback from the driver. The Ray processes' output is muted once the driver handles the SIGINT
    # (moco_ray.jobs.local_ray.mute_worker_logs); lines already on their way (the workers get the SIGINT at the
    # same moment) may still show, with their "(Name pid=N)" prefix.
    assert not any(ln.startswith("Traceback") for ln in err.splitlines()), err[-3000:]
    assert "Tuner.restore" not in err, err[-3000:]  # Tune's advice, replaced by moco-ray's own command
    # sweep.verbose 0: our [sweep i/n] lines only, not Tune's experiment box and result-path hints
    assert "Configuration for experiment" not in out + err and "View detailed results here" not in out + err, out
    hint = [ln for ln in err.splitlines() if "--resume" in ln]
    assert hint == [f"moco-ray: sweep interrupted; continue with: moco-ray sweep -c {path} --resume"], err[-3000:]

    c = MlflowClient(mlflow_uri)
    (parent,) = c.search_runs([c.get_experiment_by_name(EXPERIMENT).experiment_id], "tags.`moco_ray.sweep` = 'true'")
    assert parent.info.status == "KILLED" and parent.data.tags["moco_ray.sweep_state"] == "interrupted"
    first = {r.data.params["data.train_split"]: r for r in _children(c, parent.info.run_id)}
    assert first["train"].info.status == "FINISHED" and first["train"].data.metrics["knn_top1"] > 0
    assert first["missing"].info.status == "FAILED"
    assert first["missing"].data.tags["moco_ray.error"].startswith("ValueError: split 'missing' is not in the shards")
    assert first["test"].info.status == "KILLED" and first["test"].data.tags["moco_ray.trial_state"] == "interrupted"

    _sigterm_the_resume([*cmd, "--resume"], mlflow_uri, c, parent.info.run_id, path)

    again = subprocess.run([*cmd, "--resume"], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    # a trial's progress lines name it (Ray's log dedup would merge look-alike lines of trials running at once:
    # moco_ray.jobs.local_ray.steer_log_dedup), and the raylet's worker-start notice stays in Ray's logs
    console = again.stdout + again.stderr
    assert "[train_split=test] epoch 2/2  loss" in console, console[-3000:]
    assert "worker processes have been started" not in console, console[-3000:]
    assert c.get_run(parent.info.run_id).info.status == "FINISHED"
    kids = _children(c, parent.info.run_id)
    by_split: dict[str, list] = {}
    for k in kids:
        by_split.setdefault(k.data.params["data.train_split"], []).append(k)
    # the finished and the failed trial were not run again; the interrupted one ran anew in a new child run
    assert [r.info.run_id for r in by_split["train"]] == [first["train"].info.run_id]
    assert [r.info.run_id for r in by_split["missing"]] == [first["missing"].info.run_id]
    assert len(by_split["test"]) == 3
    assert sorted(r.info.status for r in by_split["test"]) == ["FINISHED", "KILLED", "KILLED"]
