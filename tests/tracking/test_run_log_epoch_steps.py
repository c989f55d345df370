"""Per-epoch metrics in MLflow at step = the epoch's number as the console prints it ("epoch 1/4" is step 1), and
the ``epoch`` metric's value that number too, read back from a real sqlite store. What a run already holds is
recognised by the ``epoch`` metric's value in the run's own numbering (its ``moco_ray.epoch_base`` tag), so a run
logged before (no tag: step = value = 0-based epoch) is neither relogged nor misjudged on resume, and keeps one
numbering."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from moco_ray.tracking.history import EpochMetrics
from moco_ray.tracking.run_log import DISCARDED_EPOCHS_TAG, EPOCH_BASE_TAG, RunLog, create_run, epochs_done


def _h(epoch: int, loss: float, knn: float | None = None) -> EpochMetrics:
    return EpochMetrics(epoch=epoch, loss=loss, acc1=0.5, lr=0.1, epoch_seconds=1.0, images_per_s=10.0,
                        corrupt_images=0.0, knn_top1=knn)  # fmt: skip


def _run(uri: str) -> RunLog:
    return create_run(uri, "epoch-steps", "r", {}, {}, None)


def _steps(log: RunLog, key: str) -> list[tuple[int, float]]:
    return sorted(log.metric_history(key))


def test_epoch_metrics_at_the_console_s_epoch_numbers(mlflow_uri):
    """Mutations checked by hand: the step or the ``epoch`` value left 0-based (no ``+ base``) failed the asserts
    on ``epoch`` and ``loss``; ``logged_epochs`` not subtracting the base took the run's epochs for 1-3 and relogged
    the first (the idempotence assert: 1 written, not 0)."""
    log = _run(mlflow_uri)
    history = [_h(0, 5.0), _h(1, 4.0, knn=0.3), _h(2, 3.0)]
    assert log.log_epochs(history) == 3
    assert _steps(log, "loss") == [(1, 5.0), (2, 4.0), (3, 3.0)]
    assert _steps(log, "knn_top1") == [(2, 0.3)]  # printed as "epoch 2/3 ... knn 0.3000"
    assert _steps(log, "epoch") == [(1, 1.0), (2, 2.0), (3, 3.0)]  # one numbering: step = value = console's
    assert epochs_done(log.get()) == 3  # what export and ``--resume last`` read
    assert log.log_epochs(history) == 0  # idempotent (a worker restart sends the same history again)
    assert log.mark_discarded(0, "resume") == [1, 2]
    assert log.get().data.tags[DISCARDED_EPOCHS_TAG] == "epochs 2-3 discarded by resume after epoch 1"


def test_a_run_logged_at_0_based_epochs_keeps_its_numbering(mlflow_uri):
    """A run made before the tag (step = value = 0-based index, no ``moco_ray.epoch_base``) and resumed now.
    Mutations checked by hand: new runs not tagged at creation (``_new_run``) failed the first test's steps
    (0-2); a missing tag read as 1 took this run's 2 epochs for 1 (``epochs_done``)."""
    c = MlflowClient(mlflow_uri)
    run_id = c.create_run(c.create_experiment("before-the-tag")).info.run_id
    log = RunLog(mlflow_uri, run_id)
    log.log_metric_points((k, v, h.epoch) for h in (_h(0, 5.0), _h(1, 4.0)) for k, v in h.as_dict().items())
    assert EPOCH_BASE_TAG not in log.get().data.tags and epochs_done(log.get()) == 2
    assert log.logged_epochs() == {0, 1}
    assert log.log_epochs([_h(0, 5.0), _h(1, 4.0)]) == 0
    assert log.log_epochs([_h(0, 5.0), _h(1, 4.0), _h(2, 3.0)]) == 1
    assert _steps(log, "loss") == [(0, 5.0), (1, 4.0), (2, 3.0)]  # its own numbering: one curve, no gap
    assert _steps(log, "epoch") == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert epochs_done(log.get()) == 3
