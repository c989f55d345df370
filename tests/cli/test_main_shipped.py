"""The console script run outside the repository: shipped experiments by name (``moco-ray experiments`` lists them,
``pretrain`` / ``sweep -c NAME`` find them, the file is loaded and validated before Ray), and ``pretrain --resume
last`` (which run, or one line saying there is none). A cheap check stands for each run: an override the config
refuses (``train.epochs=0``) or the checkpoint cannot take (``model.dim``), so every case ends before Ray starts.

All ``main()`` cases run in ONE fresh interpreter whose current directory is an empty temporary folder (the imports
are paid once); ``moco-ray experiments`` also runs through the installed console script.

Mutations checked by hand (each failed here): the CLI's old default (``experiments/quickstart.yaml`` looked up in
the current directory: "run from the repo root"); ``resolve_resume`` not adding the config file's store to the
overrides (the resume looked in ``./mlflow.db`` of the current folder and found no such run).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from checkpoint_states import EPOCH_0, train_state
from moco_helpers import cli_env

from moco_ray.config import load_config
from moco_ray.jobs.resolve import with_absolute_paths
from moco_ray.jobs.resume import RUN_DIR_TAG
from moco_ray.tracking.history import EpochMetrics
from moco_ray.tracking.run_log import create_run
from moco_ray.train.checkpoint import save_state

_RUNNER = r"""
import contextlib, io, json, sys
from moco_ray.cli.main import main

out = {}
for name, argv in json.loads(sys.argv[1]).items():
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    ray = sys.modules.get("ray")
    out[name] = {"rc": rc, "err": err.getvalue(), "out": std.getvalue(), "ray": bool(ray and ray.is_initialized())}
print(json.dumps(out))
"""

SHAPE = {"model.arch": "resnet18", "model.small_stem": True, "model.dim": 16, "aug.image_size": 16}


def _stopped_run(uri: str, tmp_path: Path, experiment: str, status: str) -> str:
    """A run as the trainer leaves it after 1 of 2 epochs (config.yaml, run dir, a real checkpoint), ``status``."""
    over = {**SHAPE, "train.epochs": 2, "tracking.tracking_uri": uri, "tracking.experiment": experiment}
    cfg = with_absolute_paths(load_config(None, {**over, "train.storage_path": str(tmp_path / "runs")}))
    log = create_run(uri, experiment, "stopped", cfg.flat(), {}, cfg.to_yaml())
    log.log_epochs([EpochMetrics.from_dict(EPOCH_0)])
    run_dir = tmp_path / "runs" / f"moco-{log.run_id}"
    save_state(run_dir / "checkpoint_2026-12-03_00-00-00.000000", train_state({}, epoch=0))
    log.set_tags({RUN_DIR_TAG: str(run_dir)})
    log.finish(status)
    return log.run_id


def _config(path: Path, experiment: str, uri: str) -> str:
    """An experiment file that names its store (no override does): the resume must look there."""
    path.write_text(yaml.safe_dump({"tracking": {"experiment": experiment, "tracking_uri": uri}}))
    return str(path)


def test_shipped_names_and_resume_last_from_another_directory(mlflow_uri, tmp_path):
    killed = _stopped_run(mlflow_uri, tmp_path, "cli-last", "KILLED")
    finished = _stopped_run(mlflow_uri, tmp_path, "cli-done", "FINISHED")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _config(tmp_path / "done.yaml", "cli-done", mlflow_uri)
    stopped = _config(tmp_path / "last.yaml", "cli-last", mlflow_uri)
    cases = {
        "default": ["pretrain", "train.epochs=0"],
        "named": ["pretrain", "-c", "quickstart", "train.epochs=0"],
        "readme_path": ["pretrain", "-c", "experiments/imagenet_mocov2_r50.yaml", "train.epochs=0"],
        "unknown": ["pretrain", "-c", "nope"],
        "sweep": ["sweep", "-c", "sweep_queue_momentum", "train.epochs=0"],
        "resume_none": ["pretrain", "-c", done, "--resume", "last"],
        "resume_last": ["pretrain", "-c", stopped, "--resume", "last", "model.dim=32"],
    }
    p = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(cases)],
        cwd=elsewhere,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.splitlines()[-1])
    for name, r in res.items():
        assert r["rc"] == 2 and not r["ray"], (name, r)
        assert "repo root" not in r["err"] and "Traceback" not in r["err"], (name, r["err"])
    last = {name: r["err"].strip().splitlines()[-1] for name, r in res.items()}
    for name in ("default", "named", "readme_path", "sweep"):  # the file was found, read and validated
        assert last[name] == "moco-ray: error: train.epochs: 0 is out of range; allowed: >= 1", (name, res[name])
    assert "using the shipped" in res["readme_path"]["err"]
    assert last["unknown"].startswith("moco-ray: error: config file not found: nope; shipped experiment files: quick")
    assert last["resume_none"].startswith(
        "moco-ray: error: --resume last: no unfinished run with a checkpoint in experiment 'cli-done'"
    )
    assert f"stopped {finished} FINISHED" in last["resume_none"]
    first, refusal = res["resume_last"]["err"].strip().splitlines()
    assert first == f"moco-ray: resuming run {killed} (stopped, KILLED, last epoch 1 of 2) of experiment cli-last"
    assert refusal.startswith(f"moco-ray: error: run {killed}: cannot change on resume: model.dim: 16 -> 32")
    assert not (elsewhere / "mlflow.db").exists()  # nothing looked in the current folder's default store


def test_experiments_lists_the_shipped_files_through_the_console_script(tmp_path):
    """`moco-ray experiments` from an empty folder: a line per file with its description, grouped by command; with
    a name, the file itself (to copy and edit)."""
    script = Path(sys.executable).with_name("moco-ray")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "moco_ray.cli.main"]
    p = subprocess.run([*cmd, "experiments"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "experiment files (moco-ray pretrain -c NAME):"
    assert lines[1].split(None, 1) == ["quickstart", "The README's main job: `moco-ray pretrain` with no arguments."]
    assert "sweep files (moco-ray sweep -c NAME):" in lines
    assert any(line.split()[:1] == ["sweep_queue_momentum"] for line in lines)
    p = subprocess.run([*cmd, "experiments", "quickstart"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    repo_quickstart = Path(__file__).resolve().parents[2] / "experiments" / "quickstart.yaml"
    assert (p.returncode, p.stdout) == (0, repo_quickstart.read_text())
