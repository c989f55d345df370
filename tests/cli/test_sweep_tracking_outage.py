"""A real ``moco-ray sweep`` logging to a real ``mlflow server`` that dies in the middle of the first trial.

What must hold: the driver stops the sweep (the outage outlasts its grace period, shortened here), exits 3 with one
line naming the server and ``moco-ray sweep -c FILE --resume``, no traceback, no trial marked FAILED; with the
server back on the same store, ``--resume`` reruns the cut trial, and the parent and children end in states that
tell the truth (the cut trial's first child KILLED/interrupted, its rerun FINISHED). One trial: each costs a minute
here; trials that never started are resumed like the cut one (Tune's unfinished trials), as in
test_sweep_interrupt.py, and two trials starting at once against a server are what found the dataset-row race that
tests/tracking/test_datasets.py now covers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from moco_helpers import cli_env, free_port, sweep_file, tiny_sweep, wait_for_run

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "sweep-outage"


class _Server:
    """``mlflow server`` on a loopback port, its sqlite store and artifacts in ``root``; killable and restartable."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from moco_ray.tracking.store import server_problem

        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]  # fmt: skip
        log = open(self.root / "server.log", "a")  # noqa: SIM115 (the server writes it until killed)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, cwd=self.root)
        deadline = time.monotonic() + 120
        while server_problem(self.uri, timeout=2) is not None:
            assert self.proc.poll() is None and time.monotonic() < deadline, (self.root / "server.log").read_text()
            time.sleep(0.5)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a crash: no goodbye to the clients
            self.proc.wait(timeout=30)


def test_tracking_server_dies_mid_sweep_then_resume_finishes(ray_local, small_shards, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from moco_ray.cli.main import main

    server = _Server(tmp_path)
    server.start()
    spec = tiny_sweep(small_shards, tmp_path, server.uri, EXPERIMENT, {"moco.temperature": {"grid": [0.2]}},
                      sweep={"name": "outage"})  # fmt: skip
    path = sweep_file(spec, tmp_path)
    cmd = [sys.executable, "-m", "moco_ray.cli.main", "sweep", "-c", str(path)]
    # 15 s, not the default 60: short for the test, long enough for a server that stalls on a loaded 2-CPU box (4 s
    # was not: the server's start-up jobs once kept /health silent that long, and the sweep stopped with it alive)
    env = cli_env(MOCO_RAY_TRACKING_GRACE_S="15")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        try:
            wait_for_run(server.uri, EXPERIMENT, proc, "tags.`mlflow.parentRunId` != '' and metrics.loss > 0")
        finally:
            server.kill()
        t_kill = time.monotonic()
        out, err = proc.communicate(timeout=300)
        stopped_after = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, err[-3000:]
    assert stopped_after < 150, stopped_after  # not MLflow's ~4 minutes of retries per call
    assert not any(ln.startswith("Traceback") for ln in err.splitlines()), err[-3000:]
    (line,) = [ln for ln in err.splitlines() if "--resume" in ln]
    assert line.startswith(f"moco-ray: MLflow server {server.uri} unreachable for 15 s"), line
    assert line.endswith(f"continue with: moco-ray sweep -c {path} --resume"), line
    assert f"[sweep] MLflow server {server.uri} is not answering" in out, out[-3000:]
    assert "[sweep] stopping: the running trials are cut and kept for --resume" in out, out[-3000:]
    assert "FAILED" not in out, out[-3000:]  # no trial failed on the outage
    assert "Stop signal received" not in err, err[-3000:]  # Tune's Ctrl-C notice: this was no Ctrl-C

    # the resume through the CLI's entry point in this process, on the session's Ray (the outage needed a process
    # of its own to watch; the resume does not, and a second CLI process pays imports, a Ray start and cold workers)
    server.start()
    monkeypatch.setenv("MOCO_RAY_TRACKING_GRACE_S", "15")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    capsys.readouterr()
    rc = main(["sweep", "-c", str(path), "--resume"])
    again = capsys.readouterr()
    assert rc == 0, again.err[-3000:]
    # MLflow's "View run ... at: URL" lines (a server store prints them for every run that ends) stay off
    assert "View run" not in again.out + again.err, again.out[-3000:]
    c = MlflowClient(server.uri)
    exp_id = c.get_experiment_by_name(EXPERIMENT).experiment_id
    (parent,) = c.search_runs([exp_id], "tags.`moco_ray.sweep` = 'true'")
    assert parent.info.status == "FINISHED" and parent.data.tags["moco_ray.sweep_state"] == "finished"
    assert parent.data.tags["moco_ray.trials_finished"] == "1"
    kids = c.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_t: dict[str, list] = {}
    for k in kids:
        by_t.setdefault(k.data.params["moco.temperature"], []).append(k)
    # the child cut by the outage KILLED (interrupted), the rerun FINISHED
    cut, rerun = sorted(by_t["0.2"], key=lambda r: r.info.start_time)
    assert (cut.info.status, cut.data.tags["moco_ray.trial_state"]) == ("KILLED", "interrupted"), cut
    assert (rerun.info.status, rerun.data.tags["moco_ray.trial_state"]) == ("FINISHED", "finished"), rerun
    server.kill()
