"""View pairs per second per CPU core: decode + two augmentations, as the Ray Data stream runs them.

Two inputs: CIFAR-10 JPEGs (32 px, cifar10-mini repeated up to --rows, output 32 px), and larger JPEGs made here
(CIFAR images upscaled to 400x350, JPEG q=90, output 224 px, like ImageNet-style training). For each it measures

- ``core``: the map_batches body (`moco_ray.data.views.make_pairs`) in this process on one thread: CPU seconds
  per pair, so it is robust to other load on the machine;
- ``ray``: the whole stream (read_parquet -> file shuffle -> map_batches -> iter_batches) on a local Ray with
  --cpus CPUs, wall clock, divided by the CPUs.

Usage: python benchmarks/bench_stream.py [--rows 5000] [--large-rows 1000] [--cpus N] [--skip-ray]
Prints a table and a line to paste into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from PIL import Image

from moco_ray.config import AugConfig
from moco_ray.data.ingest import ingest
from moco_ray.data.manifest import read_manifest
from moco_ray.data.stream import pair_dataset
from moco_ray.data.views import make_pairs
from moco_ray.jobs.local_ray import local_init_kwargs

REPO = Path(__file__).resolve().parents[1]
CIFAR_MINI = Path(os.environ.get("MOCO_RAY_TEST_DATA", REPO.parent / "shared" / "data" / "cifar10-mini"))


def cifar_files() -> list[Path]:
    if not (CIFAR_MINI / "train").is_dir():
        sys.exit(f"cifar10-mini not found at {CIFAR_MINI} (set MOCO_RAY_TEST_DATA)")
    return sorted((CIFAR_MINI / "train").glob("*/*.jpg"))


def make_tree(root: Path, rows: int, large: bool) -> Path:
    """An ImageFolder tree of `rows` JPEGs: cifar10-mini repeated (hard links), or upscaled to 400x350."""
    src = cifar_files()
    for i in range(rows):
        f = src[i % len(src)]
        dst = root / "train" / f.parent.name / f"{i:06d}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if large:
            img = Image.open(f).convert("RGB").resize((400, 350), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            dst.write_bytes(buf.getvalue())
        else:
            try:
                os.link(f, dst)
            except OSError:
                shutil.copyfile(f, dst)
    return root


def bench_core(shards: Path, image_size: int, max_rows: int = 512) -> tuple[float, int]:
    """Pairs per CPU-second of make_pairs on one thread (CPU time, so other load does not skew it)."""
    m = read_manifest(shards)
    table = pq.read_table(shards / m.shards_of("train")[0].path, columns=["image", "label", "id"])
    table = table.slice(0, max_rows)
    batch = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    torch.set_num_threads(1)
    kw = dict(preset="v2", image_size=image_size, strength=1.0, device="cpu", seed=0, epoch_offset=0)
    make_pairs({k: v[:8] for k, v in batch.items()}, **kw)  # warm-up (imports, caches)
    t0 = time.process_time()
    out = make_pairs(batch, **kw)
    dt = time.process_time() - t0
    return len(out["q"]) / dt, len(out["q"])


def bench_ray(shards: Path, image_size: int, cpus: int, map_batch_size: int) -> tuple[float, int]:
    """Pairs per second per CPU through the full Ray Data stream (wall clock, one epoch)."""
    ds = pair_dataset(
        str(shards), "train", AugConfig(preset="v2", image_size=image_size), seed=0, map_batch_size=map_batch_size
    )
    n = 0
    t0 = time.perf_counter()
    for b in ds.iter_batches(batch_size=256, batch_format="numpy"):
        n += len(b["q"])
    dt = time.perf_counter() - t0
    return n / dt / cpus, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5000, help="CIFAR JPEG rows (cifar10-mini repeated)")
    ap.add_argument("--large-rows", type=int, default=1000, help="400x350 JPEG rows")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs for the local Ray")
    ap.add_argument("--map-batch-size", type=int, default=128)
    ap.add_argument("--skip-ray", action="store_true", help="only the single-core measurement")
    ap.add_argument("--workdir", default="", help="where to build the trees and shards (default: a temp dir)")
    a = ap.parse_args()

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_stream_"))
    cases = [("cifar JPEG 32px", a.rows, False, 32), ("400x350 JPEG", a.large_rows, True, 224)]
    shards = {}
    for name, rows, large, _ in cases:
        tree = make_tree(work / f"tree_{int(large)}_{rows}", rows, large)
        shards[name] = work / f"shards_{int(large)}_{rows}"
        ingest(tree, shards[name], shard_size_mb=8, progress=False)

    if not a.skip_ray:
        import ray  # lazy: Ray only for the Ray-run measurements; seconds to import

        ray.init(
            address="local",
            num_cpus=a.cpus,
            include_dashboard=False,
            log_to_driver=False,
            **local_init_kwargs(a.cpus),
        )
    results = []
    for name, rows, _, size in cases:
        core, n_core = bench_core(shards[name], size)
        ray_rate, n_ray = bench_ray(shards[name], size, a.cpus, a.map_batch_size) if not a.skip_ray else (0.0, 0)
        results.append((name, size, rows, core, ray_rate, n_ray))

    print(f"\n{'input':<18}{'out px':>7}{'rows':>7}{'core pairs/s':>14}{'ray pairs/s/cpu':>17}")
    for name, size, rows, core, ray_rate, _ in results:
        print(f"{name:<18}{size:>7}{rows:>7}{core:>14.0f}{ray_rate:>17.0f}")
    dev = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    cmd = "python benchmarks/bench_stream.py " + " ".join(sys.argv[1:])
    figures = "; ".join(
        f"{name}->{size}px: {core:.0f} pairs/s/core (1 thread, CPU time)"
        + (f", {ray_rate:.0f} pairs/s/cpu via Ray Data on {a.cpus} CPUs" if ray_rate else "")
        for name, size, _, core, ray_rate, _ in results
    )
    print(f"\nRESULTS.md: | {datetime.date.today()} | {dev} | `{cmd.strip()}` | {figures} |")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
