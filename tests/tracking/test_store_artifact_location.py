"""`check_artifact_location` (#33): the MLflow artifact location of a local store is checked before Ray starts, so a
run is never created and then left RUNNING because its config.yaml could not be written. Real sqlite stores read
back, a real regular file in the way, a real read-only tmpfs (EROFS even for root; skipped where mounting is not
allowed).

Mutation checked by hand: `check_artifact_location` returning at once: every test that expects a refusal fails
("DID NOT RAISE"). The check reads the store with sqlite3 read-only: done through ``MlflowClient`` instead, the
not-yet-created store of `test_a_missing_store_is_not_created` appears (mutation checked too).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from moco_helpers import remount_read_only, tmpfs

from moco_ray.tracking.store import artifact_location, check_artifact_location


@pytest.fixture
def read_only_dir(tmp_path) -> Iterator[Path]:
    """A real read-only tmpfs (root cannot write it either)."""
    with tmpfs(tmp_path / "ro", "64k") as path:
        remount_read_only(path)
        yield path


def _experiment(uri: str, name: str, location: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).create_experiment(name, artifact_location=location)


def test_existing_experiment_under_a_regular_file(mlflow_uri, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _experiment(mlflow_uri, "blocked", str(afile / "artifacts"))
    with pytest.raises(ValueError) as e:
        check_artifact_location(mlflow_uri, "blocked")
    assert str(e.value) == (
        f"tracking.experiment 'blocked': cannot write the MLflow artifact location {afile}/artifacts "
        f"({afile} is not a directory)"
    )
    check_artifact_location(mlflow_uri, "another")  # a new experiment goes to ./mlruns: writable here


def test_existing_experiment_on_a_read_only_mount_as_a_file_uri(mlflow_uri, read_only_dir):
    _experiment(mlflow_uri, "ro", f"file://{read_only_dir}/arts")
    with pytest.raises(ValueError) as e:
        check_artifact_location(mlflow_uri, "ro")
    assert str(e.value) == (
        f"tracking.experiment 'ro': cannot write the MLflow artifact location {read_only_dir}/arts "
        "(Read-only file system, errno EROFS)"
    )


def test_new_experiment_goes_to_mlruns_of_the_cwd(mlflow_uri, read_only_dir, monkeypatch):
    """MLflow puts a new experiment's artifacts in ./mlruns of the process that creates it: the driver."""
    monkeypatch.chdir(read_only_dir)
    assert artifact_location(mlflow_uri, "new") == f"{read_only_dir}/mlruns"
    with pytest.raises(ValueError, match=r"mlruns \(Read-only file system, errno EROFS\)$"):
        check_artifact_location(mlflow_uri, "new")


def test_a_missing_store_is_not_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    check_artifact_location(uri, "moco-ray")
    assert artifact_location(uri, "moco-ray") == f"{tmp_path}/mlruns"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no lock, no mlruns


def test_what_cannot_be_checked_locally_is_left_alone(mlflow_uri, tmp_path):
    _experiment(mlflow_uri, "s3", "s3://bucket/prefix")
    check_artifact_location(mlflow_uri, "s3")  # object storage: not checkable here
    assert artifact_location("http://127.0.0.1:5000", "x") is None  # a server knows its own artifact root
    junk = tmp_path / "junk.db"
    junk.write_text("not a database")
    assert artifact_location(f"sqlite:///{junk}", "x") is None  # ensure_store reports this one
