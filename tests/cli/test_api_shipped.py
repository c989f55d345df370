"""The Python API takes a shipped experiment's name as the CLI does (``pretrain("quickstart")``,
``sweep("sweep_queue_momentum")``), from any directory, and ``resume="last"``. Each call here is refused by a cheap
check before Ray (a value out of range, an unknown name, an experiment with no runs), after the file was found.

Mutation checked by hand: ``experiment_file`` dropped from ``api.pretrain`` ("config file not found: quickstart").
"""

from __future__ import annotations

import pytest

from moco_ray import api


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_pretrain_and_sweep_find_a_shipped_file_by_name():
    with pytest.raises(ValueError, match=r"^train\.epochs: 0 is out of range"):
        api.pretrain("quickstart", train__epochs=0)
    with pytest.raises(ValueError, match=r"^train\.epochs: 0 is out of range"):
        api.pretrain(train__epochs=0)  # the default: the shipped quickstart
    with pytest.raises(ValueError, match=r"^train\.epochs: 0 is out of range"):
        api.sweep("sweep_queue_momentum", overrides={"train.epochs": 0})
    with pytest.raises(FileNotFoundError, match="^config file not found: nope; shipped experiment files: quickstart"):
        api.pretrain("nope")


def test_resume_last_through_the_api(mlflow_uri):
    """The experiment comes from ``config``; with no run there, one line before Ray."""
    cfg = {"tracking": {"experiment": "api-last", "tracking_uri": mlflow_uri}}
    with pytest.raises(ValueError, match="^--resume last: no experiment 'api-last' in sqlite"):
        api.pretrain(cfg, resume="last")
