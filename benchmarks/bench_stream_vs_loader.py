"""Ray Data view-pair stream vs a plain torch DataLoader: same CPUs, same JPEGs, steady state, one invocation.

- ``loader``: the code a MoCo user would otherwise run: an ImageFolder-style Dataset (``Image.open(path)
  .convert("RGB")``, two views with the official-style PIL transforms of bench_views.py's plain column),
  ``DataLoader(batch_size=B, shuffle=True, drop_last=True, num_workers=--workers, persistent_workers=True)``.
- ``ray 1 shard`` / ``ray N shards``: the same images ingested twice (``ingest``, default shard size: one shard;
  ``--many-shard-mb``: many small shards), streamed by `moco_ray.data.stream.pair_dataset` on a local Ray with
  ``--cpus`` CPUs and consumed the way training consumes it: `moco_ray.data.stream.iter_pairs`
  (``iter_torch_batches``, the config's local shuffle buffer and prefetch depth) in this process.

Each stream is run for ``--passes`` epochs (executions); the last one is timed (steady state: worker processes,
imports and the page cache are warm). Two rates per column:

- ``pairs/s``: full batches x B / wall seconds of that pass (what a trainer sees; on a shared machine it moves
  with everyone else's load);
- ``pairs/cpu-s``: the same pairs / CPU seconds (user + system) spent by this process and all its descendants
  during the pass (DataLoader workers; Ray's raylet, GCS and worker processes): the stream's efficiency, which
  other load on the machine barely moves. On an idle machine with both streams CPU-bound, the ratios agree.

Where the other half went. On an idle machine (2026-12-02, 2 cores, 10,000 CIFAR-10 JPEGs) the stream still made
only 0.89x the DataLoader's pairs/s with 1 shard and 0.73x with 36, while using 0.9 of its 2 cores: it was not
the views' cost (1.9x the DataLoader's pairs per CPU-second) but idle CPUs. ``ds.stats()`` and py-spy showed why,
both in Ray 2.60's default (V2) Parquet reader:

1. Its ``ListFiles`` step packs the split's files into read tasks by size (min block 1 MiB, max 128 MiB): 10,000
   CIFAR rows (9.6 MB) came out as one read task emitting one block, in 1 file or in 36, so ``map_batches`` ran as
   one task on one core. ``override_num_blocks`` does not split a file there, and a smaller
   ``target_max_block_size`` (global to the dataset, so it also splits the 224 px view blocks) helped 1 shard only.
2. Each execution (each epoch) it starts 32 ``FooterReaderActor`` processes to read the footers, then kills them:
   1.5-6.5 s of every pass (more with more files), CPU taken from the view tasks, and the raylet's "N PYTHON
   worker processes have been started ... maximum expected startup concurrency" warning.

`moco_ray.data.stream` now reads through the file-list (V1) reader (``DataContext.use_datasource_v2 = False``
around ``read_parquet``): it reads the footers it is given on the driver, splits the rows into blocks for every
CPU (``ReadParquet->SplitBlocks(9)``: 9 map tasks for the 1-shard set, 8 read+map tasks for 36 files) and starts
no actors. Same machine, next run: 1 shard 1.29x the DataLoader, 36 shards 1.07x (RESULTS.md).

Earlier findings (2026-12-02, 2 shared cores at load 25-95, 2,000 JPEGs):

- The views themselves: the map_batches body made 0.4-0.6x the PIL pipeline's pairs per core; now 1.6x
  (bench_views.py).
- Ray's worker processes run at niceness 15 (Ray's ``worker_niceness`` default) while a DataLoader's workers run at
  0: on a machine shared with anything else, the view tasks get a small share of the cores (at load ~70 Ray's
  first pass ran at 23 pairs/s beside the DataLoader's 64). Inside a Ray Train run every process, the training
  worker included, is at 15, so on a dedicated node it does not matter. The benchmark sets it to 0 (``--ray-nice``)
  for a like-for-like comparison; ``moco_ray.jobs.local_ray.local_init_kwargs`` keeps Ray's default.
- Ray's own processes (raylet, GCS, agents, pooled idle workers) cost ~0.08-0.10 cores at rest (``idle_cores``):
  small on 16 cores, 5 % of this 2-core machine.
- The consumer (``iter_torch_batches``: re-batching, the 1,024-row local shuffle buffer, uint8 -> tensor collate)
  and the object store hand-off are what remains between the in-process rate (bench_views.py: ~1,100 pairs per
  CPU-second) and the stream's; a DataLoader pays more for the same work (pickling float32 views, 4x the bytes of
  uint8, through its worker queues).

Gotcha for anyone measuring from a git worktree: Ray's worker processes import ``moco_ray`` from the installed
(editable) package, not from the driver's working directory; run with ``PYTHONPATH=<worktree>`` or the view tasks
run another checkout's code.

Usage: PYTHONPATH=. python benchmarks/bench_stream_vs_loader.py [--root DIR] [--rows 10000] [--batch 256] [--cpus 2]
Prints a table and a line to paste into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from moco_ray.config import AugConfig, DataConfig
from moco_ray.data.ingest import ingest
from moco_ray.data.manifest import read_manifest, steps_per_epoch
from moco_ray.data.stream import iter_pairs, pair_dataset, quiet_progress
from moco_ray.jobs.local_ray import local_init_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_views import cpu_model, plain_transform  # noqa: E402

FULL_TGZ = common.REPO.parent / "shared" / "data" / "cifar10-full.tgz"


class PairFolder(torch.utils.data.Dataset):
    """Official-style dataset: a file list, PIL decode, two independently transformed views and the label."""

    def __init__(self, files: list[Path], size: int) -> None:
        self.files = files
        self.classes = sorted({f.parent.name for f in files})
        self.tf = plain_transform(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        f = self.files[i]
        with open(f, "rb") as fh:
            img = Image.open(io.BytesIO(fh.read())).convert("RGB")
        return self.tf(img), self.tf(img), self.classes.index(f.parent.name)


def tree_cpu_seconds(root: int | None = None) -> float:
    """User + system CPU seconds of process `root` (default: this one) and all its live descendants (/proc)."""
    root = root or os.getpid()
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2 :].split()  # fields after "pid (comm) ": state ppid ... utime(12) stime(13)
        parent[int(d.name)], cpu[int(d.name)] = int(f[1]), (int(f[11]) + int(f[12])) / tick
    mine, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in mine]
        mine.update(kids)
        frontier += kids
    return sum(cpu.get(p, 0.0) for p in mine)


class Pass:
    """Wall and tree-CPU seconds of one timed pass."""

    def __enter__(self) -> Pass:
        self.t0, self.c0 = time.perf_counter(), tree_cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.t0, tree_cpu_seconds() - self.c0

    def rates(self, n: int) -> dict[str, float]:
        return {"pairs_per_s": n / self.wall, "pairs_per_cpu_s": n / max(self.cpu, 1e-9), "pairs": n}


def cifar_root(a: argparse.Namespace, work: Path) -> Path:
    """--root, else cifar10-full unpacked from the shared tarball into the work dir, else cifar10-mini."""
    if a.root:
        return Path(a.root)
    if FULL_TGZ.is_file():
        dst = work / "cifar10-full"
        if not (dst / "train").is_dir():
            with tarfile.open(FULL_TGZ) as t:
                t.extractall(work, filter="data")
        return dst
    return common.CIFAR_MINI


def bench_loader(files: list[Path], a: argparse.Namespace) -> dict[str, Any]:
    """The plain DataLoader: --passes epochs with persistent workers, the last one timed."""
    dl = torch.utils.data.DataLoader(
        PairFolder(files, a.size),
        batch_size=a.batch,
        shuffle=True,
        drop_last=True,
        num_workers=a.workers,
        persistent_workers=a.workers > 0,
    )
    rates = []
    for _ in range(a.passes):
        n = 0
        with Pass() as p:
            for q, _k, _y in dl:
                n += len(q)
        rates.append(p.rates(n))
    del dl
    return {**rates[-1], "by_pass": [round(r["pairs_per_s"]) for r in rates]}


def bench_ray(shards: Path, a: argparse.Namespace, **pair_kw: Any) -> dict[str, Any]:
    """pair_dataset consumed by iter_pairs (as Worker.run_epoch does), --passes executions, the last one timed."""
    m = read_manifest(shards)
    steps = steps_per_epoch(m, "train", a.batch)
    ds = pair_dataset(str(shards), "train", AugConfig(preset="v2", image_size=a.size), seed=0, **pair_kw)
    rates = []
    for i in range(a.passes):
        if i == a.passes - 1:
            idle = idle_cores(a.idle_s)
        n = 0
        with Pass() as p:
            for b in iter_pairs(ds, a.batch, steps, DataConfig()):
                n += len(b["q"])
        rates.append(p.rates(n))
    busy = p.cpu - idle * p.wall  # CPU seconds net of what the idle cluster burns anyway
    return {
        **rates[-1],
        "idle_cores": idle,
        "pairs_per_busy_cpu_s": n / max(busy, 1e-9),
        "by_pass": [round(r["pairs_per_s"]) for r in rates],
        "shards": len(m.shards_of("train")),
    }


def idle_cores(seconds: float) -> float:
    """CPU cores the process tree (here: the idle Ray cluster: raylet, GCS, agents, pooled workers) uses at rest."""
    with Pass() as p:
        time.sleep(seconds)
    return p.cpu / p.wall


def prepare(a: argparse.Namespace, work: Path) -> tuple[list[Path], Path, Path]:
    tree = common.repeat_imagefolder(cifar_root(a, work), work / f"tree-{a.rows}", a.rows)
    one, many = work / f"shards-{a.rows}-one", work / f"shards-{a.rows}-many"
    if not (one / "manifest.json").is_file():
        ingest(tree, one, shard_size_mb=256, progress=False)
    if not (many / "manifest.json").is_file():
        ingest(tree, many, shard_size_mb=a.many_shard_mb, progress=False)
    return common.train_files(tree), one, many


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="", help="ImageFolder tree (default: cifar10-full from shared/data)")
    ap.add_argument("--rows", type=int, default=10000, help="train images used (cycled/cut from the tree)")
    ap.add_argument("--size", type=int, default=32, help="view side in px")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--passes", type=int, default=2, help="epochs per stream; the last is timed")
    ap.add_argument("--many-shard-mb", type=float, default=1.0, help="shard size of the many-shard ingest")
    ap.add_argument("--ray-nice", type=int, default=0, help="Ray worker niceness (Ray default: 15; see the docstring)")
    ap.add_argument("--idle-s", type=float, default=10.0, help="seconds to sample the idle Ray cluster's CPU use")
    ap.add_argument("--skip", default="", help="comma-separated columns to skip: loader, one, many")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "bench_stream_vs_loader"))
    ap.add_argument("--out", default="", help="JSON results file")
    a = ap.parse_args(argv)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    files, one, many = prepare(a, work)
    torch.set_num_threads(1)
    res: dict[str, Any] = {"rows": len(files), "batch": a.batch, "size": a.size, "cpus": a.cpus}
    if "loader" not in skip:
        res["loader"] = bench_loader(files, a)
        print(f"loader: {res['loader']}", flush=True)
    import ray  # lazy: Ray only for the Ray-run measurements; seconds to import

    kw = local_init_kwargs(a.cpus)
    kw["_system_config"] = {**kw["_system_config"], "worker_niceness": a.ray_nice}
    ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, **kw)
    quiet_progress()
    try:
        for key, shards in (("one", one), ("many", many)):
            if key not in skip:
                res[f"ray_{key}"] = bench_ray(shards, a)
                print(f"ray {key}: {res[f'ray_{key}']}", flush=True)
    finally:
        ray.shutdown()
    report(res, a, argv)
    return res


def report(res: dict[str, Any], a: argparse.Namespace, argv: list[str] | None) -> None:
    base = res.get("loader", {}).get("pairs_per_s")
    parts = []
    if base:
        cbase = res["loader"]["pairs_per_cpu_s"]
        parts.append(f"DataLoader ({a.workers} workers) {base:.0f} pairs/s, {cbase:.0f} pairs/cpu-s")
    for key in ("one", "many"):
        r = res.get(f"ray_{key}")
        if r:
            ratio = f" (x{r['pairs_per_s'] / base:.2f})" if base else ""
            cratio = f" (x{r['pairs_per_cpu_s'] / cbase:.2f})" if base else ""
            parts.append(
                f"pair_dataset {r['shards']} shard(s) {r['pairs_per_s']:.0f} pairs/s{ratio}, "
                f"{r['pairs_per_cpu_s']:.0f} pairs/cpu-s{cratio}, idle Ray {r['idle_cores']:.2f} cores, "
                f"{r['pairs_per_busy_cpu_s']:.0f} pairs per CPU-s above idle"
            )
    head = f"load {os.getloadavg()[0]:.0f}; {res['rows']} CIFAR-10 JPEGs, {a.size} px, batch {a.batch}, last pass: "
    figures = head + "; ".join(parts)
    cmd = "python benchmarks/bench_stream_vs_loader.py " + " ".join(argv if argv is not None else sys.argv[1:])
    line = f"| {common.today()} | {cpu_model()}, {os.cpu_count()} cores | `{cmd.strip()}` | {figures} |"
    res["results_line"] = line
    print(f"\nRESULTS.md: {line}")
    common.write_json(a.out, res)


if __name__ == "__main__":
    main()
