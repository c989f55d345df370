"""`moco-ray eval linear --protocol-preset lincls`: the official main_lincls protocol on a run's encoder, logged as
a child run with the best and the last epoch (in-process, no Ray: the images are decoded at their own sizes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient
from moco_helpers import log_like_trainer

from moco_ray.config import load_config
from moco_ray.core.encoders import torchvision_backbone

REPO = Path(__file__).resolve().parents[2]


def test_lincls_protocol_through_the_cli(small_shards, mlflow_uri, tmp_path):
    cfg = load_config(None, {"model.small_stem": True, "aug.image_size": 16, "data.shards": str(small_shards)})
    torch.manual_seed(0)
    rid = log_like_trainer(mlflow_uri, cfg, torchvision_backbone("resnet18", True), "lincls-src")
    cmd = [sys.executable, "-m", "moco_ray.cli.main", "eval", "linear", "--run", rid, "--tracking-uri", mlflow_uri,
           "--protocol-preset", "lincls", "--epochs", "3", "--image-size", "16", "--limit", "60"]  # fmt: skip
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "protocol lincls, 3 epochs" in p.stdout and "best" in p.stdout, p.stdout
    c = MlflowClient(mlflow_uri)
    (child,) = c.search_runs([c.get_run(rid).info.experiment_id], f"tags.`mlflow.parentRunId` = '{rid}'")
    params, metrics = child.data.params, child.data.metrics
    assert params["linear_preset"] == "lincls" and params["linear_lr"] == "30.0"
    assert params["linear_milestones"] == "(2, 2)"  # 60/80 of 100 epochs, scaled to 3
    assert params["train_rows"] == "60" and params["test_rows"] == "60"
    assert 0.0 <= metrics["linear_top1"] <= metrics["linear_best_top1"] <= 1.0
    assert 1 <= metrics["linear_best_epoch"] <= 3  # epochs numbered as the console prints them
    assert [m.step for m in c.get_metric_history(child.info.run_id, "probe_test_top1")] == [1, 2, 3]
