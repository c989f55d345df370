"""Smoke tests of the GPU benchmarks on CPU: tiny sizes, real Ray / Parquet / MLflow, no timing assertions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_step  # noqa: E402
import common  # noqa: E402


def _ours_to_reference(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our Encoder's keys (backbone.*, head.*) -> the torchvision model with an MLP fc (*, fc.*)."""
    return {k.replace("backbone.", "", 1).replace("head.", "fc.", 1): v for k, v in state.items()}


def test_reference_step_computes_what_ours_computes():
    """Same weights, queue and batch: the reference-style module gives our loss and enqueues our keys."""
    from moco_ray.train.model import build_method

    cfg = bench_step.case_config(bench_step.CASES["tiny"], bn="none")
    torch.manual_seed(0)
    ours = build_method(cfg)
    ref = bench_step.build_reference(cfg)
    ref.encoder_q.load_state_dict(_ours_to_reference(ours.encoder_q.state_dict()))
    ref.encoder_k.load_state_dict(_ours_to_reference(ours.encoder_k.state_dict()))
    ref.queue.copy_(ours.queue.keys.T)
    b, s = cfg.train.batch_size, cfg.aug.image_size
    im_q, im_k = torch.randn(b, 3, s, s), torch.randn(b, 3, s, s)

    loss_ours = ours(im_q, im_k)["loss"]
    logits, labels = ref(im_q, im_k)
    loss_ref = torch.nn.functional.cross_entropy(logits, labels)

    assert loss_ref.item() == pytest.approx(loss_ours.item(), rel=1e-5)
    torch.testing.assert_close(ref.queue[:, :b].T, ours.queue.keys[:b], rtol=1e-5, atol=1e-6)
    assert int(ref.queue_ptr) == int(ours.queue.ptr) == b


def test_bench_step_tiny_cpu(tmp_path):
    out = tmp_path / "step.json"
    res = bench_step.main(["--device", "cpu", "--tiny", "--out", str(out)])
    case = res["cases"]["tiny"]
    assert set(case["variants"]) == {"reference-fp32", "ours-fp32"}
    assert all(v["img_per_s"] > 0 and v["peak_gib"] is None for v in case["variants"].values())
    ratio = case["variants"]["ours-fp32"]["img_per_s"] / case["variants"]["reference-fp32"]["img_per_s"]
    assert case["ratio_to_reference"]["ours-fp32"] == pytest.approx(ratio)
    assert case["bn_mode"] == "split"
    assert json.loads(out.read_text())["cases"]["tiny"]["case_settings"]["batch"] == 8
    assert res["results_line"].startswith("| ") and "tiny step ceiling" in res["results_line"]
    with pytest.raises(ValueError, match="--cases"):
        bench_step.main(["--device", "cpu", "--cases", "r99"])


def test_repeat_imagefolder_cycles_the_train_images(small_image_root, tmp_path):
    src = common.train_files(small_image_root)
    tree = common.repeat_imagefolder(small_image_root, tmp_path / "rep", len(src) + 5)
    files = sorted((tree / "train").glob("*/*"))
    assert len(files) == len(src) + 5
    by_index = {int(f.stem): f for f in files}
    assert by_index[len(src)].read_bytes() == src[0].read_bytes()  # wrapped around to the first image
    assert by_index[len(src)].parent.name == src[0].parent.name  # and kept its class
    with pytest.raises(FileNotFoundError, match="train/"):
        common.repeat_imagefolder(tmp_path / "missing", tmp_path / "x", 4)


def test_synthetic_imagefolder_writes_textured_jpegs(tmp_path):
    root, mean_bytes = common.synthetic_imagefolder(tmp_path / "syn", 6, width=40, height=32, classes=3, workers=1)
    files = sorted((root / "train").glob("*/*.jpg"))
    assert len(files) == 6 and {f.parent.name for f in files} == {"c00", "c01", "c02"}
    assert mean_bytes == pytest.approx(sum(f.stat().st_size for f in files) / 6)
    with Image.open(files[0]) as im:
        assert im.format == "JPEG" and im.size == (40, 32)
        assert np.asarray(im.convert("RGB"), dtype=np.float32).std() > 5  # not a flat image
    assert (root / "train" / "c01" / "000004.jpg").read_bytes() == common.smooth_jpeg(4, 40, 32)  # seeded
    with pytest.raises(ValueError, match="rows >= 1"):
        common.synthetic_imagefolder(tmp_path / "none", 0)


def test_gpu_sampler_windows():
    s = common.GpuSampler()
    s.samples = [(1.0, 0.0), (2.0, 40.0), (3.0, 80.0), (4.0, 60.0), (5.0, 0.0)]
    assert s.busy_window() == (2.0, 4.0)
    assert s.stats(*s.busy_window()) == {"samples": 3, "mean": 60.0, "median": 60.0}
    assert s.stats(10.0, None)["mean"] is None


def test_time_to_accuracy_targets_and_config(tmp_path):
    import bench_time_to_accuracy as tta

    rows = [{"elapsed_s": 10.0}, {"elapsed_s": 20.0, "knn_top1": 0.55}, {"elapsed_s": 30.0, "knn_top1": 0.72}]
    assert tta.time_to_targets(rows, [0.5, 0.7, 0.9]) == {"0.5": 20.0, "0.7": 30.0, "0.9": None}
    a = tta.parse_args(["--device", "cpu", "--tiny", "--override", "optim.lr=0.1", "--out-dir", str(tmp_path)])
    cfg = tta.build_config(a, tmp_path / "shards")
    assert (cfg.optim.lr, cfg.train.epochs, cfg.eval.knn_every, cfg.train.use_gpu) == (0.1, 2, 1, False)
    assert cfg.model.small_stem and cfg.moco.queue_size == 32  # the experiment's YAML + tiny overrides
    with pytest.raises(ValueError, match="KEY=VALUE"):
        tta.build_config(tta.parse_args(["--device", "cpu", "--override", "optim.lr"]), tmp_path)


@pytest.mark.ray
def test_bench_e2e_tiny_cpu_runs_the_real_path(ray_local, small_image_root, tmp_path):
    import bench_e2e
    from mlflow import MlflowClient

    out = tmp_path / "out"
    args = ["--device", "cpu", "--tiny", "--datasets", "cifar", "--aug", "cpu", "--cifar-root", str(small_image_root)]
    res = bench_e2e.main(args + ["--workdir", str(tmp_path / "work"), "--out-dir", str(out)])

    assert res["datasets"]["cifar"]["train_rows"] == 64
    (run,) = res["runs"]
    assert run["epochs"] == 1 and run["images_per_s_last"] > 0 and run["ceiling_img_per_s"] > 0
    assert run["ratio_to_ceiling"] == pytest.approx(run["images_per_s_last"] / run["ceiling_img_per_s"])
    assert run["gpu_util_busy_window"] is None  # no GPU here
    reports = common.read_report_log(out / "reports-cifar-aug-cpu.jsonl")
    assert [r["epoch"] for r in reports] == [1]  # the Ray Train callback ran in the controller
    assert reports[0]["images_per_s"] == pytest.approx(run["images_per_s_last"])
    mlflow_run = MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_run(run["run_id"])
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.metrics["images_per_s"] == pytest.approx(run["images_per_s_last"])
    assert json.loads((out / "e2e.json").read_text())["runs"][0]["run_id"] == run["run_id"]


def test_bench_methods_tiny_cpu(small_image_root, tmp_path):
    """Every (method, batch) trial trains on the same images and reports kNN before and after."""
    import bench_methods

    out = tmp_path / "methods.json"
    args = ["--data", str(small_image_root), "--images", "64", "--test-images", "40", "--epochs", "1"]
    res = bench_methods.main(args + ["--size", "8", "--batches", "16", "32", "--queue-size", "64", "--json", str(out)])
    assert [(r["method"], r["batch"]) for r in res["rows"]] == [
        ("moco_v2", 16),
        ("moco_v2", 32),
        ("simclr", 16),
        ("simclr", 32),
    ]
    assert [r["steps"] for r in res["rows"]] == [4, 2, 4, 2]  # 64 images per epoch at each batch
    for r in res["rows"]:
        assert 0 <= r["knn_top1"] <= 1 and len(r["loss_per_epoch"]) == 1 and r["loss_per_epoch"][0] > 0
    # the same seed gives the same initial encoder, so the same kNN at init for every trial of a method
    assert res["rows"][0]["knn_top1_init"] == res["rows"][1]["knn_top1_init"]
    assert json.loads(out.read_text())["results_line"].startswith("| ")


@pytest.mark.ray
def test_bench_shuffle_tiny_cpu(ray_local, small_image_root, tmp_path):
    """Both orders on the many-shard layout, one repeat: co-batch figures, stage CPU and ratios to the first scheme."""
    import bench_shuffle

    out = tmp_path / "shuffle.json"
    args = ["--root", str(small_image_root), "--rows", "192", "--size", "8", "--batch", "32", "--repeats", "1"]
    args += ["--layouts", "many", "--rows-per-shard", "64", "--schemes", "files:32,full:0"]
    res = bench_shuffle.main(args + ["--workdir", str(tmp_path), "--out", str(out)])
    assert res["rows"] == {"many": 192} and res["shards"]["many"] >= 2
    assert [r["scheme"] for r in res["runs"]] == ["files:32", "full:0"]
    for r in res["runs"]:
        assert 0 <= r["co_batch"] <= 1 and r["pairs_per_s"] > 0 and r["first_batch_s"] > 0
        assert r["views_cpu_s"] > 0 and (r["shuffle_cpu_s"] > 0) == (r["scheme"] == "full:0")  # read from ds.stats()
    assert res["summary"]["many files:32"]["speed_vs_baseline"]["mean"] == 1.0  # the baseline against itself
    assert json.loads(out.read_text())["results_line"].startswith("| ")
    with pytest.raises(ValueError, match="SHUFFLE:BUFFER"):
        bench_shuffle.Scheme.parse("random:10")


@pytest.mark.ray
def test_bench_ingest_ray_tiny_cpu(ray_local, small_image_root, tmp_path):
    """Both ingests on the same small tree, one round each: image count, both rates and their ratio."""
    import bench_ingest_ray

    out = tmp_path / "ingest.json"
    res = bench_ingest_ray.main(["--data", str(small_image_root), "--repeats", "1", "--out", str(out)])
    assert res["images"] == sum(1 for _ in (small_image_root / "train").glob("*/*"))
    assert set(res["img_per_s"]) == {"local", "ray"} and all(v > 0 for v in res["img_per_s"].values())
    assert res["ratio_ray_to_local"] == pytest.approx(res["img_per_s"]["ray"] / res["img_per_s"]["local"])
    assert json.loads(out.read_text())["results_line"].startswith("| ")
