"""Shuffle fidelity of the view-pair stream: how much consecutive epochs' batches repeat, and what each order costs.

Issue #36. The official loaders draw a new random permutation of the whole data set every epoch; for contrastive
learning the batch composition is part of the recipe (shuffle-BN's statistics, the queue's freshness). The figure
is the co-batch fraction (`moco_ray.data.shuffle_quality`): of the image pairs that share a batch in one epoch, the
fraction that share one in the next, against its value under a full random permutation, ``(B-1)/(N-1)``.

Each scheme (``SHUFFLE:BUFFER``: ``data.shuffle`` and the local shuffle buffer of ``iter_torch_batches``) runs two
consecutive epochs of `pair_dataset` consumed by `iter_pairs`, as training consumes them (``keep_id`` adds the row
ids; same for every scheme): the co-batch fraction of the two epochs' id orders, and the second epoch's pairs/s
(wall clock) and pairs per CPU-second (this process and all its descendants, Ray's included), plus the seconds
to its first batch (the full shuffle's barrier: it reads the whole split before the first view task), and the CPU
seconds of the shuffle tasks and of the view tasks from Ray Data's stats (the load of other processes does not
move these). The first
scheme is the baseline (default ``files:1024``: the order before issue #36); every repeat runs all schemes in
a rotated order with its own seed (the seed of the order and the views), and ratios to the baseline are taken
within a repeat, then summarised over repeats.

Layouts: ``one``: the split in one Parquet shard (CIFAR-10's 50,000 rows at the default 64 MB shard size);
``many``: shards of ``--rows-per-shard`` rows (580: ImageNet's ~110 KB images at 64 MB).

Usage: PYTHONPATH=. python benchmarks/bench_shuffle.py [--rows 0] [--repeats 3] [--layouts one,many]
Prints a table and a line to paste into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moco_ray.config import AugConfig, DataConfig
from moco_ray.data.ingest import ingest
from moco_ray.data.manifest import read_manifest, steps_per_epoch
from moco_ray.data.shuffle_quality import co_batch_fraction, expected_co_batch_fraction
from moco_ray.data.stream import iter_pairs, pair_dataset, quiet_progress
from moco_ray.jobs.local_ray import local_init_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_stream_vs_loader import Pass, cifar_root  # noqa: E402
from bench_views import cpu_model  # noqa: E402


@dataclass(frozen=True)
class Scheme:
    """One epoch order: ``data.shuffle`` and the local shuffle buffer (rows) of iter_torch_batches."""

    shuffle: str
    buffer: int

    @property
    def label(self) -> str:
        return f"{self.shuffle}:{self.buffer}"

    @classmethod
    def parse(cls, spec: str) -> Scheme:
        shuffle, _, buf = spec.partition(":")
        if shuffle not in ("full", "files") or not buf.isdigit():
            raise ValueError(f"--schemes: {spec!r} is not SHUFFLE:BUFFER (SHUFFLE full or files, BUFFER rows >= 0)")
        return cls(shuffle, int(buf))


def run_scheme(shards: Path, scheme: Scheme, a: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Two consecutive epochs (executions) of one stream: their co-batch fraction and the second's rates."""
    rows = read_manifest(shards).rows("train")
    steps = steps_per_epoch(read_manifest(shards), "train", a.batch)
    aug = AugConfig(preset="v2", image_size=a.size)
    ds = pair_dataset(str(shards), "train", aug, seed=seed, keep_id=True, shuffle=scheme.shuffle)
    orders: list[list[str]] = []
    for _ in range(2):
        order: list[str] = []
        first = None
        with Pass() as p:
            for b in iter_pairs(ds, a.batch, steps, DataConfig(), shuffle_buffer=scheme.buffer):
                first = time.perf_counter() - p.t0 if first is None else first
                order += b["id"]
        orders.append(order)
    expected = expected_co_batch_fraction(rows, a.batch)
    cb = co_batch_fraction(orders[0], orders[1], a.batch)
    cpu = stage_cpu_s(ds.stats())
    shuffle_cpu = sum(v for k, v in cpu.items() if "Shuffle" in k)
    views_cpu = sum(v for k, v in cpu.items() if "make_pairs" in k)
    stages = {"shuffle_cpu_s": shuffle_cpu, "views_cpu_s": views_cpu, "stage_cpu_s": cpu}
    return {**p.rates(len(order)), "first_batch_s": first, "co_batch": cb, "vs_random": cb / expected, **stages}


def stage_cpu_s(stats: str) -> dict[str, float]:
    """CPU seconds of each Ray Data operator of the last execution, from ``Dataset.stats()``'s "Remote cpu time"
    totals: what the shuffle itself costs beside the view tasks, without the machine's other load."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    out: dict[str, float] = {}
    name = ""
    for line in stats.splitlines():
        if m := re.match(r"\s*(?:Sub)?[Oo]perator \d+ (.+?):", line):
            name = m.group(1)
        elif name and (m := re.search(r"Remote cpu time: .* ([\d.]+)(us|ms|s) total", line)):
            out[name] = out.get(name, 0.0) + float(m.group(1)) * units[m.group(2)]
    return out


def prepare(a: argparse.Namespace, work: Path) -> dict[str, Path]:
    """The tree cut to --rows, ingested once per layout (reused when already there)."""
    tree = common.repeat_imagefolder(cifar_root(a, work), work / f"tree-{a.rows}", a.rows)
    files = common.train_files(tree)
    mean = sum(f.stat().st_size for f in files) / len(files)
    sizes = {"one": 1024.0, "many": a.rows_per_shard * mean / 2**20}
    out = {}
    for layout in a.layouts:
        shards = work / f"shards-{a.rows}-{layout}-{a.rows_per_shard}"
        if not (shards / "manifest.json").is_file():
            ingest(tree, shards, shard_size_mb=sizes[layout], progress=False)
        out[layout] = shards
    return out


def summarise(runs: list[dict[str, Any]], baseline: str) -> dict[str, Any]:
    """Per (layout, scheme): co-batch fraction and its ratio to the random expectation (mean, min, max over
    repeats), pairs/s and its ratio to the baseline of the same repeat and layout."""
    out: dict[str, Any] = {}
    for r in runs:
        base = next(b for b in runs if (b["layout"], b["repeat"], b["scheme"]) == (r["layout"], r["repeat"], baseline))
        r["speed_vs_baseline"] = r["pairs_per_s"] / base["pairs_per_s"]
        r["cpu_vs_baseline"] = r["pairs_per_cpu_s"] / base["pairs_per_cpu_s"]
    for key in sorted({(r["layout"], r["scheme"]) for r in runs}):
        rs = [r for r in runs if (r["layout"], r["scheme"]) == key]
        stat = {k: _spread([r[k] for r in rs]) for k in ("co_batch", "vs_random", "pairs_per_s", "first_batch_s")}
        stat |= {k: _spread([r[k] for r in rs]) for k in ("speed_vs_baseline", "cpu_vs_baseline")}
        stat |= {k: _spread([r[k] for r in rs]) for k in ("shuffle_cpu_s", "views_cpu_s")}
        out[f"{key[0]} {key[1]}"] = stat
    return out


def _spread(xs: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(xs)), "min": float(np.min(xs)), "max": float(np.max(xs))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    layouts = prepare(a, work)
    schemes = [Scheme.parse(s) for s in a.schemes.split(",")]
    torch.set_num_threads(1)
    import ray  # lazy: seconds to import; only once the data is ready

    started = not ray.is_initialized()
    if started:
        kw = local_init_kwargs(a.cpus)
        kw["_system_config"] = {**kw["_system_config"], "worker_niceness": a.ray_nice}
        ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, **kw)
    quiet_progress()
    loads, runs = [os.getloadavg()[0]], []
    try:
        for rep in range(a.repeats):
            for layout, shards in layouts.items():
                for i in range(len(schemes)):
                    s = schemes[(i + rep) % len(schemes)]  # rotated: load drift spreads over the schemes
                    r = run_scheme(shards, s, a, seed=rep)
                    runs.append({"layout": layout, "scheme": s.label, "repeat": rep, **r})
                    loads.append(os.getloadavg()[0])
                    print(f"repeat {rep} {layout} {s.label}: " + _brief(r), flush=True)
    finally:
        if started:
            ray.shutdown()
    res = {"rows": {k: read_manifest(v).rows("train") for k, v in layouts.items()}, "batch": a.batch, "runs": runs}
    res |= {"load": _spread(loads), "summary": summarise(runs, schemes[0].label), "baseline": schemes[0].label}
    res["shards"] = {k: len(read_manifest(v).shards_of("train")) for k, v in layouts.items()}
    report(res, a, argv)
    return res


def _brief(r: dict[str, Any]) -> str:
    return (
        f"co-batch {r['co_batch']:.4f} ({r['vs_random']:.2f}x random), {r['pairs_per_s']:.0f} pairs/s, "
        f"{r['pairs_per_cpu_s']:.0f} pairs/cpu-s, first batch {r['first_batch_s']:.1f} s"
    )


def report(res: dict[str, Any], a: argparse.Namespace, argv: list[str] | None) -> None:
    parts = []
    for key, s in res["summary"].items():
        layout = key.split()[0]
        exp = expected_co_batch_fraction(res["rows"][layout], a.batch)
        cb, sp = s["co_batch"], s["speed_vs_baseline"]
        parts.append(
            f"{key}: co-batch {cb['mean']:.4f} ({cb['min']:.4f}-{cb['max']:.4f}; random {exp:.4f}, "
            f"x{s['vs_random']['mean']:.2f}), {s['pairs_per_s']['mean']:.0f} pairs/s "
            f"(x{sp['mean']:.2f} of {res['baseline']}, {sp['min']:.2f}-{sp['max']:.2f}; per CPU-s "
            f"x{s['cpu_vs_baseline']['mean']:.2f}), first batch {s['first_batch_s']['mean']:.1f} s, shuffle tasks "
            f"{s['shuffle_cpu_s']['mean']:.2f} CPU-s beside {s['views_cpu_s']['mean']:.1f} in view tasks"
        )
    ld = res["load"]
    shards = ", ".join(f"{k} {n} shard(s) of {res['rows'][k]} rows" for k, n in res["shards"].items())
    head = f"load {ld['min']:.1f}-{ld['max']:.1f}; {shards}; {a.size} px, batch {a.batch}, {a.repeats} repeats: "
    cmd = "python benchmarks/bench_shuffle.py " + " ".join(argv if argv is not None else sys.argv[1:])
    line = f"| {common.today()} | {cpu_model()}, {os.cpu_count()} cores | `{cmd.strip()}` | {head}{'; '.join(parts)} |"
    res["results_line"] = line
    print(f"\nRESULTS.md: {line}")
    common.write_json(a.out, res)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="", help="ImageFolder tree (default: cifar10-full from shared/data)")
    ap.add_argument("--rows", type=int, default=0, help="train images used (0 = all; cycled/cut from the tree)")
    ap.add_argument("--size", type=int, default=32, help="view side in px")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layouts", type=lambda s: s.split(","), default=["one", "many"], help="one, many")
    ap.add_argument("--rows-per-shard", type=int, default=580, help="shard size of the many-shard layout")
    ap.add_argument("--schemes", default="files:1024,full:0,files:16384", help="SHUFFLE:BUFFER,...; first = baseline")
    ap.add_argument("--ray-nice", type=int, default=0, help="Ray worker niceness (see bench_stream_vs_loader.py)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "bench_shuffle"))
    ap.add_argument("--out", default="", help="JSON results file")
    a = ap.parse_args(argv)
    if not set(a.layouts) <= {"one", "many"}:
        ap.error(f"--layouts: {','.join(a.layouts)}; allowed: one, many")
    return a


if __name__ == "__main__":
    main()
