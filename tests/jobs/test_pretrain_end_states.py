"""The end state ``jobs.pretrain._fit`` gives a run when ``trainer.fit()`` does not return, read back from a real
sqlite MLflow store: Tune stopping a trial (Ray's ``sys.exit(0)`` in the trial's report path) is KILLED, a crash
FAILED.

Mutation checked by hand: without the clean-exit branch a stopped trial's run ended FAILED (the sweep's
reconcile sets KILLED too, and whichever wrote last won: a flaky ASHA test).
"""

from __future__ import annotations

import pytest

from moco_ray.jobs.pretrain import _fit
from moco_ray.tracking.run_log import create_run


class _Trainer:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def fit(self):
        raise self.error


@pytest.mark.parametrize(
    ("error", "status"),
    [(SystemExit(0), "KILLED"), (SystemExit(None), "KILLED"), (SystemExit(1), "FAILED"), (RuntimeError("x"), "FAILED")],
)
def test_a_run_ends_killed_when_stopped_and_failed_when_crashed(mlflow_uri, error, status):
    log = create_run(mlflow_uri, "end-states", "r", {}, {}, "")
    with pytest.raises(type(error)):
        _fit(_Trainer(error), log)
    assert log.get().info.status == status
