"""The experiment a run opens is marked as a model-training experiment (the kind the MLflow UI shows it as), read
back from a real sqlite store; a kind the user chose is kept."""

from __future__ import annotations

from moco_ray.tracking.run_log import EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND, create_run
from moco_ray.tracking.store import client


def _run(uri: str, experiment: str = "exp"):
    return create_run(uri, experiment, "r", {"a": 1}, {}, "a: 1\n")


def test_new_experiment_is_a_model_training_experiment(mlflow_uri):
    log = _run(mlflow_uri)
    exp = client(mlflow_uri).get_experiment(log.get().info.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT_KIND == "custom_model_development"


def test_existing_experiment_gets_the_kind_but_a_chosen_kind_is_kept(mlflow_uri):
    c = client(mlflow_uri)
    old = c.create_experiment("old")
    chosen = c.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    _run(mlflow_uri, "old")
    _run(mlflow_uri, "chosen")
    assert c.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT_KIND
    assert c.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"
