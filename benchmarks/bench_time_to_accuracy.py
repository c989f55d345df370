"""Time to accuracy: experiments/cifar10_mocov2_r18.yaml on CIFAR-10, kNN top-1 against wall-clock seconds.

Ingests ``--cifar-root`` (an ImageFolder tree with train/ and test/, e.g. cifar10-full unpacked) once, runs the
real pretraining (Ray Data -> Ray Train, one GPU) for ``--epochs`` with the kNN monitor every ``--knn-every``
epochs, and while it runs appends a line per epoch to ``--progress`` (``epoch N  seconds S  train_s T  knn_top1
K``; S = wall seconds since the start, T = the epochs' own seconds) and the full metrics to ``<progress>.jsonl``.
At the end it prints the (epoch, seconds, knn_top1) rows, the seconds to first reach each ``--targets`` accuracy,
and writes a JSON summary. The official MoCo CIFAR-10 demo reports 82.6 % kNN top-1 after 200 epochs.

Long runs on the device machine (detached, so the command that starts it can return): ``bash
benchmarks/run_gpu.sh tta-start`` (``setsid nohup python3 benchmarks/bench_time_to_accuracy.py ... &``), then
``bash benchmarks/run_gpu.sh tta-status 590`` to follow data/bench-out/tta/progress.txt.
Smoke (CPU): python benchmarks/bench_time_to_accuracy.py --device cpu --tiny --cifar-root SMALL_TREE
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from bench_e2e import default_cifar_root
from common import REPO, TINY_MODEL, read_report_log, report_logger, results_line, write_json

from moco_ray.config import Config, load_config
from moco_ray.data.ingest import ingest
from moco_ray.jobs.local_ray import local_init_kwargs
from moco_ray.jobs.pretrain import run_pretraining

CONFIG = REPO / "experiments" / "cifar10_mocov2_r18.yaml"
TINY = {
    **TINY_MODEL,
    "train.max_steps_per_epoch": 2,
    "eval.knn_k": 5,
    "eval.knn_max_bank": 64,
    "eval.knn_max_queries": 32,
}


def build_config(a: argparse.Namespace, shards: Path) -> Config:
    over: dict[str, Any] = {
        "data.shards": str(shards),
        "data.source": "",
        "train.epochs": a.epochs,
        "train.use_gpu": a.device == "cuda",
        "train.num_workers": 1,
        "train.storage_path": str(Path(a.workdir) / "ray-runs"),
        "eval.knn_every": a.knn_every,
        "tracking.tracking_uri": f"sqlite:///{Path(a.out_dir).resolve() / 'mlflow.db'}",
        "tracking.experiment": "bench-time-to-accuracy",
    }
    if a.cpus_per_worker:
        over["train.cpus_per_worker"] = a.cpus_per_worker
    if a.tiny:
        over.update(TINY)
    for item in a.override:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--override {item!r}: expected KEY=VALUE, e.g. train.batch_size=256")
        over[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return load_config(a.config, over)


def time_to_targets(rows: list[dict[str, Any]], targets: list[float]) -> dict[str, float | None]:
    """Wall seconds at the first kNN evaluation reaching each target (None: never reached)."""
    out: dict[str, float | None] = {}
    for t in targets:
        hit = next((r["elapsed_s"] for r in rows if r.get("knn_top1", -1.0) >= t), None)
        out[f"{t:g}"] = hit
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--cifar-root", default="", help="ImageFolder tree with train/ and test/ (default: cifar10-full)")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--knn-every", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--cpus-per-worker", type=float, default=0, help="0 = the config's")
    ap.add_argument("--cpus", type=int, default=0, help="CPUs of the local Ray (0 = all)")
    ap.add_argument("--override", action="append", default=[], help="KEY=VALUE config override (repeatable)")
    ap.add_argument("--targets", default="0.6,0.7,0.8", help="kNN top-1 levels to time")
    ap.add_argument("--workdir", default=str(REPO / "data" / "bench"), help="shards and checkpoints")
    ap.add_argument("--out-dir", default=str(REPO / "data" / "bench-out" / "tta"), help="progress, JSON, MLflow")
    ap.add_argument("--progress", default="", help="progress lines (default: OUT_DIR/progress.txt)")
    ap.add_argument("--tiny", action="store_true", help="smoke settings: tiny model, 2 epochs of 2 steps, kNN each")
    a = ap.parse_args(argv)
    if a.tiny:
        a.epochs, a.knn_every, a.cpus_per_worker = min(a.epochs, 2), 1, 1.0
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here; use --device cpu")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    root = Path(a.cifar_root) if a.cifar_root else default_cifar_root()
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise FileNotFoundError(f"{root}: expected an ImageFolder tree with train/ and test/ (kNN needs both)")
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = Path(a.progress) if a.progress else out_dir / "progress.txt"
    jsonl = progress.with_suffix(".jsonl")
    for p in (progress, jsonl):
        p.unlink(missing_ok=True)

    t0 = time.time()
    shards = Path(a.workdir) / f"{root.name}-tta-shards"
    ingest(root, shards, progress=False)
    cfg = build_config(a, shards)
    print(f"ingest {time.time() - t0:.0f}s; progress in {progress}", flush=True)

    import ray  # lazy: Ray only for the Ray-run measurements; seconds to import

    started = not ray.is_initialized()
    if started:
        cpus = a.cpus or os.cpu_count()
        ray.init(
            address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False, **local_init_kwargs(cpus)
        )
    try:
        t_run = time.time()
        res = run_pretraining(cfg, callbacks=[report_logger(jsonl, t_run, progress)])
    finally:
        if started:
            ray.shutdown()
    rows = read_report_log(jsonl)
    targets = [float(t) for t in a.targets.split(",") if t.strip()]
    print(f"\n{'epoch':>6}{'seconds':>10}{'knn_top1':>10}")
    for r in rows:
        if "knn_top1" in r:
            print(f"{int(r['epoch']):>6}{r['elapsed_s']:>10.1f}{r['knn_top1']:>10.4f}")
    reached = time_to_targets(rows, targets)
    final = res.history[-1].knn_top1
    summary = {
        "config": a.config,
        "epochs": len(res.history),
        "run_id": res.run_id,
        "knn_top1_final": final,
        "seconds_total": rows[-1]["elapsed_s"] if rows else None,
        "seconds_to_target": reached,
        "rows": [{k: r.get(k) for k in ("epoch", "elapsed_s", "train_s", "knn_top1", "images_per_s")} for r in rows],
    }
    hits = ", ".join(f">= {t}: {s:.0f}s" if s is not None else f">= {t}: not reached" for t, s in reached.items())
    cmd = "python benchmarks/bench_time_to_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    knn = f"{final:.4f}" if final is not None else "-"
    figures = f"{len(res.history)} epochs in {summary['seconds_total'] or 0:.0f}s, kNN top-1 {knn}; {hits}"
    summary["results_line"] = results_line(cmd, figures)
    print(f"\nRESULTS.md: {summary['results_line']}")
    write_json(out_dir / "time_to_accuracy.json", summary)
    return summary


if __name__ == "__main__":
    main()
