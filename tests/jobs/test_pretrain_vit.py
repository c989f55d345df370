"""A MoCo v3 ViT run end to end on the real path: Ray Data stream -> TorchTrainer (2 gloo CPU workers, SyncBN on the
heads, AdamW, stop-grad patch projection) -> kNN monitor -> MLflow sqlite, read back -> kNN and lincls evaluations.

The ViT is tiny (16 px, patch 4, width 32, depth 1, 2 heads: the recipe's code at a CPU size). The MLflow encoder
artifact is loaded strictly into timm's own ``VisionTransformer`` built from what encoder.json says, with no
moco-ray code in between.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

pytestmark = pytest.mark.ray

SIZE = 16


@pytest.fixture(scope="module")
def vit_run(ray_local, small_shards, _empty_store, tmp_path_factory):
    """One epoch of the ViT recipe at a tiny size; returns (result, tracking uri, downloaded encoder/ dir)."""
    import mlflow.artifacts

    from moco_ray.jobs.pretrain import run_pretraining

    base = tmp_path_factory.mktemp("vit_run")
    shutil.copyfile(_empty_store, base / "mlflow.db")  # a migrated empty store (see conftest's mlflow_uri)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    over = {
        "moco.method": "moco_v3",  # its preset, then the ViT recipe's keys at a tiny size
        "moco.temperature": 0.2,
        "model.arch": "vit_small",
        "model.patch_size": 4,
        "model.vit_width": 32,
        "model.vit_depth": 1,
        "model.vit_heads": 2,
        "model.stop_grad_conv1": True,
        "model.proj_layers": 3,
        "model.dim": 16,
        "model.hidden_dim": 64,
        "model.pred_hidden_dim": 64,
        "aug.image_size": SIZE,
        "optim.optimizer": "adamw",
        "optim.lr": 1.5e-4,
        "optim.weight_decay": 0.1,
        "optim.warmup_epochs": 0,
        "data.shards": str(small_shards),
        "data.limit": 64,
        "data.map_batch_size": 32,
        "train.epochs": 1,
        "train.batch_size": 16,
        "train.num_workers": 2,
        "train.cpus_per_worker": 0.5,
        "train.precision": "fp32",
        "train.storage_path": str(base / "runs"),
        "eval.knn_every": 1,
        "eval.knn_k": 5,
        "eval.knn_max_bank": 64,
        "eval.knn_max_queries": 32,
        "tracking.tracking_uri": uri,
        "tracking.experiment": "vit",
        "tracking.system_metrics_interval": 0,
    }
    res = run_pretraining(None, over)
    enc_dir = mlflow.artifacts.download_artifacts(
        run_id=res.run_id, artifact_path="encoder", dst_path=str(base / "dl"), tracking_uri=uri
    )
    return res, uri, enc_dir


def test_vit_run_logs_an_encoder_that_plain_timm_loads_strictly(vit_run):
    """Mutation checked: encoder.json's ``timm_kwargs`` naming the arch's 224 px instead of the run's image size
    fails the strict load here (pos_embed [1, 17, 32] vs [1, 197, 32])."""
    res, _, enc_dir = vit_run
    info = json.loads((Path(enc_dir) / "encoder.json").read_text())
    assert info["arch"] == "vit_small" and info["feature_dim"] == 32 and info["format"] == "timm-state-dict"
    state = torch.load(Path(enc_dir) / "encoder.pt", map_location="cpu", weights_only=True)
    net = VisionTransformer(**info["timm_kwargs"]).eval()  # timm alone, from the JSON
    net.load_state_dict(state, strict=True)
    assert net(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, 32)
    assert 0.0 <= res.metrics["knn_top1"] <= 1.0 and res.metrics["loss"] > 0


def test_vit_run_evaluates_and_loads_through_the_api(vit_run):
    from moco_ray import evaluate_knn, evaluate_linear, load_encoder

    res, uri, enc_dir = vit_run
    net = load_encoder(res.run_id, tracking_uri=uri)
    assert isinstance(net, VisionTransformer)
    state = torch.load(f"{enc_dir}/encoder.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    out = evaluate_knn(res.run_id, tracking_uri=uri, k=5, limit=64)
    assert out["image_size"] == SIZE and 0.0 <= out["top1"] <= 1.0
    with pytest.raises(ValueError, match="takes 16 px images only"):
        evaluate_knn(res.run_id, tracking_uri=uri, image_size=32)
    lin = evaluate_linear(res.run_id, tracking_uri=uri, protocol="lincls", epochs=1, limit=32)
    assert lin["settings"]["lr"] == 3.0 and lin["settings"]["batch_size"] == 1024  # moco-v3's ViT lincls
    assert lin["image_size"] == SIZE and 0.0 <= lin["top1"] <= 1.0
