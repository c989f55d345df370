"""`moco-ray eval` / `moco-ray export` on real MLflow runs: real local Ray, real Parquet shards, real sqlite store.

The runs are made without Ray Train (a full pretraining takes minutes on 2 CPUs): a tiny MoCo is trained for a
few steps with the core on real images (so SplitBatchNorm-trained weights go through export), then logged with the
trainer's own logging function (config.yaml, params, encoder/ artifact, mlflow.pytorch model and its tag). A randomly
initialised encoder and a collapsed one (every image -> the same feature) are logged the same way.

Why random vs collapsed and not trained vs random: measured on this 2-CPU box, a few dozen MoCo steps *lower*
kNN / linear accuracy below a random ResNet's (digits 8 px: random 0.86 / 0.89, after 25 steps 0.68 / 0.80;
CIFAR 8 px: random 0.21 / 0.21, after 50 steps 0.19 / 0.20): random conv features are a strong baseline and
contrastive training needs hundreds of steps to overtake it. The random-vs-collapsed gap
still fails whenever features and labels fall out of step, splits are mixed up, or the wrong weights are loaded.
Trained vs random, with 150 steps on CIFAR images, is tests/jobs/test_trained_beats_random.py.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from moco_helpers import log_like_trainer, train_moco_steps

pytestmark = pytest.mark.ray

SIZE = 8  # px: sklearn digits are 8x8 scans, so nothing is lost and a step costs little on 2 CPUs
STEPS = 10
BATCH = 32
FIXTURE_CFG = {
    "model": {"arch": "resnet18", "small_stem": True, "dim": 64, "hidden_dim": 128},
    "moco": {"method": "moco_v2", "queue_size": 256, "temperature": 0.2, "momentum": 0.99, "bn_splits": 2},
    "aug": {"image_size": SIZE, "strength": 0.5},
    "train": {"batch_size": BATCH, "num_workers": 1, "epochs": 1, "seed": 0},
    "optim": {"lr": 0.06, "lr_reference_batch": BATCH, "weight_decay": 5e-4},
    "tracking": {"experiment": "eval-tests"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Digits shards, a sqlite store and runs: trained, random and collapsed encoders, and one without encoder."""
    from moco_ray.config import load_config
    from moco_ray.core.backbone_io import backbone_of
    from moco_ray.core.encoders import torchvision_backbone
    from moco_ray.data.arrays import load_imagefolder_arrays
    from moco_ray.data.digits import write_digits_imagefolder
    from moco_ray.data.ingest import ingest

    base = tmp_path_factory.mktemp("eval_runs")
    root = write_digits_imagefolder(base / "digits", size=SIZE)
    shards = base / "shards"
    ingest(str(root), str(shards), progress=False)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    cfg = load_config({**FIXTURE_CFG, "data": {"shards": str(shards)}})
    old_cache = os.environ.get("MOCO_RAY_CACHE")
    os.environ["MOCO_RAY_CACHE"] = str(base / "cache")
    torch.manual_seed(1)
    rand = torchvision_backbone(cfg.model.arch, cfg.model.small_stem).eval()
    collapsed = torchvision_backbone(cfg.model.arch, cfg.model.small_stem).eval()
    with torch.no_grad():
        collapsed.conv1.weight.zero_()  # the stem sees nothing: every image gives the same feature
    trained = backbone_of(train_moco_steps(cfg, load_imagefolder_arrays(root, "train", SIZE)[0], STEPS))
    ids = {
        "trained": log_like_trainer(uri, cfg, trained, "trained"),
        "random": log_like_trainer(uri, cfg, rand, "random"),
        "collapsed": log_like_trainer(uri, cfg, collapsed, "collapsed"),
        "no_encoder": log_like_trainer(uri, cfg, None, "crashed"),
    }
    yield {"uri": uri, "shards": str(shards), "cache": base / "cache", **ids}
    if old_cache is None:
        os.environ.pop("MOCO_RAY_CACHE", None)
    else:
        os.environ["MOCO_RAY_CACHE"] = old_cache


def test_eval_separates_encoders_and_results_are_logged(ray_local, runs):
    from mlflow.tracking import MlflowClient

    from moco_ray import evaluate_knn, evaluate_linear  # the public API (lazy top-level names)

    uri = runs["uri"]
    knn = {r: evaluate_knn(runs[r], tracking_uri=uri, k=20) for r in ("random", "collapsed")}
    lin = {r: evaluate_linear(runs[r], tracking_uri=uri, epochs=30) for r in ("random", "collapsed")}
    top = {(p, r): res[r]["top1"] for p, res in (("knn", knn), ("linear", lin)) for r in res}
    # 10 balanced classes: chance is ~0.1; random conv features on digits reach ~0.85
    assert top["knn", "random"] > 0.5 and top["linear", "random"] > 0.5, top
    assert top["knn", "collapsed"] < 0.25 and top["linear", "collapsed"] < 0.25, top

    # defaults came from the run: its shards, its image size, the small protocol for small images
    k, li = knn["random"], lin["random"]
    assert k["data"] == runs["shards"] and k["image_size"] == SIZE and k["test_rows"] > 0
    assert li["protocol"] == "small" and li["settings"]["epochs"] == 30 and len(li["history"]) == 30

    c = MlflowClient(uri)
    parent = c.get_run(runs["random"])
    assert parent.data.metrics["eval_knn_top1"] == pytest.approx(k["top1"])
    assert parent.data.metrics["eval_linear_top1"] == pytest.approx(li["top1"])
    child = c.get_run(k["eval_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == runs["random"]
    assert child.data.tags["moco_ray.eval"] == "knn"
    assert child.data.params["knn_k"] == "20" and child.data.params["data"] == runs["shards"]
    assert child.data.metrics["knn_top1"] == pytest.approx(k["top1"])
    lchild = c.get_run(li["eval_run_id"])
    assert lchild.data.tags["moco_ray.eval"] == "linear" and lchild.data.params["linear_epochs"] == "30"
    assert len(c.get_metric_history(li["eval_run_id"], "probe_test_top1")) == 30


def test_features_are_cached_once(ray_local, runs):
    from moco_ray.jobs.evaluate import evaluate_knn

    uri = runs["uri"]
    first = evaluate_knn(runs["random"], tracking_uri=uri, k=10)
    files = {p: p.stat().st_mtime_ns for p in runs["cache"].glob("*.pt")}
    assert len([p for p in files if runs["random"] in p.name]) == 2  # train + test of this run
    again = evaluate_knn(runs["random"], tracking_uri=uri, k=10)
    assert again["top1"] == first["top1"]
    assert {p: p.stat().st_mtime_ns for p in runs["cache"].glob("*.pt")} == files  # read, not rewritten
    assert again["eval_run_id"] != first["eval_run_id"]  # each evaluation is its own child run


def test_export_torchvision_and_torchscript_match_load_encoder(runs, tmp_path):
    from moco_ray.api import load_encoder
    from moco_ray.core.backbone_io import load_torchvision_backbone
    from moco_ray.jobs.export import export_run

    uri, rid = runs["uri"], runs["trained"]
    ref_net = load_encoder(rid, tracking_uri=uri)
    x = torch.randn(5, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = ref_net(x)
    tv = export_run(rid, "torchvision", tmp_path / "tv", tracking_uri=uri)
    assert tv.path == tmp_path / "tv" and tv.weights == tmp_path / "tv" / "encoder.pt" and tv.version is None
    net = load_torchvision_backbone(tv.weights, "resnet18", small_stem=True)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, rtol=0, atol=0)
    ts = export_run(rid, "torchscript", tmp_path / "ts", tracking_uri=uri)
    assert ts.weights == tmp_path / "ts" / "encoder.torchscript.pt"
    scripted = torch.jit.load(str(ts.weights))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), ref)
        assert scripted(torch.randn(2, 3, 16, 16)).shape == (2, 512)  # any image size


def test_export_detectron2_layout(runs, tmp_path):
    from moco_ray.api import load_encoder
    from moco_ray.jobs.export import export_run

    uri, rid = runs["uri"], runs["trained"]
    out = export_run(rid, "detectron2", tmp_path / "d2", tracking_uri=uri).weights
    with open(out, "rb") as f:
        d2 = pickle.load(f)
    assert d2["__author__"] == "MOCO" and d2["matching_heuristics"] is True
    keys = set(d2["model"])
    for k in (
        "stem.conv1.weight",
        "stem.conv1.norm.running_var",
        "res2.0.conv1.weight",
        "res2.0.conv2.norm.bias",
        "res3.0.shortcut.weight",
        "res3.0.shortcut.norm.running_mean",
        "res5.1.conv2.weight",
    ):
        assert k in keys, k
    assert not any(k.startswith(("layer", "fc.", "conv1", "bn1")) for k in keys)
    state = load_encoder(rid, tracking_uri=uri).state_dict()
    assert len(keys) == len(state)
    np.testing.assert_array_equal(d2["model"]["res2.0.conv1.weight"], state["layer1.0.conv1.weight"].numpy())


def test_register_creates_versions(runs, tmp_path):
    from mlflow.tracking import MlflowClient

    from moco_ray.jobs.export import export_run

    uri = runs["uri"]
    v1 = export_run(runs["trained"], "torchvision", tmp_path / "a", register="moco-enc", tracking_uri=uri)
    v2 = export_run(runs["random"], "torchvision", tmp_path / "b", register="moco-enc", tracking_uri=uri)
    assert (v1.registered_name, v1.version, v2.version) == ("moco-enc", "1", "2")
    versions = MlflowClient(uri).search_model_versions("name='moco-enc'")
    assert {(str(v.version), v.run_id) for v in versions} == {("1", runs["trained"]), ("2", runs["random"])}
    assert {v.tags["moco_ray.run_id"] for v in versions} == {runs["trained"], runs["random"]}


def test_clear_errors(runs, tmp_path):
    from moco_ray.jobs.evaluate import evaluate_knn
    from moco_ray.jobs.export import export_run

    uri = runs["uri"]
    with pytest.raises(ValueError, match="'0123456789abcdef' not found"):
        evaluate_knn("0123456789abcdef", tracking_uri=uri)
    with pytest.raises(ValueError, match="no encoder artifact"):
        export_run(runs["no_encoder"], "torchvision", tmp_path / "x", tracking_uri=uri)
    with pytest.raises(ValueError, match="no encoder artifact"):
        evaluate_knn(runs["no_encoder"], tracking_uri=uri)
    with pytest.raises(ValueError, match="no manifest.json"):
        evaluate_knn(runs["trained"], str(tmp_path / "nowhere"), tracking_uri=uri)
    with pytest.raises(ValueError, match="split 'val' is not in the shards"):
        evaluate_knn(runs["trained"], tracking_uri=uri, split_test="val")
    with pytest.raises(ValueError, match="export format 'onnx'"):
        export_run(runs["trained"], "onnx", tmp_path / "y", tracking_uri=uri)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_eval_and_export(ray_local, runs, tmp_path, capsys):
    from moco_ray.cli.main import main

    uri = runs["uri"]
    # the random run: its features are cached by the tests above when the whole file runs
    assert main(["eval", "knn", "--run", runs["random"], "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "kNN top-1 0." in out and f"child of {runs['random']}" in out
    assert main(["export", "--run", "BAD", "--tracking-uri", uri, str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moco-ray: error: MLflow run 'BAD' not found"), err
