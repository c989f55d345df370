"""`moco-ray import-checkpoint` and `moco-ray export --format moco`: official MoCo files <-> MLflow runs.

Files in the official layouts are built from torchvision models (tests/official_layouts.py); the store is a fresh
sqlite one read back with MlflowClient. One import and one export go through the console script in a subprocess;
the other layouts go through the same parser in-process (`main(argv)`), which is cheaper on 2 CPUs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from official_layouts import official_checkpoint, query_backbone
from official_scripts import moco_main_lincls, mocov3_main_lincls

from moco_ray.cli.main import main

REPO = Path(__file__).resolve().parents[2]
REPO_CLI = [sys.executable, "-m", "moco_ray.cli.main"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Run in tmp_path: a fresh sqlite store puts its artifacts under ./mlruns of the working directory."""
    monkeypatch.chdir(tmp_path)


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([*REPO_CLI, *args], capture_output=True, text=True, timeout=600, env=env)


def _run_id(stdout: str) -> str:
    return next(line.split()[-1] for line in stdout.splitlines() if line.startswith("run id:"))


def _runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    return [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])]


def _import_in_process(path, uri: str, capsys, *extra: str) -> str:
    assert main(["import-checkpoint", str(path), "--tracking-uri", uri, *extra]) == 0
    return _run_id(capsys.readouterr().out)


def _assert_exported_exactly(out_file, ckpt: dict) -> None:
    """The export is the imported file's query backbone, bit for bit, in the file's own layout (v3: base_encoder),
    and loads as that method's main_lincls.py loads it (tests/official_scripts.py)."""
    got = torch.load(out_file, map_location="cpu", weights_only=True)
    v3 = any(k.startswith("module.base_encoder.") for k in ckpt["state_dict"])
    prefix = "module.base_encoder." if v3 else "module.encoder_q."
    want = {f"{prefix}{k}": v for k, v in query_backbone(ckpt).items()}
    assert set(got) == {"state_dict", "arch", "epoch", "method", "small_stem"}
    assert got["arch"] == ckpt["arch"] and got["epoch"] == ckpt["epoch"] and got["small_stem"] is False
    assert list(got["state_dict"]) == list(want)
    for k, v in want.items():  # bit for bit: same dtype, shape and bytes
        assert got["state_dict"][k].dtype == v.dtype and torch.equal(got["state_dict"][k], v), k
    model = getattr(torchvision.models, ckpt["arch"])()
    if v3:
        mocov3_main_lincls(got, model, "fc")
    else:
        moco_main_lincls(got, model)


def test_import_then_export_moco_round_trips_through_the_console_script(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    ckpt = official_checkpoint("v2", epoch=800)
    src = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save(ckpt, src)
    r = _cli(["import-checkpoint", str(src), "--arch", "resnet18", "--tracking-uri", mlflow_uri])
    assert r.returncode == 0, r.stderr
    run_id = _run_id(r.stdout)
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "moco_v2_800ep_pretrain"
    assert run.data.tags["moco_ray.imported"] == "true" and run.data.tags.get("moco_ray.encoder_model_uri")
    p = run.data.params
    assert p["moco.method"] == "moco_v2" and p["model.arch"] == "resnet18" and p["import.epoch"] == "800"
    assert p["import.source"] == str(src.resolve()) and len(p["import.sha256"]) == 64
    # where to look: the experiment and the run's page on the UI's training view (a local store: `mlflow ui` first)
    page = f"/#/experiments/{run.info.experiment_id}/runs/{run_id}?workflowType=machine_learning"
    assert "experiment: moco-ray" in r.stdout.splitlines() and page in r.stdout, r.stdout
    # the "epoch" metric as a trained run's after its last epoch: 800 (its number, as the console counts) at step 800
    assert [(m.step, m.value) for m in MlflowClient(mlflow_uri).get_metric_history(run_id, "epoch")] == [(800, 800)]

    out = tmp_path / "exported"
    out.mkdir()
    r = _cli(["export", "--run", run_id, "--format", "moco", str(out), "--tracking-uri", mlflow_uri])
    assert r.returncode == 0, r.stderr
    (written,) = out.glob("*.pth.tar")
    _assert_exported_exactly(written, ckpt)


@pytest.mark.parametrize("method", ["v1", "v3"])
def test_other_layouts_round_trip(tmp_path, mlflow_uri, capsys, method):
    ckpt = official_checkpoint(method, epoch=100)
    src = tmp_path / f"{method}.pth.tar"
    torch.save(ckpt, src)
    run_id = _import_in_process(src, mlflow_uri, capsys)  # --arch from the file's "arch" field
    assert _runs(mlflow_uri)[0].data.params["moco.method"] == f"moco_{method}"
    out = tmp_path / "out"
    assert main(["export", "--run", run_id, "--format", "moco", str(out), "--tracking-uri", mlflow_uri]) == 0
    _assert_exported_exactly(out / "encoder.moco.pth.tar", ckpt)


def test_bad_files_are_one_line_errors_and_log_nothing(tmp_path, mlflow_uri, capsys):
    cases = []
    wrong_arch = tmp_path / "r18.pth.tar"
    torch.save(official_checkpoint("v1"), wrong_arch)
    cases.append(([str(wrong_arch), "--arch", "resnet50"], "first mismatching key module.encoder_q.layer1.0.conv1"))
    unknown = tmp_path / "plain.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, unknown)
    cases.append(([str(unknown), "--arch", "resnet18"], "unknown checkpoint layout"))
    pickled = tmp_path / "with_args.pth.tar"
    torch.save({**official_checkpoint("v1"), "args": argparse.Namespace(lr=0.03)}, pickled)
    cases.append(([str(pickled)], "weights_only=True) cannot read it"))
    cases.append(([str(tmp_path / "absent.pth.tar")], "checkpoint not found"))
    for args, expect in cases:
        assert main(["import-checkpoint", *args, "--tracking-uri", mlflow_uri]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and expect in err, err
        assert args[0] in err or str(tmp_path) in err, err  # names the file
    # an experiment name MLflow refuses (mutation caught: no check_experiment_name call in import_checkpoint gives
    # MLflow's multi-line exception after the file was read)
    long_name = ["--experiment", "x" * 501]
    assert main(["import-checkpoint", str(wrong_arch), *long_name, "--tracking-uri", mlflow_uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--experiment: 'xxxx" in err and "(501 characters)" in err, err
    assert not (tmp_path / "mlflow.db").exists() or not _runs(mlflow_uri)

    # the explicit opt-in reads it (the extra object is ignored)
    run_id = _import_in_process(pickled, mlflow_uri, capsys, "--trust-pickle", "--name", "trusted")
    assert [r.info.run_id for r in _runs(mlflow_uri)] == [run_id]


@pytest.mark.ray
def test_eval_knn_on_an_imported_run(ray_local, small_shards, tmp_path, mlflow_uri, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MOCO_RAY_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "v1.pth.tar"
    torch.save(official_checkpoint("v1"), src)
    run_id = _import_in_process(src, mlflow_uri, capsys)
    args = ["eval", "knn", "--run", run_id, "--data", str(small_shards), "--image-size", "32"]
    assert main([*args, "--tracking-uri", mlflow_uri]) == 0, capsys.readouterr().err
    assert "rows at 32 px" in capsys.readouterr().out
    c = MlflowClient(mlflow_uri)
    parent = c.get_run(run_id)
    child = c.get_run(parent.data.tags["moco_ray.eval_knn_run"])
    assert child.data.tags["mlflow.parentRunId"] == run_id and child.data.params["test_rows"] == "200"
    assert parent.data.metrics["eval_knn_top1"] == child.data.metrics["knn_top1"]
