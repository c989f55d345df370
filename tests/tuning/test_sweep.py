"""Sweeps: real local Ray Tune + TorchTrainer trials, MLflow sqlite parent/child runs read back."""

from __future__ import annotations

import pandas as pd
import pytest
from moco_helpers import tiny_sweep

from moco_ray.tuning.space import load_sweep

pytestmark = pytest.mark.ray


def _tiny(small_shards, tmp_path, uri: str, search: dict | None = None, **sections: dict) -> dict:
    """moco_helpers.tiny_sweep in the experiment "sweep-test"."""
    return tiny_sweep(small_shards, tmp_path, uri, "sweep-test", search or {}, **sections)


def _children(uri, parent_id):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_run(parent_id).info.experiment_id
    return c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_grid_asha_parent_child_runs(ray_local, small_shards, tmp_path, mlflow_uri):
    """2x2 grid over K and the lr; ASHA on the reported lr stops the low-lr trials after one epoch.

    The reported lr depends only on the config, so ASHA's decision is known in advance: Tune's grid puts
    optim.lr (sorted after moco.queue_size) in the outer loop, so both high-lr trials start first and set the
    bar at the first rung that both low-lr trials then miss.
    """
    from mlflow.tracking import MlflowClient

    from moco_ray import sweep

    spec = _tiny(
        small_shards,
        tmp_path,
        mlflow_uri,
        search={"moco.queue_size": {"grid": [128, 256]}, "optim.lr": {"grid": [0.06, 0.0006]}},
        sweep={
            "name": "k_lr",
            "metric": "lr",
            "mode": "max",
            "scheduler": "asha",
            "grace_period": 1,
            "reduction_factor": 2,
            "max_concurrent_trials": 2,
            "verbose": 0,
        },
    )
    res = sweep(spec)
    c = MlflowClient(mlflow_uri)

    parent = c.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["moco_ray.sweep"] == "true"
    assert parent.data.params["sweep.metric"] == "lr" and parent.data.params["moco.temperature"] == "0.2"
    assert parent.data.params["search.moco.queue_size"] == "grid[128, 256]"

    t = res.table
    assert len(t) == 4 and set(t["param:moco.queue_size"]) == {128, 256}
    kids = {r.info.run_id: r for r in _children(mlflow_uri, res.parent_run_id)}
    assert set(kids) == set(t["run_id"])  # one child run per trial, found by the table's run ids
    for row in t.to_dict("records"):
        run = kids[row["run_id"]]
        assert run.data.tags["moco_ray.trial_id"] == row["trial_id"]
        assert run.data.params["moco.queue_size"] == str(row["param:moco.queue_size"])
        assert run.data.params["optim.lr"] == str(row["param:optim.lr"])
        expect = {"finished": "FINISHED", "stopped_early": "KILLED"}[row["state"]]
        assert run.info.status == expect and run.data.tags["moco_ray.trial_state"] == row["state"]
    low, high = t[t["param:optim.lr"] < 0.01], t[t["param:optim.lr"] > 0.01]
    assert (low["state"] == "stopped_early").all() and (low["epochs_done"] == 1).all()
    assert (high["state"] == "finished").all() and (high["epochs_done"] == 2).all()
    assert res.best["run_id"] in set(high["run_id"]) and res.best["params"]["optim.lr"] == 0.06
    assert parent.data.tags["best_run_id"] == res.best["run_id"]
    assert parent.data.metrics["best_lr"] == pytest.approx(res.best["value"])

    arts = {a.path for a in c.list_artifacts(res.parent_run_id)}
    assert {"sweep_results.csv", "config.yaml", "sweep.yaml", "plots"} <= arts
    plots = {a.path for a in c.list_artifacts(res.parent_run_id, "plots")}
    assert plots == {
        f"plots/{p}.png" for p in ("lr_vs_moco.queue_size", "lr_vs_optim.lr", "lr_heatmap", "learning_curves")
    }
    import mlflow.artifacts

    csv = mlflow.artifacts.download_artifacts(
        run_id=res.parent_run_id,
        artifact_path="sweep_results.csv",
        dst_path=str(tmp_path / "dl"),
        tracking_uri=mlflow_uri,
    )
    back = pd.read_csv(csv)
    assert list(back["trial_id"]) == list(t["trial_id"]) and list(back["state"]) == list(t["state"])


def test_bad_search_values_rejected_before_ray(tmp_path, small_shards):
    import ray

    base = _tiny(small_shards, tmp_path, f"sqlite:///{tmp_path / 'm.db'}", sweep={"scheduler": "asha"})
    was_up = ray.is_initialized()
    cases = {
        "moco.queue_size: 16 is out of range": {"moco.queue_size": {"grid": [128, 16]}},  # K < batch 32
        "unknown config field": {"moco.queue": {"grid": [128]}},
        "loguniform expects lo > 0": {"optim.lr": {"loguniform": [0, 1]}},
        "expected one of": {"moco.momentum": [0.9, 0.99]},
        "set by the sweep itself": {"tracking.experiment": {"choice": ["a"]}},
    }
    for msg, search in cases.items():
        with pytest.raises(ValueError, match=msg) as e:
            load_sweep({**base, "search": search})
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="sweep.metric"):
        load_sweep({**base, "search": {}}, ["sweep.metric=top5"])
    with pytest.raises(ValueError, match=r"sweep.grace_period.*<= 1 .*or sweep\.scheduler=fifo"):
        load_sweep({**base, "search": {}}, {"sweep.grace_period": 2})  # 2 epochs: the last rung must be < 2
    # One epoch: no grace period fits; the line names the way out (mutation caught: the `max_t < 1` branch removed
    # gives "allowed: <= 0", a range no value meets).
    with pytest.raises(ValueError, match=r"^sweep\.scheduler: asha cannot stop .* = 1 .*sweep\.scheduler=fifo"):
        load_sweep({**base, "search": {}}, {"train.epochs": 1})
    assert load_sweep({**base, "search": {}}, {"train.epochs": 1, "sweep.scheduler": "fifo"}).base.train.epochs == 1
    # a fixed run directory for every trial: the second would find the first's lock (mutation caught: the
    # train.name check removed, and the sweep starts)
    with pytest.raises(ValueError, match=r"^train\.name: 'fixed' would give every trial one run directory"):
        load_sweep({**base, "search": {}}, {"train.name": "fixed"})
    s = load_sweep({**base, "search": {"moco.momentum": {"grid": [0.9]}}}, ["train.epochs=5", "sweep.name=x"])
    assert s.base.train.epochs == 5 and s.settings.name == "x" and s.base.moco.queue_size == 128
    assert ray.is_initialized() == was_up


@pytest.mark.parametrize(
    ("name", "trials", "keys"),
    [
        ("sweep_queue_momentum", 12, {"moco.queue_size", "moco.momentum"}),
        ("sweep_temperature_aug", 12, {"moco.temperature", "aug.strength"}),
        ("sweep_batch_robustness", 8, {"moco.method", "train.batch_size"}),
    ],
)
def test_shipped_sweeps_validate(name, trials, keys):
    """Every combination of each shipped sweep builds a valid config (checked without Ray)."""
    from pathlib import Path

    s = load_sweep(Path(__file__).resolve().parents[2] / "experiments" / f"{name}.yaml")
    assert s.num_trials() == trials and set(s.search) == keys and s.settings.name == name


def test_method_search_applies_each_methods_preset():
    """moco.method as a searched key: a SimCLR trial gets SimCLR's model, the file's explicit values still win."""
    from pathlib import Path

    from moco_ray.config import load_config

    s = load_sweep(Path(__file__).resolve().parents[2] / "experiments" / "sweep_batch_robustness.yaml")
    simclr = load_config(s.base_raw, {"moco.method": "simclr", "train.batch_size": 64})
    assert simclr.moco.method == "simclr" and simclr.moco.temperature == 0.2 and simclr.train.batch_size == 64
    assert simclr.moco.queue_size == s.base.moco.queue_size  # unused by SimCLR, kept for a like-for-like table


def test_too_many_concurrent_trials_refused_before_the_parent_run(ray_local, small_shards, tmp_path, mlflow_uri):
    """The concurrency check runs before the parent run and the sweep directory exist (it ran after them, so the
    refusal left a RUNNING parent and a rerun was told the sweep "already exists")."""
    from moco_ray.tracking.store import client
    from moco_ray.tuning import run_sweep

    spec = _tiny(
        small_shards, tmp_path, mlflow_uri, train={"cpus_per_worker": 0.5},
        search={"moco.queue_size": {"grid": [128, 256]}},
        sweep={"name": "crowded", "metric": "loss", "mode": "min", "max_concurrent_trials": 2, "verbose": 0},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"^sweep\.max_concurrent_trials: .* leave no whole CPU"):
        run_sweep(spec)
    assert client(mlflow_uri).get_experiment_by_name("sweep-test") is None
    assert not (tmp_path / "runs" / "crowded").exists()
