"""Helpers shared by the benchmark scripts: machine description, JSON output, test data trees, GPU sampling.

The scripts run as ``python benchmarks/<name>.py`` (this folder is then on ``sys.path``, so ``import common``
works); tests put the folder on ``sys.path`` the same way.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import shutil
import subprocess
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CIFAR_MINI = Path(os.environ.get("MOCO_RAY_TEST_DATA", REPO.parent / "shared" / "data" / "cifar10-mini"))
IMG_EXT = (".jpg", ".jpeg", ".png")

# The --tiny model of the benchmark scripts: seconds on 2 busy CPU cores (the smoke tests' settings).
TINY_MODEL = {
    "model.arch": "resnet18",
    "model.small_stem": True,
    "model.dim": 16,
    "model.hidden_dim": 32,
    "aug.image_size": 16,
    "moco.queue_size": 32,
    "train.batch_size": 8,
}


def machine() -> str:
    """One line naming the machine: GPU (if any), CPU count and load, torch version."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cpu = platform.processor() or platform.machine()
    return f"{gpu}, {cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}"


def today() -> str:
    return datetime.date.today().isoformat()


def results_line(command: str, figures: str) -> str:
    """A row of the table in benchmarks/RESULTS.md: | date | machine | command | figures |."""
    return f"| {today()} | {machine()} | `{command.strip()}` | {figures} |"


def fmt_rate(x: float) -> str:
    """Whole numbers for real rates, two decimals for the tiny ones of CPU smoke runs."""
    return f"{x:.0f}" if x >= 10 else f"{x:.2f}"


def write_json(path: str | os.PathLike | None, obj: Any) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")  # rewritten as results come in: a killed run leaves the last whole file
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(p)


def train_files(root: Path) -> list[Path]:
    """The image files of an ImageFolder tree's ``train`` split, sorted."""
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"{root}: no train/ split (expected an ImageFolder tree train/<class>/<image>)")
    files = sorted(p for p in (root / "train").glob("*/*") if p.suffix.lower() in IMG_EXT)
    if not files:
        raise FileNotFoundError(f"{root / 'train'}: no images (.jpg/.jpeg/.png) under train/<class>/")
    return files


def repeat_imagefolder(src: Path, dst: Path, rows: int) -> Path:
    """``dst/train/<class>/NNNNNN.ext``: the train images of `src` cycled to `rows` files (hard links, else copies).

    Duplicates decode and augment exactly like the originals, which is all a throughput benchmark needs; ``rows``
    <= 0 keeps every image once. Idempotent: an existing tree with the right file count is reused.
    """
    files = train_files(src)
    rows = rows if rows > 0 else len(files)
    if (dst / "train").is_dir() and sum(1 for _ in (dst / "train").glob("*/*")) == rows:
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    for i in range(rows):
        f = files[i % len(files)]
        out = dst / "train" / f.parent.name / f"{i:06d}{f.suffix.lower()}"
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, out)
        except OSError:
            shutil.copyfile(f, out)
    return dst


def smooth_jpeg(seed: int, width: int, height: int, quality: int = 90) -> bytes:
    """A JPEG of random smooth content: colour noise at several scales, upsampled and summed.

    The coarse scales give photo-like smooth regions, the fine ones texture, so the file size and decode cost at
    q=90 are in the range of real photos of that size (flat synthetic images would decode much faster).
    """
    rng = np.random.default_rng(seed)
    acc = np.zeros((height, width, 3), dtype=np.float32)
    for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.15), (0, 0.05)):
        if cells == 0:  # pixel-level grain
            layer = rng.random((height, width, 3), dtype=np.float32)
        else:
            small = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
            layer = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32) / 255
        acc += weight * layer
    img = Image.fromarray((acc.clip(0, 1) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_jpegs(args: tuple[Path, int, int, int, int, int]) -> int:
    root, start, stop, width, height, classes = args
    total = 0
    for i in range(start, stop):
        out = root / "train" / f"c{i % classes:02d}" / f"{i:06d}.jpg"
        data = smooth_jpeg(i, width, height)
        out.write_bytes(data)
        total += len(data)
    return total


def synthetic_imagefolder(
    dst: Path, rows: int, width: int = 400, height: int = 350, classes: int = 10, workers: int = 0
) -> tuple[Path, float]:
    """``dst/train/cNN/NNNNNN.jpg``: `rows` generated JPEGs (q=90), in parallel processes.

    Returns (dst, mean bytes per file). Idempotent: an existing tree with `rows` files is reused.
    """
    if rows < 1 or width < 8 or height < 8:
        raise ValueError(f"synthetic images: rows >= 1 and sides >= 8 px needed, got {rows} x {width}x{height}")
    if (dst / "train").is_dir():
        existing = list((dst / "train").glob("*/*.jpg"))
        if len(existing) == rows:
            return dst, sum(p.stat().st_size for p in existing) / rows
        shutil.rmtree(dst)
    for c in range(classes):
        (dst / "train" / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    step = max(1, -(-rows // (workers * 4)))
    chunks = [(dst, s, min(s + step, rows), width, height, classes) for s in range(0, rows, step)]
    if workers == 1 or len(chunks) == 1:
        total = sum(map(_write_jpegs, chunks))
    else:
        with ProcessPoolExecutor(workers) as pool:
            total = sum(pool.map(_write_jpegs, chunks))
    return dst, total / rows


class GpuSampler:
    """GPU 0's utilisation (%) sampled about once a second in the background, as (unix time, percent) pairs.

    ``nvidia-smi --query-gpu=utilization.gpu -l 1`` in a subprocess when it is on PATH, else pynvml in a thread,
    else nothing (``available`` is False: CPU runs).
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self.available = False
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            cmd = ["nvidia-smi", "-i", "0", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
            cmd += ["-lms", str(int(self.interval_s * 1000))]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        else:
            try:
                import pynvml  # lazy: optional (nvidia-ml-py), only without nvidia-smi

                pynvml.nvmlInit()
                handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            except Exception:
                return self
            self._thread = threading.Thread(target=self._poll_nvml, args=(pynvml, handle), daemon=True)
        self.available = True
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _read_smi(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append((time.time(), float(line.strip())))
            except ValueError:  # "[N/A]" or a warning line
                continue

    def _poll_nvml(self, pynvml: Any, handle: Any) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append((time.time(), float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)))

    def stats(self, start: float | None = None, end: float | None = None) -> dict[str, Any]:
        """Mean and median utilisation over [start, end] (unix time; None = open), and the sample count."""
        vals = sorted(u for t, u in self.samples if (start is None or t >= start) and (end is None or t <= end))
        if not vals:
            return {"samples": 0, "mean": None, "median": None}
        return {"samples": len(vals), "mean": sum(vals) / len(vals), "median": vals[len(vals) // 2]}

    def busy_window(self) -> tuple[float, float] | None:
        """(first, last) time the GPU was above 0 %: training, without Ray's start-up and the driver's wrap-up."""
        busy = [t for t, u in self.samples if u > 0]
        return (busy[0], busy[-1]) if busy else None


def report_logger(path: str | os.PathLike, t0: float, text_path: str | os.PathLike | None = None) -> Any:
    """A Ray Train callback appending one JSON line per ``ray.train.report`` (rank 0's metrics + time) to `path`.

    With `text_path` it also appends ``epoch N  seconds S  train_s T  knn_top1 K`` lines there (S: wall seconds
    since `t0`; T: the sum of the epochs' own seconds). It runs in Ray Train's controller process on this machine,
    so live progress lands in files that can be read (``tail -f``) while the run goes on. The class is built
    inside this function so that cloudpickle ships it by value: the controller cannot import this folder.
    """
    import ray.train  # lazy: Ray only for the Ray-run benchmarks; seconds to import

    target, text, start = str(path), str(text_path) if text_path else None, float(t0)

    class ReportLog(ray.train.UserCallback):
        train_s = 0.0

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            now = time.time()
            m = metrics[0] if metrics else {}
            self.train_s += float(m.get("epoch_seconds", 0.0))
            row = {"time": now, "elapsed_s": now - start, "train_s": self.train_s, **m}
            with open(target, "a") as f:
                f.write(json.dumps(row, default=float) + "\n")
            if text:
                knn = f"{m['knn_top1']:.4f}" if "knn_top1" in m else "-"
                line = f"epoch {int(m.get('epoch', 0))}  seconds {now - start:.1f}  train_s {self.train_s:.1f}"
                with open(text, "a") as f:
                    f.write(f"{line}  knn_top1 {knn}\n")

    return ReportLog()


def read_report_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
