"""MLflow UI expectations, read back from a real sqlite store: the experiment kind and the dataset inputs."""

from __future__ import annotations

import json

from moco_ray.data.manifest import Manifest, ShardInfo
from moco_ray.tracking.datasets import DIGEST_CHARS, EVALUATION, TRAINING
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


def test_shard_splits_are_the_runs_dataset_inputs(mlflow_uri, tmp_path):
    fp = "ab" * 32
    m = Manifest(
        source="digits", classes=["0", "1"], counts={"train": 10, "test": 4}, class_counts={},
        shards=[ShardInfo("train/part-00000.parquet", "train", 10, 100, "x")], fingerprint=fp,
        root=str(tmp_path / "digits-shards"),
    )  # fmt: skip
    log = _run(mlflow_uri)
    log.log_dataset_inputs(m, {"train": TRAINING, "test": EVALUATION})
    inputs = log.get().inputs.dataset_inputs
    got = {i.dataset.name: i for i in inputs}
    assert set(got) == {"digits-shards/train", "digits-shards/test"}
    tr = got["digits-shards/train"]
    assert tr.dataset.digest == fp[:DIGEST_CHARS]
    assert json.loads(tr.dataset.source) == {"uri": f"{tmp_path}/digits-shards/train"}
    profile = json.loads(tr.dataset.profile)
    assert profile["num_rows"] == 10 and profile["splits"] == {"train": 10, "test": 4}
    assert profile["fingerprint"] == fp
    assert {t.key: t.value for t in tr.tags}["mlflow.data.context"] == "training"
    assert {t.key: t.value for t in got["digits-shards/test"].tags}["mlflow.data.context"] == "evaluation"
