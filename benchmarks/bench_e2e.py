"""End-to-end training throughput: Parquet shards -> Ray Data -> TorchTrainer (one GPU), vs the step ceiling.

For each dataset and each ``aug.device`` (cpu: views drawn in Ray Data tasks; gpu: decoded images shipped and
views drawn on the device) it runs the real path, ``moco_ray.jobs.pretrain.run_pretraining``, with one worker
(``train.cpus_per_worker`` CPUs; Ray Data gets the rest of the local Ray's CPUs), bf16 + channels_last, no kNN,
a checkpoint only after the last epoch, and reports:

- the last epoch's images/s (``PretrainResult.history``; epoch 1 also pays Ray Data's and cuDNN's warm-up);
- the step ceiling of the same config measured in this process before the run (``bench_step.measure_config``:
  the model step on device-resident batches; for aug=gpu also with the device-side view drawing), and the ratio;
- GPU utilisation sampled once a second (``nvidia-smi -l``, else pynvml) over epochs 2..N (between the first and
  the last ``ray.train.report``, as a Ray Train callback timestamps them) and over the whole busy window.

Datasets:

- ``cifar``: CIFAR-10 JPEGs (32 px) with the settings of experiments/cifar10_mocov2_r18.yaml. ``--cifar-root``
  is an ImageFolder tree (cifar10-full unpacked, or cifar10-mini); its train images are hard-linked into a temp
  ImageFolder, cycled up to ``--cifar-rows`` files (0 = each once), and that tree is ingested once.
- ``imagenet``: ``--imagenet-rows`` JPEGs of ``--imagenet-size`` px with random smooth content (q=90, made here
  in parallel processes) with the settings of experiments/imagenet_mocov2_r50.yaml (ResNet-50, 224 px, batch 256).

Trees and shards are kept in ``--workdir`` (reused when present), Ray Train checkpoints there too; the JSON, the
per-run report logs and the MLflow store (``sqlite:///<out-dir>/mlflow.db``) go to ``--out-dir``.

Usage: python benchmarks/bench_e2e.py [--datasets cifar,imagenet] [--aug cpu,gpu] [--epochs 3] [--max-steps 60]
       [--cpus-per-worker 2] [--cifar-root DIR] [--out-dir DIR]
Smoke (CPU): python benchmarks/bench_e2e.py --device cpu --tiny

``--vs-plain`` (CPU): the CIFAR config (ResNet-18 small stem, 32 px, ``--batch``) two ways back to back on the same
images and the same ``--cpus`` (2: one core for the step, the rest for the views): a plain PyTorch loop (an
ImageFolder-style dataset with the official-style PIL transforms of bench_views.py, ``DataLoader(num_workers=
cpus - cpus_per_worker)``, normalised in the main process, the same ``build_method`` model, optimizer and
``train.step.train_step``, ``torch.set_num_threads(cpus_per_worker)``), then ``run_pretraining`` with one worker of
``--cpus-per-worker`` CPUs (Ray Data gets the rest). Each runs ``--epochs`` epochs of ``--max-steps`` steps; the
last epoch's img/s are compared (both pay their loader's start-up in epoch 1). ``--ray-nice`` sets Ray's worker
niceness (Ray's default 15 starves Ray's processes next to anyone else's work on a shared machine; the plain loop
runs at 0). Example: python benchmarks/bench_e2e.py --vs-plain --device cpu --cpus 2 --cpus-per-worker 1
--batch 64 --epochs 2 --max-steps 100
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import bench_step
import torch
from bench_stream_vs_loader import PairFolder
from common import (
    CIFAR_MINI,
    REPO,
    TINY_MODEL,
    GpuSampler,
    fmt_rate,
    read_report_log,
    repeat_imagefolder,
    report_logger,
    results_line,
    synthetic_imagefolder,
    train_files,
    write_json,
)

from moco_ray.config import Config, load_config
from moco_ray.core.defaults import IMAGENET_MEAN, IMAGENET_STD
from moco_ray.data.digits import write_digits_imagefolder
from moco_ray.data.ingest import ingest
from moco_ray.jobs.local_ray import local_init_kwargs
from moco_ray.jobs.pretrain import run_pretraining
from moco_ray.train.model import build_method
from moco_ray.train.step import build_optimizer, train_step

EXPERIMENTS = {
    "cifar": REPO / "experiments" / "cifar10_mocov2_r18.yaml",
    "imagenet": REPO / "experiments" / "imagenet_mocov2_r50.yaml",
}


def default_cifar_root() -> Path:
    """cifar10-full unpacked by run_gpu.sh (data/ or .bench-data/), else cifar10-mini."""
    for p in (REPO / "data" / "cifar10-full", REPO / ".bench-data" / "cifar10-full", CIFAR_MINI):
        if (p / "train").is_dir():
            return p
    return CIFAR_MINI


def prepare_shards(name: str, a: argparse.Namespace, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The dataset's ImageFolder tree and its shards under `workdir` (both reused when already there)."""
    t0 = time.perf_counter()
    if name == "cifar":
        root = Path(a.cifar_root) if a.cifar_root else default_cifar_root()
        if not (root / "train").is_dir() and a.tiny:  # a fresh clone without shared/: sklearn's digits
            root = write_digits_imagefolder(workdir / "digits", size=32)
        tree = repeat_imagefolder(root, workdir / f"cifar-x{a.cifar_rows}", a.cifar_rows)
        info: dict[str, Any] = {"source": str(root), "rows": a.cifar_rows or "all", "how": "hard links, cycled"}
    elif name == "imagenet":
        w, h = (int(v) for v in a.imagenet_size.lower().split("x"))
        tree, mean_bytes = synthetic_imagefolder(workdir / f"synth-{a.imagenet_rows}-{w}x{h}", a.imagenet_rows, w, h)
        info = {"source": f"generated {w}x{h} JPEG q=90", "rows": a.imagenet_rows, "mean_bytes": round(mean_bytes)}
    else:
        raise ValueError(f"--datasets: unknown {name!r}; known: {', '.join(EXPERIMENTS)}")
    shards = workdir / f"{tree.name}-shards-{a.shard_mb:g}mb"
    manifest = ingest(tree, shards, shard_size_mb=a.shard_mb, progress=False)
    info.update(train_rows=manifest.rows("train"), shards=len(manifest.shards_of("train")))
    info["prepare_s"] = round(time.perf_counter() - t0, 1)
    return shards, info


def run_config(name: str, aug: str, shards: Path, a: argparse.Namespace, out_dir: Path, workdir: Path) -> Config:
    """The experiment's config with this benchmark's overrides (one worker, no kNN, one checkpoint at the end)."""
    over: dict[str, Any] = {
        "data.shards": str(shards),
        "data.source": "",
        "aug.device": aug,
        "train.epochs": a.epochs,
        "train.num_workers": 1,
        "train.use_gpu": a.device == "cuda",
        "train.cpus_per_worker": a.cpus_per_worker,
        "train.precision": "bf16",
        "train.channels_last": True,
        "train.max_steps_per_epoch": a.max_steps,
        "train.checkpoint_every": a.epochs,
        "train.keep_checkpoints": 1,
        "train.max_failures": 0,
        "train.storage_path": str(workdir / "ray-runs"),
        "eval.knn_every": 0,
        "tracking.tracking_uri": f"sqlite:///{out_dir.resolve() / 'mlflow.db'}",
        "tracking.experiment": "bench-e2e",
        "tracking.run_name": f"e2e-{name}-aug-{aug}",
    }
    if a.batch:
        over["train.batch_size"] = a.batch
    if a.tiny:
        over.update(TINY_MODEL)
        over["data.cpus"] = 1  # the CIFAR file reserves 2 stream CPUs: a 2-CPU machine has 1 beside the worker
    if a.vs_plain:  # the stream gets the CPUs the worker leaves, as the DataLoader gets them as workers
        over["data.cpus"] = max(1, (a.cpus or os.cpu_count() or 1) - int(a.cpus_per_worker))
    return load_config(EXPERIMENTS[name], over)


def run_one(name: str, cfg: Config, out_dir: Path, ceiling_iters: int) -> dict[str, Any]:
    """Step ceiling, then the real run under the GPU sampler; the figures of its last epoch."""
    device = torch.device("cuda" if cfg.train.use_gpu else "cpu")
    warmup = max(1, ceiling_iters // 3)
    cudnn = bench_step.cudnn_like_loop(device)  # the worker turns it on too: the ratio compares like settings
    ceiling = bench_step.measure_config(cfg, device, warmup, ceiling_iters)
    ceiling_aug = None
    if cfg.aug.device == "gpu":
        ceiling_aug = bench_step.measure_config(cfg, device, warmup, ceiling_iters, gpu_aug=True)
    log = out_dir / f"reports-{name}-aug-{cfg.aug.device}.jsonl"
    log.unlink(missing_ok=True)
    t0 = time.time()
    with GpuSampler() as gpu:
        res = run_pretraining(cfg, callbacks=[report_logger(log, t0)])
    wall = time.time() - t0
    reports = read_report_log(log)
    last = res.history[-1]
    bound = ceiling_aug or ceiling
    after_first = (reports[0]["time"], reports[-1]["time"]) if len(reports) >= 2 else (None, None)
    busy = gpu.busy_window() or (None, None)
    return {
        "dataset": name,
        "aug_device": cfg.aug.device,
        "arch": cfg.model.arch,
        "image_size": cfg.aug.image_size,
        "batch": cfg.train.batch_size,
        "cpus_per_worker": cfg.train.cpus_per_worker,
        "epochs": len(res.history),
        "images_per_s_by_epoch": [round(h.images_per_s, 1) for h in res.history],
        "epoch_seconds": [round(h.epoch_seconds, 2) for h in res.history],
        "images_per_s_last": last.images_per_s,
        "ceiling_img_per_s": ceiling["img_per_s"],
        "ceiling_with_gpu_aug_img_per_s": ceiling_aug["img_per_s"] if ceiling_aug else None,
        "ratio_to_ceiling": last.images_per_s / bound["img_per_s"],
        "cudnn_benchmark": cudnn,
        "gpu_util_epochs_2_on": gpu.stats(*after_first) if gpu.available and reports else None,
        "gpu_util_busy_window": gpu.stats(*busy) if gpu.available else None,
        "wall_s": round(wall, 1),
        "run_id": res.run_id,
        "loss_last": last.loss,
    }


def plain_loop(cfg: Config, tree: Path, loader_workers: int) -> dict[str, Any]:
    """The loop a MoCo user would write (see the module docstring); img/s of each epoch of max_steps steps."""
    torch.manual_seed(cfg.train.seed or 0)
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    model = build_method(cfg)
    opt = build_optimizer(cfg, model)
    B, steps = cfg.train.batch_size, cfg.train.max_steps_per_epoch
    data = PairFolder(common_train_files(tree), cfg.aug.image_size)
    dl = torch.utils.data.DataLoader(
        data, batch_size=B, shuffle=True, drop_last=True, num_workers=loader_workers, persistent_workers=True
    )
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    model.train()
    rates = []
    for _ in range(cfg.train.epochs):
        t0, n = time.perf_counter(), 0
        for q, k, _y in dl:
            train_step(model, opt, (q - mean) / std, (k - mean) / std)
            n += 1
            if n == steps:
                break
        if n == 0:
            raise ValueError(f"plain loop: {len(data)} images give no full batch of {B}")
        rates.append(n * B / (time.perf_counter() - t0))
    del dl
    return {"images_per_s_by_epoch": [round(r, 2) for r in rates], "images_per_s_last": rates[-1]}


def common_train_files(tree: Path) -> list[Path]:
    return train_files(tree)


def vs_plain(a: argparse.Namespace, workdir: Path, out_dir: Path) -> dict[str, Any]:
    """Plain PyTorch loop, then run_pretraining (1 worker), same images, config and CPUs; the ratio."""
    import ray  # lazy: Ray only for the Ray-run measurements; seconds to import

    shards, info = prepare_shards("cifar", a, workdir)
    tree = workdir / f"cifar-x{a.cifar_rows}"
    cfg = run_config("cifar", "cpu", shards, a, out_dir, workdir)
    cpus = a.cpus or os.cpu_count() or 1
    plain = plain_loop(cfg, tree, max(1, cpus - int(cfg.train.cpus_per_worker)))
    print(f"plain loop: {plain}", flush=True)
    kw = local_init_kwargs(cpus)
    kw["_system_config"] = {**kw["_system_config"], "worker_niceness": a.ray_nice}
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False, **kw)
    try:
        res = run_pretraining(cfg)
    finally:
        ray.shutdown()
    ours = [h.images_per_s for h in res.history]
    ratio = ours[-1] / plain["images_per_s_last"]
    print(f"moco-ray pretrain: {[round(r, 2) for r in ours]} img/s by epoch", flush=True)
    figures = (
        f"{info['train_rows']} CIFAR-10 JPEGs, {cfg.model.arch} small stem, {cfg.aug.image_size} px, batch "
        f"{cfg.train.batch_size}, {cpus} CPUs ({cfg.train.cpus_per_worker:g} for the step), {cfg.train.epochs} x "
        f"{cfg.train.max_steps_per_epoch} steps, last epoch: plain loop {fmt_rate(plain['images_per_s_last'])} "
        f"img/s, moco-ray pretrain {fmt_rate(ours[-1])} img/s = {ratio:.2f}x (load {os.getloadavg()[0]:.0f})"
    )
    return {"plain": plain, "ours_by_epoch": ours, "ratio": ratio, "dataset": info, "figures": figures}


def _util(r: dict[str, Any]) -> str:
    u = r["gpu_util_epochs_2_on"] or r["gpu_util_busy_window"]
    return f", GPU util {u['mean']:.0f}%" if u and u["mean"] is not None else ""


def figures(runs: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"{r['dataset']} {r['arch']} {r['image_size']}px b{r['batch']} aug={r['aug_device']}: "
        f"{fmt_rate(r['images_per_s_last'])} img/s last epoch = {r['ratio_to_ceiling']:.2f} x step ceiling "
        f"{fmt_rate(r['ceiling_with_gpu_aug_img_per_s'] or r['ceiling_img_per_s'])}{_util(r)}"
        for r in runs
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="cifar,imagenet", help="comma-separated: cifar, imagenet")
    ap.add_argument("--aug", default="cpu,gpu", help="aug.device values to run, comma-separated")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=60, help="train.max_steps_per_epoch (0 = full epochs)")
    ap.add_argument("--batch", type=int, default=0, help="global batch (0 = the experiment's)")
    ap.add_argument("--cpus-per-worker", type=float, default=2.0)
    ap.add_argument("--cpus", type=int, default=0, help="CPUs of the local Ray (0 = all)")
    ap.add_argument("--cifar-root", default="", help="ImageFolder tree with train/ (default: cifar10-full, -mini)")
    ap.add_argument("--cifar-rows", type=int, default=0, help="cycle the CIFAR train images to this many (0 = once)")
    ap.add_argument("--imagenet-rows", type=int, default=20000)
    ap.add_argument("--imagenet-size", default="400x350", help="WIDTHxHEIGHT of the generated JPEGs")
    ap.add_argument("--shard-mb", type=float, default=16.0, help="ingest shard size (more shards, more read tasks)")
    ap.add_argument("--ceiling-iters", type=int, default=20)
    ap.add_argument("--workdir", default=str(REPO / "data" / "bench"), help="trees, shards, checkpoints")
    ap.add_argument("--out-dir", default=str(REPO / "data" / "bench-out"), help="logs, MLflow, JSON")
    ap.add_argument("--out", default="", help="JSON results file (default: OUT_DIR/e2e.json)")
    ap.add_argument("--vs-plain", action="store_true", help="plain PyTorch loop vs run_pretraining (CPU; see above)")
    ap.add_argument("--ray-nice", type=int, default=15, help="Ray worker niceness (--vs-plain; Ray's default 15)")
    ap.add_argument("--tiny", action="store_true", help="smoke settings: tiny model, 64 rows, 1 epoch of 2 steps")
    a = ap.parse_args(argv)
    if a.tiny:
        a.epochs, a.max_steps, a.ceiling_iters = 1, 2, 1
        a.cifar_rows = a.cifar_rows or 64
        a.imagenet_rows, a.imagenet_size = min(a.imagenet_rows, 32), "48x40"
        a.cpus_per_worker = min(a.cpus_per_worker, 1.0)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here; use --device cpu")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    datasets = [d.strip() for d in a.datasets.split(",") if d.strip()]
    augs = [v.strip() for v in a.aug.split(",") if v.strip()]
    bad = [d for d in datasets if d not in EXPERIMENTS] + [v for v in augs if v not in ("cpu", "gpu")]
    if bad:
        raise ValueError(f"unknown dataset / aug device: {', '.join(bad)} (datasets: cifar, imagenet; aug: cpu, gpu)")
    out_dir, workdir = Path(a.out_dir), Path(a.workdir)
    out_json = Path(a.out) if a.out else out_dir / "e2e.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)

    if a.vs_plain:
        r = vs_plain(a, workdir, out_dir)
        cmd = "python benchmarks/bench_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:])
        r["results_line"] = results_line(cmd, r["figures"])
        print(f"\nRESULTS.md: {r['results_line']}")
        write_json(out_json, r)
        return r
    import ray  # lazy: Ray only for the Ray-run measurements; seconds to import

    started = not ray.is_initialized()
    if started:
        cpus = a.cpus or os.cpu_count()
        ray.init(
            address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False, **local_init_kwargs(cpus)
        )
    results: dict[str, Any] = {"cpus": ray.cluster_resources().get("CPU"), "datasets": {}, "runs": []}
    try:
        for name in datasets:
            shards, info = prepare_shards(name, a, workdir)
            results["datasets"][name] = info
            print(f"{name}: {info}", flush=True)
            for aug in augs:
                r = run_one(name, run_config(name, aug, shards, a, out_dir, workdir), out_dir, a.ceiling_iters)
                results["runs"].append(r)
                print(f"RESULT {figures([r])}", flush=True)
                write_json(out_json, results)  # after each run: a later crash keeps what was measured
    finally:
        if started:
            ray.shutdown()
    cmd = "python benchmarks/bench_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results["results_line"] = results_line(cmd, figures(results["runs"]))
    print(f"\nRESULTS.md: {results['results_line']}")
    write_json(out_json, results)
    return results


if __name__ == "__main__":
    main()
