"""Shard splits as a run's MLflow dataset inputs (name, digest, source, profile, context), read back from a real
sqlite store, including two runs linking the same dataset at once."""

from __future__ import annotations

import json

from moco_ray.data.manifest import Manifest, ShardInfo
from moco_ray.tracking.datasets import DIGEST_CHARS, EVALUATION, TRAINING
from moco_ray.tracking.run_log import create_run
from moco_ray.tracking.store import client


def _run(uri: str, experiment: str = "exp"):
    return create_run(uri, experiment, "r", {"a": 1}, {}, "a: 1\n")


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


def test_two_runs_logging_the_same_shards_at_once_both_get_them(mlflow_uri, tmp_path):
    """MLflow's get-or-create of a dataset row races between processes (sweep trials starting together): the loser
    got "UNIQUE constraint failed: datasets..." from the server and the trial failed. The loser's call is replayed
    here as the server answered it; the retry links the row the winner created."""
    import pytest
    from mlflow.exceptions import MlflowException

    from moco_ray.tracking.datasets import log_split_inputs

    m = Manifest(
        source="s", classes=["a", "b"], counts={"train": 4, "test": 2}, class_counts={},
        shards=[ShardInfo("train/s.parquet", "train", 4, 10, "x")], fingerprint="f" * 64, root=str(tmp_path / "shards"),
    )  # fmt: skip
    real = client(mlflow_uri)
    winner, loser = _run(mlflow_uri).run_id, _run(mlflow_uri).run_id
    log_split_inputs(real, winner, m, {"train": TRAINING})

    class RacingClient:
        def __init__(self, error: str) -> None:
            self.calls, self.error = 0, error

        def log_inputs(self, run_id, datasets):
            self.calls += 1
            if self.calls == 1:
                raise MlflowException(self.error)
            real.log_inputs(run_id, datasets=datasets)

    racing = RacingClient("BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")
    log_split_inputs(racing, loser, m, {"train": TRAINING})
    assert racing.calls == 2
    names = [d.dataset.name for d in real.get_run(loser).inputs.dataset_inputs]
    assert names == [d.dataset.name for d in real.get_run(winner).inputs.dataset_inputs] == ["shards/train"]
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):  # any other error is not retried
        log_split_inputs(RacingClient("RESOURCE_DOES_NOT_EXIST: run"), loser, m, {"train": TRAINING})
