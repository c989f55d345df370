"""Sweeps under faults the OS causes: a trial's Train worker SIGKILLed mid-run (as the OOM killer would).

Real local Ray Tune + TorchTrainer trials, real MLflow sqlite store read back. A failing trial, Ctrl-C of the
driver and ``--resume`` are covered in tests/cli/test_sweep_interrupt.py. The kill lands at a known point (after
the first epoch is checkpointed and logged) through the test-only ``FaultHooks.hold_after_epoch``: the worker parks
there and the test kills it, so nothing races the run.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from moco_helpers import tiny_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]


class _Killer:
    """SIGKILLs each worker that parks itself (a ``held-*`` file holding its pid) in ``markers``."""

    def __init__(self, markers: Path) -> None:
        self.markers, self.killed, self.done = markers, {}, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.is_set():
            for f in self.markers.glob("held-*"):
                text = f.read_text().strip()
                if f.name in self.killed or not text:  # not yet written completely: next round
                    continue
                pid = int(text)
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                assert b"ray::" in cmd, cmd  # a Ray worker process of this test's Ray, never anything else
                os.kill(pid, signal.SIGKILL)
                self.killed[f.name] = pid
            time.sleep(0.2)

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.thread.join(timeout=10)
        return self.killed


def test_trial_worker_killed_by_the_os(ray_local, small_shards, tmp_path, mlflow_uri):
    """Each trial's worker is SIGKILLed after epoch 1 of 2. With train.max_failures=1 Ray Train restarts it from
    that checkpoint and the trial finishes in its one child run, each epoch logged once; with max_failures=0 the
    trial is FAILED with the worker's death as its error. The sweep is complete (a failure is an end state) and
    its parent FINISHED."""
    from mlflow.tracking import MlflowClient

    from moco_ray.train.hooks import FaultHooks
    from moco_ray.tuning import run_sweep

    markers = tmp_path / "held"
    markers.mkdir()
    # both trials at once; train.max_failures is the searched key
    spec = tiny_sweep(small_shards, tmp_path, mlflow_uri, "sweep-faults", {"train.max_failures": {"grid": [0, 1]}},
                      sweep={"max_concurrent_trials": 2})  # fmt: skip
    killer = _Killer(markers)
    try:
        res = run_sweep(spec, hooks=FaultHooks(hold_after_epoch=0, marker_dir=str(markers), hold_s=300))
    finally:
        killed = killer.stop()
    assert len(killed) == 2, killed  # one kill per trial: a restarted worker group does not park again

    rows = {r["param:train.max_failures"]: r for r in res.table.to_dict("records")}
    assert res.complete and res.counts == {"finished": 1, "failed": 1}
    c = MlflowClient(mlflow_uri)
    assert c.get_run(res.parent_run_id).info.status == "FINISHED"

    survived = c.get_run(rows[1]["run_id"])
    assert rows[1]["state"] == "finished" and rows[1]["epochs_done"] == 2
    assert survived.info.status == "FINISHED" and survived.data.tags["moco_ray.trial_state"] == "finished"
    steps = [m.step for m in c.get_metric_history(survived.info.run_id, "loss")]
    if steps == [1, 2]:  # restarted from epoch 1's checkpoint: each epoch logged once (steps: epoch numbers)
        assert "moco_ray.discarded_epochs" not in survived.data.tags
    else:  # killed before Ray recorded that checkpoint: the restart retrained epoch 1, relogged and marked
        assert steps == [1, 1, 2], steps
        assert "epoch 1 discarded by a worker restart" in survived.data.tags["moco_ray.discarded_epochs"]

    died = c.get_run(rows[0]["run_id"])
    assert rows[0]["state"] == "failed" and died.info.status == "FAILED"
    assert died.data.tags["moco_ray.trial_state"] == "failed"
    error = died.data.tags["moco_ray.error"]
    assert error == rows[0]["error"] and error != "unknown error", error
    assert [m.step for m in c.get_metric_history(died.info.run_id, "loss")] == [1]  # epoch 1 was logged, kept
