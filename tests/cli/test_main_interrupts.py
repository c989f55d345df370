"""What ``moco-ray`` says when it is interrupted before there is a run to resume, or during ``ingest``: one line, the
``--resume`` hint only where a resume would work (naming the real run), exit 128 + the signal.

Through the CLI's ``main`` in this process, the interruption a real signal sent at a chosen point (a stand-in for
the step it replaces raises it): Ctrl-C is SIGINT, as the terminal sends it, and SIGTERM goes through the handler
``main`` installs. The cuts of a training run by real signals to a real CLI process are in
test_pretrain_interrupt.py (slow).

Mutation for every test here (each failed): ``main``'s old line for any interruption ("interrupted; a pretraining
continues with `moco-ray pretrain --resume RUN_ID`"), which named a placeholder, or a run that had no checkpoint.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml

from moco_ray.cli.main import main

EXPERIMENT = "interrupts"


class _NotRouted(Exception):
    """The stand-in SIGTERM handler's: the signal was not routed to Ctrl-C's path (instead of ending pytest)."""


def _refuse(signum: int, frame: object) -> None:
    raise _NotRouted(signal.Signals(signum).name)


@pytest.fixture
def no_sigterm_death():
    """SIGTERM fails the test instead of ending this process where ``main`` does not take it; put back after."""
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _refuse)
    yield
    signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


def _cut_with(sig: int):
    def stand_in(*args: object, **kwargs: object) -> None:
        signal.raise_signal(sig)
        raise AssertionError(f"{signal.Signals(sig).name} did not interrupt")

    return stand_in


def _config(tmp_path: Path, shards: Path, uri: str) -> Path:
    doc = {
        "model": {"arch": "resnet18", "small_stem": True, "dim": 16, "hidden_dim": 32},
        "aug": {"image_size": 16},
        "moco": {"queue_size": 64},
        "data": {"shards": str(shards), "limit": 64, "map_batch_size": 32},
        "train": {"epochs": 2, "batch_size": 32, "storage_path": str(tmp_path / "runs")},
        "eval": {"knn_every": 0},
        "tracking": {"tracking_uri": uri, "experiment": EXPERIMENT},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_ctrl_c_or_sigterm_before_the_run_exists_has_nothing_to_resume(tmp_path, capsys, monkeypatch, no_sigterm_death):
    """Cut while the data is prepared (no MLflow run yet); SIGTERM exits 143 and says so, and ``main`` gives the
    handler before it back."""
    cfg = _config(tmp_path, tmp_path / "shards", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for sig, rc, what in ((signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "stopped by SIGTERM")):
        monkeypatch.setattr("moco_ray.jobs.pretrain.ingest_missing_shards", _cut_with(sig))
        assert main(["pretrain", "-c", str(cfg)]) == rc
        assert _last_line(capsys) == f"moco-ray: {what} before the run started: nothing to resume"
    assert signal.getsignal(signal.SIGTERM) is _refuse


def test_ctrl_c_before_a_resume_restarted_repeats_its_command(tmp_path, capsys, monkeypatch):
    """Cut while ``--resume`` reads the run (nothing of it changed yet): the same command, overrides and all."""
    monkeypatch.setattr("moco_ray.jobs.pretrain.resume_target", _cut_with(signal.SIGINT))
    argv = ["pretrain", "--resume", "0123abcd", "tracking.tracking_uri=sqlite:////x y/mlflow.db", "train.epochs=9"]
    assert main(argv) == 130
    assert _last_line(capsys) == (
        "moco-ray: interrupted before run 0123abcd restarted; continue with: moco-ray pretrain --resume 0123abcd "
        "'tracking.tracking_uri=sqlite:////x y/mlflow.db' train.epochs=9"
    )


@pytest.mark.ray
def test_ctrl_c_before_the_first_checkpoint_kills_the_run_and_says_start_again(
    ray_local, small_shards, tmp_path, mlflow_uri, capsys, monkeypatch
):
    """The run exists (created, its folder named) but training never reported a checkpoint: KILLED, and no
    ``--resume`` (it would be refused: no checkpoint).

    Mutation (failed here): ``RunKilled`` always resumable (the hint, for a run ``--resume`` refuses).
    """
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("moco_ray.jobs.pretrain._trainer", _cut_with(signal.SIGINT))
    assert main(["pretrain", "-c", str(_config(tmp_path, small_shards, mlflow_uri))]) == 130
    c = MlflowClient(mlflow_uri)
    (run,) = c.search_runs([c.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "KILLED"
    assert _last_line(capsys) == (
        f"moco-ray: run {run.info.run_id} interrupted (KILLED) before its first checkpoint: nothing to resume; "
        "start it again"
    )


def test_sigterm_during_ingest_leaves_nothing_half_written(
    small_image_root, tmp_path, capsys, monkeypatch, no_sigterm_death
):
    """SIGTERM while shards are written: exit 143, one line saying so, no shard and no manifest in OUT (the line
    says nothing is half-written there), and the same command then ingests it all.

    Mutation (failed here): no message of ``cmd_ingest``'s own (the generic "moco-ray: stopped by SIGTERM").
    """
    import moco_ray.data.ingest as ingest_module

    add = ingest_module._ShardWriter.add
    rows: list[int] = []

    def add_then_cut(self, item, data) -> None:
        rows.append(1)
        if len(rows) == 100:
            signal.raise_signal(signal.SIGTERM)
        add(self, item, data)

    out = tmp_path / "shards"
    argv = ["ingest", str(small_image_root), str(out), "--workers", "1"]
    with monkeypatch.context() as mp:
        mp.setattr(ingest_module._ShardWriter, "add", add_then_cut)
        assert main(argv) == 143
    assert _last_line(capsys) == f"moco-ray: ingest stopped by SIGTERM; nothing half-written in {out}: run it again"
    assert len(rows) == 100
    assert not [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")], list(out.rglob("*"))
    assert main(argv) == 0
    assert (out / "manifest.json").is_file()
