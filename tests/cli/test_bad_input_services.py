"""Services and files a command cannot use, through the real CLI: one line ``moco-ray: error: ...``, exit 2, no
traceback, no Ray started, in seconds.

An unreachable MLflow server for every command that takes a tracking URI (``pretrain``, ``pretrain --resume``,
``eval``, ``export``); YAML syntax errors in ``-c FILE``, a sweep file and an override value (named with line and
column); ``--resume`` of a FINISHED run; a GPU asked for when Ray would start locally on a machine without one.
All cases run in one fresh interpreter (as tests/cli/test_bad_input.py does), so "no Ray started" is observable.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from moco_helpers import free_port, run_cli_cases


def _finished_run(uri: str) -> str:
    """A FINISHED pretraining run as the trainer leaves it (config.yaml, no encoder needed here)."""
    from moco_helpers import log_like_trainer

    from moco_ray.config import load_config

    return log_like_trainer(uri, load_config(None, {"tracking.experiment": "done"}), None, "done")


@pytest.fixture(scope="module")
def cases(small_shards, tmp_path_factory) -> dict[str, tuple[list[str], str]]:
    t = tmp_path_factory.mktemp("failures_cli")
    down = f"http://127.0.0.1:{free_port()}"  # bound, then released: nobody listens
    unreachable = r"tracking\.tracking_uri: MLflow server http://127\.0\.0\.1:\d+ is unreachable"
    run = "0123456789abcdef0123456789abcdef"
    bad_cfg = t / "bad.yaml"
    bad_cfg.write_text("train:\n  epochs: 2\n  batch_size: [8\nmoco:\n  queue_size: 64\n")
    bad_sweep = t / "bad_sweep.yaml"
    bad_sweep.write_text("search:\n  moco.momentum: {grid: [0.9, 0.99}\n")
    uri = f"sqlite:///{t / 'mlflow.db'}"
    done = _finished_run(uri)
    quick = ["pretrain", "-c", "experiments/quickstart.yaml", f"data.shards={small_shards}", "data.source="]
    where = [f"train.storage_path={t / 'runs'}"]
    return {
        "pretrain_unreachable": ([*quick, *where, f"tracking.tracking_uri={down}"], unreachable),
        "resume_unreachable": (["pretrain", "--resume", run, *where, f"tracking.tracking_uri={down}"], unreachable),
        "eval_unreachable": (["eval", "knn", "--run", run, "--tracking-uri", down], unreachable),
        "export_unreachable": (["export", "--run", run, "--tracking-uri", down, str(t / "out") + "/"], unreachable),
        "config_yaml_syntax": (
            ["pretrain", "-c", str(bad_cfg)],
            rf"{re.escape(str(bad_cfg))}, line \d+, column \d+: YAML syntax error: ",
        ),
        "sweep_yaml_syntax": (
            ["sweep", "-c", str(bad_sweep)],
            rf"{re.escape(str(bad_sweep))}, line 2, column \d+: YAML syntax error: ",
        ),
        "override_yaml_syntax": (
            [*quick, *where, "optim.milestones=[1, 2"],
            r"override 'optim\.milestones=\[1, 2': line 1, column \d+: YAML syntax error: ",
        ),
        "resume_finished": (
            ["pretrain", "--resume", done, *where, f"tracking.tracking_uri={uri}"],
            rf"run {done} already FINISHED; nothing to resume",
        ),
        "gpu_on_local_machine_without_one": (
            [*quick, *where, f"tracking.tracking_uri={uri}", "train.use_gpu=true", "train.num_workers=1",
             "train.batch_size=8", "moco.queue_size=64"],
            r"train\.use_gpu: 1 GPU worker\(s\) asked for but the Ray cluster has 0 GPU\(s\)",
        ),
    }  # fmt: skip


@pytest.fixture(scope="module")
def results(cases, tmp_path_factory) -> dict[str, dict]:
    t = tmp_path_factory.mktemp("failures_cli_run")
    # a local Ray, were one started, counts this machine's GPUs: none, whatever the hardware
    return run_cli_cases({k: {"argv": argv} for k, (argv, _) in cases.items()}, t, CUDA_VISIBLE_DEVICES="")


NAMES = [
    "pretrain_unreachable",
    "resume_unreachable",
    "eval_unreachable",
    "export_unreachable",
    "config_yaml_syntax",
    "sweep_yaml_syntax",
    "override_yaml_syntax",
    "resume_finished",
    "gpu_on_local_machine_without_one",
]


def test_every_case_is_listed(cases):
    assert sorted(cases) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_failure_is_one_line_in_seconds(name, cases, results):
    expect, r = cases[name][1], results[name]
    err = r["stderr"]
    assert r["rc"] == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("moco-ray: error: "), err
    assert re.search(expect, lines[-1]), lines[-1]
    assert r["ray_started"] is False
    # imports done beforehand; the health check's timeout is 5 s, MLflow's own retry loop took minutes
    assert r["seconds"] < 60, f"{name} took {r['seconds']:.1f} s"


def test_export_to_missing_dir_leaves_nothing(cases, results, tmp_path_factory):
    """The failed export (unreachable server) did not create its output directory."""
    out = Path(cases["export_unreachable"][0][-1])
    assert results["export_unreachable"]["rc"] == 2 and not out.exists()
