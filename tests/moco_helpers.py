"""Helpers shared by the tests that need a trained encoder in an MLflow run without a full Ray Train run.

A pretraining run costs minutes on 2 CPUs; these train the platform's own MoCo core for a few hundred steps in
the test process (same method, augmentation and normalisation as the trainer) and log the result with the
trainer's own logging function, so `moco-ray eval` / `export` see exactly what a finished run leaves behind.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # the benchmark scripts' `common` module, as the benchmark smoke tests use it
    sys.path.insert(0, str(BENCHMARKS))
from common import TINY_MODEL as _BENCH_TINY  # noqa: E402

# The small model most Ray tests train (the benchmarks' --tiny model: ResNet-18, small stem, 16 px, narrow heads);
# queue and batch are each test's own.
TINY_MODEL = {k: v for k, v in _BENCH_TINY.items() if k.startswith(("model.", "aug."))}


# Runs each case's argv through moco-ray's main() in one subprocess (the imports are paid once): exit code, stderr,
# whether Ray was started, seconds. A case with "start_ray" first starts a local Ray with no GPU.
_CLI_CASE_RUNNER = r"""
import contextlib, io, json, sys, time, traceback
import ray
from moco_ray.cli.main import main
import mlflow, moco_ray.jobs.pretrain, moco_ray.jobs.evaluate, moco_ray.jobs.export, moco_ray.tuning.sweep  # untimed

cases = json.loads(open(sys.argv[1]).read())
out = {}
for name, case in cases.items():
    err = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if case.get("start_ray"):  # zero GPUs whatever the hardware: the check must see a GPU-less cluster
                ray.init(address="local", num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            rc = main(case["argv"])
        except SystemExit as e:
            rc = e.code
        except BaseException:
            rc = None
            traceback.print_exc()
    out[name] = {"rc": rc, "stderr": err.getvalue(), "ray_started": ray.is_initialized(),
                 "seconds": time.monotonic() - t0}
    if ray.is_initialized():
        ray.shutdown()
open(sys.argv[2], "w").write(json.dumps(out))
"""


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: no inherited MLflow store or pending-GPU switch, ``RAY_ADDRESS=local`` so
    it starts its own Ray and never attaches to the test session's or another cluster; plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MOCO_RAY_ALLOW_PENDING_GPUS")}
    return {**env, "RAY_ADDRESS": "local", **extra}


def run_cli_cases(cases: dict[str, dict[str, Any]], workdir: Path, **env: str) -> dict[str, dict[str, Any]]:
    """``{name: {"argv": [...], "start_ray": bool}}`` through the real CLI entry point in one subprocess (cwd: the
    repository, no inherited MLflow store or pending-GPU switch, ``RAY_ADDRESS=local`` so nothing attaches to
    another cluster, plus ``env``); returns ``{name: {"rc", "stderr", "ray_started", "seconds"}}``."""
    (workdir / "cases.json").write_text(json.dumps(cases))
    full = cli_env(**env)
    # a timeout only so a hang (e.g. waiting for a GPU forever) fails the test instead of blocking the suite
    p = subprocess.run(
        [sys.executable, "-c", _CLI_CASE_RUNNER, str(workdir / "cases.json"), str(workdir / "out.json")],
        cwd=REPO,
        env=full,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads((workdir / "out.json").read_text())


def wait_for_run(uri: str, experiment: str, proc: subprocess.Popen, filter_string: str, timeout: float = 600):
    """The first run of ``experiment`` matching ``filter_string``, polled while the CLI process ``proc`` runs (its
    stderr in the failure if it ends first). A sqlite store is only opened once the CLI has created it."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    db = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        exp = (db is None or db.exists()) and c.get_experiment_by_name(experiment)
        runs = c.search_runs([exp.experiment_id], filter_string) if exp else []
        if runs:
            return runs[0]
        time.sleep(0.3)
    raise AssertionError(f"no run of {experiment!r} matched {filter_string!r} in time")


def tiny_sweep(shards: Path, tmp_path: Path, uri: str, experiment: str, search: dict, **sections: dict) -> dict:
    """A sweep spec in the tiny CPU setting of the sweep tests: ResNet-18 small stem at 16 px, 2 epochs of 2 steps
    (64 images, batch 32), one 0.25-CPU worker per trial (two trials at once leave a whole CPU for their Ray Data
    tasks), no kNN, no worker restarts, FIFO one trial at a time on the loss. ``sections`` update the sections of
    the same name key by key (``eval={"knn_every": 2}``)."""
    spec = {
        "model": {"arch": "resnet18", "small_stem": True, "dim": 16, "hidden_dim": 32},
        "moco": {"queue_size": 128, "temperature": 0.2},
        "aug": {"image_size": 16},
        "data": {"shards": str(shards), "limit": 64, "map_batch_size": 32, "shuffle_buffer": 0},
        "train": {"epochs": 2, "batch_size": 32, "num_workers": 1, "cpus_per_worker": 0.25, "max_failures": 0,
                  "storage_path": str(tmp_path / "runs")},
        "eval": {"knn_every": 0},
        "tracking": {"tracking_uri": uri, "experiment": experiment},
        "search": search,
        "sweep": {"metric": "loss", "mode": "min", "scheduler": "fifo", "max_concurrent_trials": 1, "verbose": 0},
    }  # fmt: skip
    for name, values in sections.items():
        spec.setdefault(name, {}).update(values)
    return spec


def tiny_run(shards: Path, tmp_path: Path, uri: str, experiment: str, epochs: int, **extra: Any) -> dict[str, Any]:
    """Overrides of the tiny CPU run the CLI signal and resume tests cut: the tiny model on 64 images, one step of
    batch 32 per epoch, no kNN, checkpoints under ``tmp_path/runs``; plus ``extra`` (dotted keys)."""
    return {
        "data.shards": str(shards),
        "data.limit": 64,
        "data.map_batch_size": 32,
        **TINY_MODEL,
        "moco.queue_size": 64,
        "train.epochs": epochs,
        "train.batch_size": 32,
        "train.max_steps_per_epoch": 1,
        "train.storage_path": str(tmp_path / "runs"),
        "eval.knn_every": 0,
        "tracking.tracking_uri": uri,
        "tracking.experiment": experiment,
        **extra,
    }


def config_file(overrides: dict[str, Any], tmp_path: Path) -> Path:
    """Dotted overrides written as the YAML file ``moco-ray pretrain -c`` reads (``tmp_path/tiny.yaml``)."""
    import yaml

    doc: dict = {}
    for k, v in overrides.items():
        section, key = k.split(".")
        doc.setdefault(section, {})[key] = v
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of the live processes of session ``sid`` (zombies waiting for their reaper are gone):
    a CLI started with ``start_new_session`` and every Ray process it started (Ray puts each worker in a process
    group of its own, so a group kill or a group listing misses them; the session does not)."""
    found = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            zombie = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            if os.getsid(int(name)) == sid and not zombie:
                found[int(name)] = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (ProcessLookupError, FileNotFoundError):
            pass
    return found


def left_in_session(sid: int, wait_s: float = 30.0) -> dict[int, str]:
    """The processes of session ``sid`` still alive once they had ``wait_s`` to go (Ray's workers exit when they
    see their raylet gone, a moment after the CLI)."""
    deadline = time.monotonic() + wait_s
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@contextmanager
def tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    """A real tmpfs of `size` mounted at `path`: a disk that fills up for real (ENOSPC), or, after
    `remount_read_only`, a read-only one (EROFS) that even root cannot write. Skips the test where mounting is not
    allowed (it needs root with CAP_SYS_ADMIN: chmod would not stop root, so there is no honest stand-in)."""
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode}); needs root with CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def sweep_file(spec: dict, tmp_path: Path) -> Path:
    """``spec`` written as ``tmp_path/sweep.yaml`` (what ``moco-ray sweep -c`` reads)."""
    import yaml

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def free_port() -> int:
    """A free TCP port on the loopback (for a test's own torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows L2-normalised (features as kNN and the probe expect them)."""
    return torch.nn.functional.normalize(x, dim=1)


def gaussian_clusters(n_per_class: int, classes: int, dim: int, noise: float, seed: int):
    """Unit-norm features of ``classes`` Gaussian clusters (random centres) and their labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return unit_rows(x), labels


def copy_balanced_subset(root: Path, out: Path, per_class: dict[str, int]) -> Path:
    """Copy the first ``per_class[split]`` files (sorted) of every class of each split of ``root`` to ``out``."""
    for split, n in per_class.items():
        for cls_dir in sorted((root / split).iterdir()):
            if not cls_dir.is_dir():
                continue
            dst = out / split / cls_dir.name
            dst.mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                shutil.copyfile(f, dst / f.name)
    return out


def train_moco_steps(cfg, images: torch.Tensor, steps: int, seed: int = 0) -> torch.nn.Module:
    """``steps`` SGD steps of ``cfg``'s method on random batches of ``images`` (uint8 [N,3,S,S]); returns it.

    Batches of ``cfg.train.batch_size`` are drawn with replacement and trained at the config's scaled ``cfg.lr``;
    views come from the trainer's CPU augmentation at ``cfg.aug`` and are normalised as on a training device.
    Deterministic given ``seed`` (the initial weights too: ``torch.manual_seed(seed)`` before the model is built).
    """
    from moco_ray.data.augment import build_view_augment, normalize_on_device
    from moco_ray.train.model import build_method
    from moco_ray.train.step import build_optimizer, train_step

    torch.manual_seed(seed)
    model = build_method(cfg).train()
    opt = build_optimizer(cfg, model)
    aug = build_view_augment(cfg.aug.preset, cfg.aug.image_size, cfg.aug.strength)
    gen = torch.Generator().manual_seed(seed)
    batch = cfg.train.batch_size
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        q, k = zip(*(aug.pair(img, gen) for img in images[idx]))
        train_step(model, opt, normalize_on_device(torch.stack(q), "cpu"), normalize_on_device(torch.stack(k), "cpu"))
    return model


def log_like_trainer(uri: str, cfg, backbone, name: str) -> str:
    """A FINISHED run as the trainer leaves it: params, config.yaml and (unless ``backbone`` is None) the encoder."""
    from moco_ray.tracking.run_log import create_run, version_tags

    log = create_run(uri, cfg.tracking.experiment, name, cfg.flat(), version_tags(), cfg.to_yaml())
    if backbone is not None:
        log.log_trained_encoder(backbone.eval(), cfg.model.arch, cfg.model.small_stem)
    log.finish("FINISHED")
    return log.run_id


class FakeClock:
    """A clock for progress tests: callable like ``time.monotonic``, advanced by setting ``t``."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t
