"""Ingest throughput on one machine: the local ingest (a thread pool in one process) vs the Ray Data ingest.

Same images, same machine, same process: the train images of an ImageFolder tree (``--data``, or unpacked from
``--tgz``; ``--images N`` cycles them to N files, hard links), or ``--synthetic N`` generated 400x350 JPEGs (q=90,
ImageNet-like decode cost: the per-CPU figure for the scaling arithmetic), ingested into local shards by
`moco_ray.data.ingest.ingest` (what ``moco-ray ingest DIR OUT`` runs) and by `moco_ray.data.ray_ingest.ray_ingest`
(``moco-ray ingest --ray``: its tasks stay on this node), each into a fresh directory, alternating, after one
warm-up of each (the OS file cache; Ray's worker processes and their imports). Ray is started before the timing,
as a cluster is before a job. images/s = images / wall seconds of the call; the ratio is Ray / local of the medians.

Usage: python benchmarks/bench_ingest_ray.py [--data DIR | --tgz FILE | --synthetic N] [--images N] [--repeats 3]
       [--cpus N]
Prints a table and a line to paste into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import ray

from moco_ray.data.ingest import ingest
from moco_ray.data.ray_ingest import ray_ingest
from moco_ray.jobs.local_ray import local_init_kwargs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(common.CIFAR_MINI), help="ImageFolder tree with a train/ split")
    ap.add_argument("--tgz", default="", help="a .tgz of such a tree (e.g. cifar10-full.tgz), unpacked first")
    ap.add_argument("--images", type=int, default=0, help="train images, cycled (0: each once)")
    ap.add_argument("--synthetic", type=int, default=0, help="instead: this many generated 400x350 JPEGs")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of each path")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray")
    ap.add_argument("--workdir", default="", help="for the tree and shards (default: a temp dir, removed)")
    ap.add_argument("--out", default="", help="JSON file for every figure")
    return ap.parse_args(argv)


def source_tree(a: argparse.Namespace, work: Path) -> Path:
    """The images to ingest: the train split of --data (or of the unpacked --tgz), cycled to --images; or
    --synthetic generated JPEGs."""
    if a.synthetic:
        return common.synthetic_imagefolder(work / "synthetic", a.synthetic)[0]
    data = Path(a.data)
    if a.tgz:
        with tarfile.open(a.tgz) as tar:
            tar.extractall(work / "unpacked", filter="data")
        data = next(p.parent for p in (work / "unpacked").rglob("train") if p.is_dir())
    return common.repeat_imagefolder(data, work / "tree", a.images)


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def run_rounds(tree: Path, work: Path, repeats: int) -> dict[str, list[float]]:
    """Wall seconds per round of each path, alternating, after one untimed warm-up of each."""
    seconds: dict[str, list[float]] = {"local": [], "ray": []}
    counts = {}
    for r in range(repeats + 1):
        for name, fn in (("local", ingest), ("ray", ray_ingest)):
            out = work / f"{name}-{r}"
            dt, res = timed(fn, tree, out, progress=False)
            counts[name] = (res if name == "local" else res.manifest).counts
            shutil.rmtree(out)
            if r > 0:
                seconds[name].append(dt)
    if counts["local"] != counts["ray"]:
        raise RuntimeError(f"the two paths wrote different rows: {counts}")
    return seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_ingest_ray_"))
    try:
        tree = source_tree(a, work)
        images = sum(1 for _ in (tree / "train").glob("*/*"))
        mean_kb = sum(p.stat().st_size for p in (tree / "train").glob("*/*")) / images / 1024
        if not ray.is_initialized():
            ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, **local_init_kwargs(a.cpus))
        load_start = os.getloadavg()[0]
        seconds = run_rounds(tree, work, a.repeats)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    rates = {k: images / statistics.median(v) for k, v in seconds.items()}
    cpus = int(ray.cluster_resources().get("CPU", a.cpus))
    res = {
        "machine": common.machine(),
        "images": images,
        "mean_kb": mean_kb,
        "load_start": load_start,
        "cpus": cpus,
        "seconds": seconds,
        "img_per_s": rates,
        "ratio_ray_to_local": rates["ray"] / rates["local"],
        "ray_img_per_s_per_cpu": rates["ray"] / cpus,
    }
    print(f"\n{'path':<8}{'images':>8}{'median s':>10}{'img/s':>9}")
    for k in ("local", "ray"):
        print(f"{k:<8}{images:>8}{statistics.median(seconds[k]):>10.2f}{rates[k]:>9.0f}")
    figures = (
        f"{images} images ({mean_kb:.1f} KB mean), median of {a.repeats}: local {rates['local']:.0f} img/s, Ray Data "
        f"{rates['ray']:.0f} img/s on {cpus} CPUs (x{res['ratio_ray_to_local']:.2f}; "
        f"{res['ray_img_per_s_per_cpu']:.0f} img/s per CPU); load {load_start:.1f} at the start"
    )
    res["results_line"] = common.results_line("python benchmarks/bench_ingest_ray.py " + " ".join(argv or []), figures)
    print(f"\nRESULTS.md: {res['results_line']}")
    common.write_json(a.out, res)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
