"""Model Registry versions and mlflow.pytorch models go through the run's own store: MLflow's process-global
tracking URI (and ``$MLFLOW_TRACKING_URI``, which setting it overwrites) are as they were afterwards.

Mutations checked (put back by hand, the test failed): ``mlflow.set_tracking_uri(self.uri)`` at the start of
``RunLog.register_model``; ``_fluent_run`` without putting the URI back.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from moco_ray.tracking.run_log import create_run


@pytest.fixture
def global_uri(monkeypatch):
    """MLflow's global tracking URI and the environment variable, put back after the test whatever it sets."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return utils


def test_registering_leaves_the_global_tracking_uri_alone(mlflow_uri, tmp_path, global_uri):
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    log = create_run(mlflow_uri, "registry", "r", {}, {}, None)
    model_uri = log.log_pytorch_model(torch.nn.Linear(2, 2))  # nothing set globally: nothing set after
    assert global_uri._tracking_uri is None and "MLFLOW_TRACKING_URI" not in os.environ
    assert log.register_model(model_uri, "enc", {"moco_ray.run_id": log.run_id}) == "1"
    assert global_uri._tracking_uri is None and "MLFLOW_TRACKING_URI" not in os.environ

    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"  # a user's own store, e.g. in a notebook
    mlflow.set_tracking_uri(elsewhere)
    assert log.register_model(log.log_pytorch_model(torch.nn.Linear(2, 2)), "enc", {}) == "2"
    assert mlflow.get_tracking_uri() == elsewhere and os.environ["MLFLOW_TRACKING_URI"] == elsewhere
    assert not (tmp_path / "elsewhere.db").exists()  # nothing was written there either

    c = MlflowClient(mlflow_uri)
    versions = {str(v.version): v for v in c.search_model_versions("name='enc'")}
    assert {v.run_id for v in versions.values()} == {log.run_id}
    assert versions["1"].tags == {"moco_ray.run_id": log.run_id}
    model_id = model_uri.removeprefix("models:/")
    assert json.loads(c.get_logged_model(model_id).tags[MLFLOW_MODEL_VERSIONS]) == [{"name": "enc", "version": "1"}]
