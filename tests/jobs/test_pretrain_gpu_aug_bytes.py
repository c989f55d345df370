"""aug.device=gpu end to end on CPU: the stream ships encoded bytes, Worker.views decodes them on the worker's
device (the CPU here: the same code path as nvJPEG on CUDA, with the CPU decoder) and draws the views there."""

from __future__ import annotations

import math

import pytest
from moco_helpers import TINY_MODEL

pytestmark = pytest.mark.ray


def test_pretrain_with_gpu_aug_decodes_bytes_in_the_worker(ray_local, small_shards, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from moco_ray.jobs.pretrain import run_pretraining

    over = {
        **TINY_MODEL,
        "data.shards": str(small_shards),
        "data.limit": 64,
        "aug.device": "gpu",
        "moco.queue_size": 32,
        "train.batch_size": 16,
        "train.epochs": 1,
        "train.max_steps_per_epoch": 2,
        "train.num_workers": 1,
        "train.cpus_per_worker": 1,
        "train.storage_path": str(tmp_path / "runs"),
        "eval.knn_every": 0,
        "tracking.tracking_uri": mlflow_uri,
        "tracking.experiment": "gpu-aug-bytes",
    }
    res = run_pretraining(None, over)
    h = res.history[-1]
    assert math.isfinite(h.loss) and 0 < h.loss < 20 and h.corrupt_images == 0
    run = MlflowClient(mlflow_uri).get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.data.params["aug.device"] == "gpu"
