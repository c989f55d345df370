"""Method comparison at a fixed image budget: kNN top-1 of MoCo v2 vs SimCLR (and v3) across global batch sizes.

The question users ask: MoCo's negatives come from its queue, SimCLR's from the batch, so does MoCo hold up at
small batches where SimCLR loses negatives? Every trial sees the same images for the same number of epochs with
the same augmentations, encoder and lr rule (lr = base x batch / 256); only the method and the batch change.
Runs the platform's own modules (``build_method``, the view augmentation, the kNN monitor) in one process, no Ray:
the sweep ``experiments/sweep_batch_robustness.yaml`` asks the same question through Ray Tune at full scale.

    python benchmarks/bench_methods.py --images 2000 --epochs 10 --size 16 --batches 32 128
    python benchmarks/bench_methods.py --data /path/to/imagefolder --size 32 --epochs 50 --device cuda

Prints one line per trial and a RESULTS.md row; ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch

from moco_ray.config import load_config
from moco_ray.core.backbone_io import backbone_of
from moco_ray.data.arrays import load_imagefolder_arrays
from moco_ray.data.augment import build_view_augment, normalize_on_device
from moco_ray.evaluation.features import extract_features
from moco_ray.evaluation.knn import knn_accuracy
from moco_ray.train.model import build_method
from moco_ray.train.step import build_optimizer, set_lr, train_step


def in_batches(data: tuple[torch.Tensor, torch.Tensor], size: int = 256):
    x, y = data
    return ((x[i : i + size], y[i : i + size]) for i in range(0, len(x), size))


def knn(backbone, train, test, device: str, k: int) -> float:
    ftr, ytr = extract_features(backbone, in_batches(train), device, preprocess=normalize_on_device)
    fte, yte = extract_features(backbone, in_batches(test), device, preprocess=normalize_on_device)
    return knn_accuracy(ftr, ytr, fte, yte, k=k)


def run_trial(method: str, batch: int, a: argparse.Namespace, train, test) -> dict[str, Any]:
    cfg = load_config(
        None,
        {
            "moco.method": method,
            "moco.queue_size": a.queue_size,
            "moco.momentum": a.momentum,
            "moco.temperature": a.temperature,
            "model.arch": a.arch,
            "model.small_stem": a.small_stem,
            "model.head_bn": a.head_bn,
            "aug.image_size": a.size,
            "aug.strength": a.strength,
            "train.batch_size": batch,
            "train.num_workers": 1,
            "optim.lr": a.lr,  # at batch 256, scaled linearly to `batch` (cfg.lr)
            "optim.lr_reference_batch": 256,
            "optim.weight_decay": 5e-4,
        },
    )
    torch.manual_seed(a.seed)
    model = build_method(cfg).to(a.device).train()
    lr = cfg.lr
    opt = build_optimizer(cfg, model)
    aug = build_view_augment(cfg.aug.preset, a.size, a.strength)
    gen = torch.Generator().manual_seed(a.seed)
    n = len(train[0])
    steps_per_epoch = n // batch
    total = steps_per_epoch * a.epochs
    knn0 = knn(backbone_of(model), train, test, a.device, a.knn_k)
    t0, step, curve = time.perf_counter(), 0, []
    for epoch in range(a.epochs):
        order = torch.randperm(n, generator=gen)
        losses = []
        for i in range(steps_per_epoch):
            set_lr(opt, lr * 0.5 * (1 + math.cos(math.pi * step / total)))  # cosine over the whole budget
            idx = order[i * batch : (i + 1) * batch]
            q, k = zip(*(aug.pair(img, gen) for img in train[0][idx]))
            q = normalize_on_device(torch.stack(q).to(a.device), a.device)
            k = normalize_on_device(torch.stack(k).to(a.device), a.device)
            losses.append(train_step(model, opt, q, k)["loss"].item())
            step += 1
        curve.append(round(float(np.mean(losses)), 3))
        print(f"  {method} batch {batch} epoch {epoch + 1}/{a.epochs} loss {curve[-1]:.3f}", flush=True)
    secs = time.perf_counter() - t0
    top1 = knn(backbone_of(model), train, test, a.device, a.knn_k)
    row = {"method": method, "batch": batch, "knn_top1": top1, "knn_top1_init": knn0, "steps": total}
    row.update({"loss_per_epoch": curve, "train_seconds": round(secs, 1), "images_per_s": total * batch / secs})
    print(f"{method:8s} batch {batch:4d}: kNN top-1 {top1:.3f} (at init {knn0:.3f}), {total} steps, {secs:.0f} s")
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(common.CIFAR_MINI), help="ImageFolder root with train/ and test/")
    p.add_argument("--images", type=int, default=2000, help="train images used (class-balanced; 0 = all)")
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=["moco_v2", "simclr"])
    p.add_argument("--batches", nargs="+", type=int, default=[32, 128])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--small-stem", action="store_true")
    p.add_argument("--head-bn", action="store_true", help="BN in the projector (leaves the early plateau sooner)")
    p.add_argument("--queue-size", type=int, default=1024)
    p.add_argument("--momentum", type=float, default=0.99)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--strength", type=float, default=1.0, help="aug.strength")
    p.add_argument("--lr", type=float, default=0.06, help="at batch 256; scaled linearly")
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    root = Path(a.data)
    if not (root / "train").is_dir():
        raise SystemExit(f"--data: no train/ split under {root}")
    train = load_imagefolder_arrays(root, "train", a.size, a.images)[:2]
    test = load_imagefolder_arrays(root, "test" if (root / "test").is_dir() else "train", a.size, a.test_images)[:2]
    print(f"{len(train[0])} train / {len(test[0])} test images at {a.size} px, {a.epochs} epochs; {common.machine()}")
    rows = [run_trial(m, b, a, train, test) for m in a.methods for b in a.batches]
    figures = "; ".join(f"{r['method']} b{r['batch']} kNN {r['knn_top1']:.3f}" for r in rows)
    line = common.results_line(" ".join(["python benchmarks/bench_methods.py", *(argv or [])]), figures)
    print(f"\nRESULTS.md: {line}")
    out = {"machine": common.machine(), "date": common.today(), "args": vars(a), "rows": rows, "results_line": line}
    common.write_json(a.json, out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
