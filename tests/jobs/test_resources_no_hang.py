"""Issue 22's configurations on a real 2-CPU local Ray, through the CLI in a subprocess: each either runs or
fails fast with the one-line reason, never waits (they used to hang with no output)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from moco_helpers import TINY_MODEL, config_file

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
BOUND_S = 120  # far below a hang; the check itself takes seconds after ray.init

_RUNNER = r"""
import sys
import ray
from moco_ray.cli.main import main
ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
         configure_logging=False)
sys.exit(main(sys.argv[1:]))
"""


def _tiny_yaml(tmp_path: Path, shards: Path, uri: str) -> Path:
    return config_file(
        {
            **TINY_MODEL,
            "moco.queue_size": 128,
            "data.shards": str(shards),
            "data.limit": 64,
            "data.map_batch_size": 32,
            "train.epochs": 1,
            "train.batch_size": 32,
            "train.num_workers": 1,
            "train.storage_path": str(tmp_path / "runs"),
            "eval.knn_every": 0,
            "tracking.tracking_uri": uri,
        },
        tmp_path,
    )


def _run(argv: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-c", _RUNNER, *argv], cwd=REPO, capture_output=True, text=True, timeout=BOUND_S + 60
    )
    return p, time.monotonic() - t0


def test_issue_configurations_fail_fast_with_the_reason(small_shards, tmp_path, mlflow_uri):
    base = _tiny_yaml(tmp_path, small_shards, mlflow_uri)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "base": str(base),
                "search": {"moco.momentum": {"grid": [0.9, 0.99]}},
                "sweep": {"metric": "loss", "mode": "min", "scheduler": "fifo", "verbose": 0},
            }
        )
    )
    p, took = _run(["sweep", "-c", str(sweep), "train.num_workers=1", "train.cpus_per_worker=1"])
    assert took < BOUND_S and p.returncode == 2, p.stderr[-3000:]
    line = [x for x in p.stderr.splitlines() if x.startswith("moco-ray: error:")]
    assert line and "a trial needs 1 worker x (1 CPU) + 1 CPU for the data stream" in line[0], p.stderr[-3000:]
    assert "train.cpus_per_worker to 0.99" in line[0]
    p, took = _run(["pretrain", "-c", str(base), "train.cpus_per_worker=2"])
    assert took < BOUND_S and p.returncode == 2, p.stderr[-3000:]
    assert "moco-ray: error: train.cpus_per_worker: the run needs 1 worker x (2 CPU)" in p.stderr
    assert "train.cpus_per_worker to 1" in p.stderr
