"""Per-epoch metrics in MLflow at step = the epoch's number as the console prints it ("epoch 1/4" is step 1),
read back from a real sqlite store; what a run already holds is recognised by the ``epoch`` metric's value, so a
run logged before (step = 0-based epoch) is neither relogged nor misjudged on resume."""

from __future__ import annotations

from moco_ray.tracking.history import EpochMetrics
from moco_ray.tracking.run_log import DISCARDED_EPOCHS_TAG, RunLog, create_run


def _h(epoch: int, loss: float, knn: float | None = None) -> EpochMetrics:
    return EpochMetrics(epoch=epoch, loss=loss, acc1=0.5, lr=0.1, epoch_seconds=1.0, images_per_s=10.0,
                        corrupt_images=0.0, knn_top1=knn)  # fmt: skip


def _run(uri: str) -> RunLog:
    return create_run(uri, "epoch-steps", "r", {}, {}, None)


def _steps(log: RunLog, key: str) -> list[tuple[int, float]]:
    return sorted(log.metric_history(key))


def test_epoch_metrics_at_the_console_s_epoch_numbers(mlflow_uri):
    """Mutation checked by hand: ``epoch_step`` returning ``epoch`` (the old 0-based step) failed the first
    assert with steps [0, 1, 2]."""
    log = _run(mlflow_uri)
    history = [_h(0, 5.0), _h(1, 4.0, knn=0.3), _h(2, 3.0)]
    assert log.log_epochs(history) == 3
    assert _steps(log, "loss") == [(1, 5.0), (2, 4.0), (3, 3.0)]
    assert _steps(log, "knn_top1") == [(2, 0.3)]  # printed as "epoch 2/3 ... knn 0.3000"
    assert _steps(log, "epoch") == [(1, 0.0), (2, 1.0), (3, 2.0)]  # the value: the 0-based index runs/export read
    assert log.log_epochs(history) == 0  # idempotent (a worker restart sends the same history again)
    assert log.mark_discarded(0, "resume") == [1, 2]
    assert log.get().data.tags[DISCARDED_EPOCHS_TAG] == "epochs 2-3 discarded by resume after epoch 1"


def test_a_run_logged_at_0_based_steps_is_not_relogged(mlflow_uri):
    """Mutation checked by hand: ``logged_epochs`` reading the steps (as ``logged_steps("epoch")`` did) took the
    old run's step 0 for none and relogged epoch 0 (returned 1, not 0)."""
    log = _run(mlflow_uri)
    log.log_metric_points((k, v, h.epoch) for h in (_h(0, 5.0), _h(1, 4.0)) for k, v in h.as_dict().items())
    assert log.logged_epochs() == {0, 1}
    assert log.log_epochs([_h(0, 5.0), _h(1, 4.0)]) == 0
    assert log.log_epochs([_h(0, 5.0), _h(1, 4.0), _h(2, 3.0)]) == 1
    assert _steps(log, "loss") == [(0, 5.0), (1, 4.0), (3, 3.0)]  # the old points stay where they were
