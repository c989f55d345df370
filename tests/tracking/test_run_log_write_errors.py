"""A run whose artifact location cannot be written after the pre-Ray check passed (the disk filled, the mount
went read-only): one line naming the location and the errno, and the run FAILED, not left RUNNING."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from moco_ray.tracking.run_log import create_run


def test_an_unwritable_artifact_location_fails_the_run_in_one_line(mlflow_uri, tmp_path):
    """Mutations caught: `RunLog.log_artifact` without its OSError branch (the raw NotADirectoryError); `_new_run`
    without its FAILED on error (the run stays RUNNING)."""
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    MlflowClient(mlflow_uri).create_experiment("blocked", artifact_location=str(blocker / "artifacts"))
    with pytest.raises(ValueError) as e:
        create_run(mlflow_uri, "blocked", "r", {"a": 1}, {}, "config: 1\n")
    msg = str(e.value)
    assert "\n" not in msg and "cannot write its artifacts at" in msg and "errno ENOTDIR" in msg, msg
    c = MlflowClient(mlflow_uri)
    (run,) = c.search_runs([c.get_experiment_by_name("blocked").experiment_id])
    assert run.info.status == "FAILED"
