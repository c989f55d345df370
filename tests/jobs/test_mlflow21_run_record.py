"""One tiny real pretraining through the CLI: what the console shows and what the MLflow run holds.

Console: the epoch lines and none of Ray's notices that used to surround them. Store (read back): the shard
splits as dataset inputs with the manifest's fingerprint, MLflow's system/* metrics, and step/* metrics at global
steps.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from moco_helpers import TINY_MODEL

from moco_ray.data.manifest import read_manifest
from moco_ray.tracking.datasets import DIGEST_CHARS
from moco_ray.tracking.run_log import EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND
from moco_ray.tracking.store import client

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NOISE = [
    "Token authentication is enabled for this Ray cluster",
    "PreemptionWatcher",
    "RayDeprecationWarning",
    "exclude_resources",
    # not yet: "Progress bars disabled" (Ray Data's SplitCoordinator still says it; see NOISY_LOGGERS)
]
STEPS = 4  # per epoch


def test_tiny_run_console_and_record(small_shards, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    over = {
        **TINY_MODEL, "data.shards": str(small_shards), "data.limit": 64, "data.map_batch_size": 16,
        "train.epochs": 2, "train.batch_size": 16, "train.num_workers": 2, "train.cpus_per_worker": 0.5,
        "train.max_steps_per_epoch": STEPS, "train.storage_path": str(tmp_path / "runs"), "optim.warmup_epochs": 0,
        "moco.queue_size": 64, "eval.knn_every": 0, "tracking.tracking_uri": uri, "tracking.experiment": "t21",
        "tracking.log_every_steps": 2, "tracking.system_metrics_interval": 0.5,
    }  # fmt: skip
    args = ["pretrain", "-c", "experiments/quickstart.yaml", *[f"{k}={v}" for k, v in over.items()]]
    repo = Path(__file__).resolve().parents[2]
    p = subprocess.run(
        [sys.executable, "-m", "moco_ray.cli.main", *args], capture_output=True, text=True, cwd=repo, timeout=600
    )
    console = p.stdout + p.stderr
    assert p.returncode == 0, console[-3000:]
    assert "epoch 1/2  loss" in console and "epoch 2/2  loss" in console
    for noise in NOISE:
        assert noise not in console, f"{noise!r} on the console:\n{console[-3000:]}"

    c = client(uri)
    run = c.search_runs([c.get_experiment_by_name("t21").experiment_id])[0]
    assert c.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT_KIND
    inputs = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    fp = read_manifest(str(small_shards)).fingerprint
    assert [d.digest for d in inputs.values()] == [fp[:DIGEST_CHARS]]
    assert next(iter(inputs)).endswith("/train")
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "step/loss")]
    assert sorted(steps) == [2, 4, 6, 8]  # global steps across the two epochs
    epochs = c.get_metric_history(run.info.run_id, "data_wait_frac")
    assert sorted(m.step for m in epochs) == [0, 1] and all(0 <= m.value <= 1 for m in epochs)
