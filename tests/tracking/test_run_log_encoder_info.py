"""The exported encoder's metadata records the normalisation its inputs were trained with (data.mean / data.std)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moco_ray.config import load_config
from moco_ray.core.encoders import torchvision_backbone
from moco_ray.tracking.run_log import ENCODER_DIR, ENCODER_INFO, create_run

CIFAR = Path(__file__).resolve().parents[2] / "experiments" / "cifar10_mocov2_r18.yaml"


def test_encoder_json_carries_the_runs_mean_and_std(mlflow_uri, tmp_path):
    cfg = load_config(CIFAR)
    log = create_run(mlflow_uri, "stats", "cifar", cfg.flat(), {}, cfg.to_yaml())
    log.log_encoder(torchvision_backbone("resnet18", small_stem=True), "resnet18", True)  # stats from config.yaml
    info = json.loads((log.download(ENCODER_DIR, tmp_path) / ENCODER_INFO).read_text())
    assert info["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert info["std"] == pytest.approx([0.2023, 0.1994, 0.2010])
    enc = log.encoder()
    assert enc.mean == pytest.approx((0.4914, 0.4822, 0.4465)) and enc.std == pytest.approx((0.2023, 0.1994, 0.2010))
    assert log.get().data.params["eval.knn_features"] == "query"  # the monitor's choice is a run param
