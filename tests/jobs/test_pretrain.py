"""End to end through the console script: ingest -> Ray Data -> TorchTrainer (2 CPU workers, gloo) -> MLflow
sqlite, read back.

Console: the epoch lines and none of Ray's notices that used to surround them. Store: per-epoch and step_*
metrics at comparable steps, the shard splits as dataset inputs with the manifest's fingerprint, MLflow's
system/* metrics, the model-training experiment kind, and an encoder that loads strictly into torchvision.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from moco_helpers import config_file

from moco_ray.config import load_config
from moco_ray.data.manifest import read_manifest
from moco_ray.tracking.datasets import DIGEST_CHARS
from moco_ray.tracking.run_log import EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND

pytestmark = pytest.mark.ray

NOISE = [
    "Token authentication is enabled for this Ray cluster",
    "PreemptionWatcher",
    "RayDeprecationWarning",
    "exclude_resources",
    "Progress bars disabled",
    "Failed to convert column",  # an empty batch's tensor column pickled (moco_ray.data.stream._block)
    "Creating initial MLflow database tables",
    "Downloading artifacts",
    "Pickle or CloudPickle",
    "Estimated parquet",  # Ray Data's file-list Parquet reader, at INFO each time a stream is built
]

EPOCHS = 8


def _overrides(small_shards, tmp_path, uri, **extra):
    o = {
        "data.shards": str(small_shards),
        "data.map_batch_size": 32,
        "data.limit": 320,
        "model.arch": "resnet18",
        "model.small_stem": False,
        "model.dim": 64,
        "model.hidden_dim": 256,
        "model.head_bn": True,  # leaves the early plateau within dozens of steps (see tests/core/test_moco_learns.py)
        "aug.image_size": 32,
        # Milder views and a faster-following key encoder: the loss falls within 80 steps (measured on CIFAR at
        # 32 px with the core alone: 5.40 -> 4.8 at strength 0.5, m 0.99; the v2 views at m 0.999 stay near
        # log(K+1) = 5.55 for hundreds of steps, too long for a CPU test).
        "aug.strength": 0.5,
        "moco.momentum": 0.99,
        "moco.queue_size": 256,
        "moco.temperature": 0.2,
        "train.epochs": EPOCHS,
        "train.batch_size": 32,
        "train.num_workers": 2,
        "train.cpus_per_worker": 0.5,
        "train.storage_path": str(tmp_path / "runs"),
        "optim.lr": 0.06,
        "optim.lr_reference_batch": 32,
        "eval.knn_k": 20,
        "eval.knn_every": 4,
        "tracking.tracking_uri": uri,
        "tracking.experiment": "test",
        "tracking.log_every_steps": 2,
        "tracking.system_metrics_interval": 0.5,
    }
    o.update(extra)
    return o


def test_pretrain_end_to_end(small_shards, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from moco_ray import load_encoder
    from moco_ray.core.backbone_io import backbone_of
    from moco_ray.train.checkpoint import load_state
    from moco_ray.train.model import build_method

    cfg_file = config_file(_overrides(small_shards, tmp_path, mlflow_uri), tmp_path)
    p = subprocess.run(
        [sys.executable, "-m", "moco_ray.cli.main", "pretrain", "-c", str(cfg_file)],
        capture_output=True, text=True, cwd=_repo(), timeout=900,
    )  # fmt: skip
    console = p.stdout + p.stderr
    assert p.returncode == 0, console[-3000:]
    assert f"epoch 1/{EPOCHS}  loss" in console and f"epoch {EPOCHS}/{EPOCHS}  loss" in console
    for noise in NOISE:
        assert noise not in console, f"{noise!r} on the console:\n{console[-3000:]}"
    run_id = next(ln.split()[-1] for ln in p.stdout.splitlines() if ln.startswith("run id: "))
    c = MlflowClient(mlflow_uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert c.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT_KIND
    assert run.data.params["moco.queue_size"] == "256"
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.tags["world_size"] == "2" and "ray.version" in run.data.tags
    for key in ("loss", "acc1", "lr", "images_per_s", "epoch_seconds", "data_wait_frac"):
        hist = c.get_metric_history(run_id, key)
        # one point per epoch, at step = the epoch number the console prints ("epoch 1/8" is step 1)
        assert sorted(m.step for m in hist) == list(range(1, EPOCHS + 1)), key
    assert all(0 <= m.value <= 1 for m in c.get_metric_history(run_id, "data_wait_frac"))
    steps_per_epoch = 320 // 32  # train.batch_size is the global batch
    # step_* metrics at global steps, every tracking.log_every_steps, across the epochs
    steps = sorted(m.step for m in c.get_metric_history(run_id, "step_loss"))
    assert steps == list(range(2, EPOCHS * steps_per_epoch + 1, 2)), steps
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    inputs = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    fp = read_manifest(str(small_shards)).fingerprint
    assert {d.digest for d in inputs.values()} == {fp[:DIGEST_CHARS]}
    assert sorted(n.rsplit("/", 1)[-1] for n in inputs) == ["test", "train"]  # kNN's queries come from test
    assert sorted(m.step for m in c.get_metric_history(run_id, "knn_top1")) == [4, 8]  # every 4 epochs
    losses = [m.value for m in sorted(c.get_metric_history(run_id, "loss"), key=lambda m: m.step)]
    assert all(0 < v < 20 for v in losses), losses  # finite, and on the InfoNCE scale (log(K+1) = 5.5)
    knn = [m.value for m in c.get_metric_history(run_id, "knn_top1")]
    assert all(0.0 <= v <= 1.0 for v in knn), knn
    # the loss goes down: the last two epochs below the first two (the queue holds 8 steps' keys, so it is full
    # of real keys from the first epoch on). Measured falls: 0.40 on CIFAR; 0.065 and > 0.15 on the digits
    # fallback, whose near-identical 8 px scans make instances harder to tell apart in 80 steps.
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    arts = {a.path for a in c.list_artifacts(run_id)}
    assert {"config.yaml", "encoder", "plots"} <= arts
    assert [a.path for a in c.list_artifacts(run_id, "plots")] == ["plots/training_curves.png"]

    # the encoder loads strictly into torchvision and gives the platform's features
    net = load_encoder(run_id, tracking_uri=mlflow_uri)
    cfg = load_config(None, _overrides(small_shards, tmp_path, mlflow_uri))
    model = build_method(cfg)
    model.load_state_dict(load_state(run.data.tags["moco_ray.checkpoint"]).model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = backbone_of(model).eval()(x)
        torch.testing.assert_close(net(x), ref)
        # and through mlflow.pytorch
        import mlflow.pytorch

        mlflow.set_tracking_uri(mlflow_uri)
        via_mlflow = mlflow.pytorch.load_model(run.data.tags["moco_ray.encoder_model_uri"]).eval()
        torch.testing.assert_close(via_mlflow(x), ref)


def test_bad_config_rejected_before_ray_starts(tmp_path):
    """The CLI fails with one line, and no Ray instance was started for it."""
    code = (
        "import sys, ray; from moco_ray.cli.main import main; "
        "rc = main(['pretrain', '-c', 'experiments/quickstart.yaml', 'moco.momentum=1.5']); "
        "assert not ray.is_initialized(); sys.exit(rc)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(_repo()))
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("moco-ray: error: moco.momentum: 1.5 is out of range")
    assert "Traceback" not in p.stderr


def _repo():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]
