"""Ctrl-C of a real ``moco-ray pretrain`` (SIGINT to its whole process group, as a terminal sends it): the MLflow
run ends KILLED, one line names ``moco-ray pretrain --resume RUN_ID``, the exit code is 130. The signals schedulers
and terminals send take the same path: SIGTERM (``kill``, ``ray job stop``, Slurm, Kubernetes) exits 143, a closed
terminal (SIGHUP) 129 with the local Ray it started shut down. One run is cut three times, each resume by the command
the cut printed, and finished by a last resume through the CLI's ``main`` in the test's process (only the cuts need
processes of their own).

Ray Train V2's ``fit()`` installs its own SIGINT handler, which aborts the controller and ends in ``SystemExit``:
before the fix that was exit 1, nothing printed and the run FAILED.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from moco_helpers import cli_env, config_file, left_in_session, tiny_run, wait_for_run

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "test-ctrl-c"


# Runs the CLI with the terminal on fd 0 as its controlling terminal (it is the session's leader: Popen's
# start_new_session), as a shell in a terminal window runs a job.
_IN_A_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


class _Terminal:
    """A pseudo-terminal the CLI writes to; what it shows is kept in ``seen`` until :meth:`close` hangs it up."""

    def __init__(self, cmd: list[str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _IN_A_TERMINAL, *cmd], cwd=REPO, env=cli_env(),
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self.seen, self.stop = bytearray(), threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:  # drained all along: a full terminal buffer would block the CLI's writes
        while not self.stop.is_set():
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.seen.extend(os.read(self.master, 65536))
                except OSError:
                    return

    def close(self) -> None:
        """The window closes: the kernel hangs the terminal up (SIGHUP to the CLI, writes to it fail with EIO),
        and the shell passes SIGHUP on to the job's whole process group, the local Ray's processes included."""
        self.stop.set()
        self.reader.join()
        os.close(self.master)
        os.killpg(self.proc.pid, signal.SIGHUP)


def _wait_for_epochs(c, run_id: str, more_than: int, term: _Terminal) -> int:
    while (n := len(c.get_metric_history(run_id, "loss"))) <= more_than:
        assert term.proc.poll() is None, term.seen.decode(errors="replace")[-3000:]
        time.sleep(0.3)
    return n


def _no_noise(console: str) -> None:
    """No driver traceback, and no PlacementGroupCleaner traceback although the session's Ray (``ray_local``) is a
    second instance on the machine. The Ray processes' output is muted once the driver handles the signal
    (moco_ray.jobs.local_ray.mute_worker_logs); lines already on their way may still show, "(Name pid=N)" first."""
    assert not any(ln.startswith("Traceback") for ln in console.splitlines()), console[-3000:]
    assert "Found multiple active Ray instances" not in console, console[-3000:]


def _cut(cmd: list[str], uri: str, sig: int, group: bool, epochs_before: int = 0) -> tuple[str, int, str]:
    """``cmd`` in a new session, cut by ``sig`` once it has logged an epoch of its own (the run has
    ``epochs_before`` already): (run id, exit code, stderr)."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        trained = f"attributes.status = 'RUNNING' and metrics.epoch >= {epochs_before} and metrics.loss > 0"
        run_id = wait_for_run(uri, EXPERIMENT, proc, trained).info.run_id
        if group:
            os.killpg(proc.pid, sig)  # the terminal's Ctrl-C: the driver and everything in its group
        else:
            proc.send_signal(sig)  # the driver only, as `kill PID` (or Kubernetes, `ray job stop`) sends it
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return run_id, proc.returncode, err


def test_ctrl_c_sigterm_and_a_closed_terminal_kill_the_run_and_resume_finishes_it(
    ray_local, small_shards, tmp_path, mlflow_uri, monkeypatch, capsys
):
    """Ctrl-C, then SIGTERM to the resumed driver alone, then the next resume's terminal closed; a last resume
    finishes the run. SIGTERM: exit 143 and its line, no C-level "*** SIGTERM received ... PC:" dump. The closed
    terminal: exit 129 and nothing of its local Ray left running (its line is lost with the terminal).

    Mutations (each failed here): no handlers for SIGTERM / SIGHUP (``stop_signals_as_ctrl_c`` a no-op: the SIGTERM
    ended in Ray's "*** SIGTERM received ... PC:" dump); the SIGHUP not kept from the local Ray's processes while
    they start (``_daemons_keep_stop_signals_for_the_driver`` a no-op: they die with the terminal, exit 1, and by hand:
    the run RUNNING); the line printed without ``_say``'s guard (exit 1 on the hung-up terminal); the workers
    without ``pin_ray_address`` (the PlacementGroupCleaner's "Found multiple active Ray instances" traceback).
    """
    from mlflow.tracking import MlflowClient

    from moco_ray.cli.main import main

    cfg = config_file(tiny_run(small_shards, tmp_path, mlflow_uri, EXPERIMENT, epochs=40), tmp_path)
    cli = [sys.executable, "-m", "moco_ray.cli.main"]
    run_id, rc, err = _cut([*cli, "pretrain", "-c", str(cfg)], mlflow_uri, signal.SIGINT, group=True)
    assert rc == 130, err[-3000:]
    _no_noise(err)
    resume = f"moco-ray pretrain --resume {run_id} tracking.tracking_uri={mlflow_uri}"  # the store is not the default
    assert [ln for ln in err.splitlines() if "--resume" in ln] == [
        f"moco-ray: run {run_id} interrupted (KILLED); continue with: {resume}"
    ]
    c = MlflowClient(mlflow_uri)
    assert c.get_run(run_id).info.status == "KILLED"
    done = len(c.get_metric_history(run_id, "loss"))
    assert 1 <= done < 40

    # the printed command trains on, then is stopped as a scheduler stops it
    again, rc, err = _cut([*cli, *resume.split()[1:]], mlflow_uri, signal.SIGTERM, group=False, epochs_before=done)
    assert again == run_id and rc == 143, err[-3000:]
    _no_noise(err)
    assert "SIGTERM received" not in err, err[-3000:]
    assert [ln for ln in err.splitlines() if "--resume" in ln] == [
        f"moco-ray: run {run_id} stopped by SIGTERM (KILLED); continue with: {resume}"
    ]
    assert c.get_run(run_id).info.status == "KILLED"
    done = len(c.get_metric_history(run_id, "loss"))

    term = _Terminal([*cli[1:], *resume.split()[1:]])  # the printed command again, in a terminal window
    try:
        done = _wait_for_epochs(c, run_id, done, term)
        term.close()
        rc = term.proc.wait(timeout=180)
    finally:
        if term.proc.poll() is None:
            os.killpg(term.proc.pid, signal.SIGKILL)
    shown = term.seen.decode(errors="replace")
    assert rc == 129, shown[-3000:]
    _no_noise(shown)
    assert c.get_run(run_id).info.status == "KILLED"
    assert left_in_session(term.proc.pid) == {}

    # the last resume (one more epoch: the count is an override) through the CLI's entry point in this process, on
    # the session's Ray: a cut needs a process of its own, a resume does not (a CLI process would pay its imports, a
    # Ray start and cold workers again)
    with monkeypatch.context() as mp:
        for key in ("MLFLOW_TRACKING_URI", "MOCO_RAY_ALLOW_PENDING_GPUS"):  # as cli_env() leaves them out
            mp.delenv(key, raising=False)
        rc = main([*resume.split()[1:], f"train.epochs={done + 1}"])  # the hint as printed, plus more epochs
    assert rc == 0, capsys.readouterr().err[-3000:]
    assert c.get_run(run_id).info.status == "FINISHED"
    assert len(c.get_metric_history(run_id, "loss")) >= done + 1
