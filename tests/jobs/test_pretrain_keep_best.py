"""``train.keep_best`` through a real pretraining (local Ray, one CPU worker, MLflow sqlite read back): the run dir
keeps the latest checkpoint and the best by the metric, the run's tags name the best, ``encoder/`` holds the best
checkpoint's backbone, and a resume would still continue from the latest.

The selection itself is tested on checkpoint directories in tests/train/test_keep_best.py; here a large learning
rate makes the loss rise after the first step, so the best (epoch 0, the lowest loss) is not the latest.
Mutations checked by hand (each failed here): ``_encoder_state`` returning the last state (the encoder was the
last epoch's); Ray's ``num_to_keep`` left at ``keep_checkpoints`` with keep_best (Ray deleted the best).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from moco_helpers import TINY_MODEL

from moco_ray.config import from_dict as config_from_dict
from moco_ray.core.backbone_io import backbone_of, torchvision_state_dict
from moco_ray.jobs.resolve import latest_checkpoint
from moco_ray.jobs.resume import RUN_DIR_TAG
from moco_ray.train.checkpoint import load_state
from moco_ray.train.keep_best import BEST_CHECKPOINT_TAG, BEST_EPOCH_TAG, BEST_METRIC_TAG, BEST_VALUE_TAG
from moco_ray.train.model import build_method

pytestmark = pytest.mark.ray

EPOCHS = 4


def test_keep_best_keeps_tags_and_logs_the_best_checkpoints_encoder(ray_local, small_shards, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from moco_ray import load_encoder, pretrain

    res = pretrain(
        None,
        overrides={
            "data.shards": str(small_shards), "data.limit": 64, "data.map_batch_size": 32, **TINY_MODEL,
            "moco.queue_size": 64, "train.epochs": EPOCHS, "train.batch_size": 32, "train.max_steps_per_epoch": 1,
            "train.num_workers": 1, "train.keep_checkpoints": 1, "train.keep_best": "loss",
            "train.storage_path": str(tmp_path / "runs"), "optim.lr": 30.0, "optim.lr_reference_batch": 32,
            "eval.knn_every": 0, "tracking.tracking_uri": mlflow_uri, "tracking.experiment": "test-keep-best",
        },
    )  # fmt: skip
    losses = {h.epoch: h.loss for h in res.history}
    best_epoch = min((e for e, v in losses.items() if math.isfinite(v)), key=lambda e: (losses[e], e))
    assert best_epoch != EPOCHS - 1, losses  # the premise: the best is not the latest

    tags = MlflowClient(mlflow_uri).get_run(res.run_id).data.tags
    assert (tags[BEST_EPOCH_TAG], tags[BEST_METRIC_TAG]) == (str(best_epoch + 1), "loss")  # the console's number
    assert float(tags[BEST_VALUE_TAG]) == pytest.approx(losses[best_epoch], rel=1e-5)
    assert tags["moco_ray.encoder_epoch"] == str(best_epoch + 1)
    best = load_state(tags[BEST_CHECKPOINT_TAG])
    assert best.epoch == best_epoch

    run_dir = Path(tags[RUN_DIR_TAG])
    kept = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert sorted(map(str, kept)) == sorted([tags[BEST_CHECKPOINT_TAG], res.checkpoint_path])  # latest 1 + best
    assert latest_checkpoint(str(run_dir)) == res.checkpoint_path  # a resume continues from the latest
    assert load_state(res.checkpoint_path).epoch == EPOCHS - 1

    model = build_method(config_from_dict(best.config))
    model.load_state_dict(best.model)
    expected = torchvision_state_dict(backbone_of(model))
    got = load_encoder(res.run_id, tracking_uri=mlflow_uri).state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())  # encoder/ is the best checkpoint's
