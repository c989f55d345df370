"""Small TrainState values shared by the checkpoint tests (train) and the resume tests (jobs)."""

from __future__ import annotations

from moco_ray.train.checkpoint import TrainState

EPOCH_0 = {
    "epoch": 0,
    "loss": 1.5,
    "acc1": 0.25,
    "lr": 0.03,
    "epoch_seconds": 2.0,
    "images_per_s": 64.0,
    "corrupt_images": 0.0,
    "data_wait_seconds": 0.5,
    "data_wait_frac": 0.25,
}


def train_state(model: dict, epoch: int, rng: list | None = None, history: list | None = None) -> TrainState:
    return TrainState(model, {}, epoch, 4 * (epoch + 1), rng or [], history or [], {}, "r")
