"""Driver side of a pretraining run: validate, open the MLflow run, build the TorchTrainer, run it, log results."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moco_ray.config import Config, load_config
from moco_ray.train.loop import train_loop_per_worker

RUN_DIR_TAG = "moco_ray.run_dir"
STORAGE_TAG = "moco_ray.storage_path"
NAME_TAG = "moco_ray.ray_run_name"


@dataclass
class PretrainResult:
    """What a pretraining run leaves behind."""

    run_id: str
    tracking_uri: str
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    encoder_uri: str = ""
    checkpoint_path: str = ""
    status: str = "FINISHED"


class RunInterrupted(RuntimeError):
    """The run stopped before its last epoch; ``moco-ray pretrain --resume RUN_ID`` continues it."""

    def __init__(self, run_id: str, epoch: int) -> None:
        super().__init__(
            f"run {run_id} stopped after epoch {epoch + 1}; continue with: moco-ray pretrain --resume {run_id}"
        )
        self.run_id, self.epoch = run_id, epoch


def storage_path(cfg: Config) -> str:
    p = cfg.train.storage_path or os.environ.get("MOCO_RAY_STORAGE_PATH") or str(Path.cwd() / "moco-ray-runs")
    return p if "://" in p else str(Path(p).expanduser().resolve())


def check_gpu_request(cfg: Config) -> None:
    """A GPU run on a Ray cluster without GPUs would wait forever for resources: say so instead."""
    if not cfg.train.use_gpu:
        return
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    autoscaling = os.environ.get("MOCO_RAY_ALLOW_PENDING_GPUS") == "1"
    if gpus < cfg.train.num_workers and not autoscaling:
        raise ValueError(
            f"train.use_gpu: {cfg.train.num_workers} GPU worker(s) asked for but the Ray cluster has {gpus:g} GPU(s); "
            "set train.use_gpu=false, or MOCO_RAY_ALLOW_PENDING_GPUS=1 on an autoscaling cluster"
        )


def check_writable(path: str) -> None:
    """Create-and-delete a probe file in the nearest existing directory: ``os.access`` says yes to root for any
    path, even one under a regular file or on a read-only mount, and the run would only fail at its first
    checkpoint."""
    if "://" in path:
        return
    p = Path(path)
    probe = p if p.exists() else next((q for q in p.parents if q.exists()), Path("/"))
    if not probe.is_dir():
        raise ValueError(f"train.storage_path: cannot write to {path} ({probe} is not a directory)")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ValueError(f"train.storage_path: cannot write to {path} ({e.strerror or e})") from None


def init_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (set by `ray job submit`), else to a running local one, else start one.

    Only a new local instance gets moco-ray's worker-pool size and log hook (see ``local_ray``); a running cluster
    keeps its own settings (and runs the dashboard, so the hook's warning does not occur there).
    """
    import ray

    if ray.is_initialized():
        return
    common = {"log_to_driver": True, "configure_logging": False}
    address = os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **common)
        return
    from moco_ray.train.local_ray import local_init_kwargs

    try:
        ray.init(**common, **local_init_kwargs())
    except ValueError as e:
        if "existing cluster" not in str(e):
            raise
        ray.init(**common)  # a cluster started with `ray start` on this machine: join it as it is


def prepare(cfg: Config) -> dict[str, Any]:
    """Everything checked on the driver before any cluster resource is requested."""
    from moco_ray.data.ingest import ensure_shards
    from moco_ray.data.schema import validate_shards
    from moco_ray.data.stream import check_enough_rows, steps_per_epoch
    from moco_ray.tracking.mlflow_run import check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    check_tracking_uri(uri)
    store = storage_path(cfg)
    check_writable(store)
    if not cfg.data.shards:
        raise ValueError("data.shards: no dataset given; ingest one with `moco-ray ingest SOURCE OUT`")
    ensure_shards(cfg.data.shards, cfg.data.source)
    manifest = validate_shards(cfg.data.shards)
    check_enough_rows(manifest, cfg.data.train_split, cfg.train.batch_size, cfg.data.limit)
    steps = steps_per_epoch(
        manifest, cfg.data.train_split, cfg.train.batch_size, cfg.data.limit, cfg.train.max_steps_per_epoch
    )
    return {"tracking_uri": uri, "storage_path": store, "manifest": manifest, "steps_per_epoch": steps}


def _datasets(cfg: Config, manifest, epoch_offset: int) -> dict[str, Any]:
    import ray.data

    from moco_ray.data.stream import pair_dataset

    # The epoch lines are the progress people read; per-operator bars from every epoch's execution drown them.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False

    ds = {
        "train": pair_dataset(
            cfg.data.shards,
            cfg.data.train_split,
            cfg.aug,
            seed=cfg.train.seed,
            epoch_offset=epoch_offset,
            limit=cfg.data.limit,
            map_batch_size=cfg.data.map_batch_size,
        )
    }
    return ds


def knn_available(cfg: Config, manifest) -> bool:
    """The kNN monitor needs both labelled splits; without them it is off (and said so)."""
    wanted = {cfg.data.knn_train_split, cfg.data.knn_test_split}
    ok = cfg.eval.knn_every > 0 and wanted <= set(manifest.splits)
    if cfg.eval.knn_every > 0 and not ok:
        print(f"moco-ray: kNN monitor off: the shards lack split(s) {sorted(wanted - set(manifest.splits))}")
    return ok


def _latest_checkpoint(run_dir: str) -> str | None:
    """The newest ``checkpoint_*`` directory holding a complete state file (local storage)."""
    if "://" in run_dir or not Path(run_dir).is_dir():
        return None
    from moco_ray.train.checkpoint import STATE_FILE

    cands = [p for p in Path(run_dir).glob("checkpoint_*") if (p / STATE_FILE).is_file()]
    if not cands:
        return None
    return str(max(cands, key=lambda p: (p.stat().st_mtime, p.name)))


def run_pretraining(
    cfg: Config | str | dict | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    resume: str | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    callbacks: list | None = None,
    test_hooks: dict[str, int] | None = None,
) -> PretrainResult:
    """Run (or, with ``resume=RUN_ID``, continue) one pretraining. See :func:`moco_ray.pretrain`."""
    from moco_ray.tracking import mlflow_run as mt

    resume_from = None
    if resume:
        uri = mt.resolve_tracking_uri(load_config(cfg, overrides).tracking.tracking_uri)
        run = mt.get_run(uri, resume)
        with tempfile.TemporaryDirectory() as d:
            try:
                cfg_path = mt.download_artifact(uri, resume, mt.CONFIG_FILE, d)
            except Exception:
                raise ValueError(f"run {resume} has no {mt.CONFIG_FILE} artifact: not a moco-ray pretraining") from None
            cfg = load_config(cfg_path, overrides)
        run_dir = run.data.tags.get(RUN_DIR_TAG, "")
        resume_from = _latest_checkpoint(run_dir)
        if resume_from is None:
            raise ValueError(f"run {resume}: no checkpoint found under {run_dir or '(unknown run dir)'}")
        run_id = resume
    else:
        cfg = load_config(cfg, overrides)
    if cfg.data.shards and "://" not in cfg.data.shards:
        # workers run in another cwd: a relative shard path must mean the same directory there
        cfg.data.shards = str(Path(cfg.data.shards).expanduser().resolve())
    prep = prepare(cfg)  # may raise a clear error: nothing started yet
    uri, store = prep["tracking_uri"], prep["storage_path"]
    init_ray()
    check_gpu_request(cfg)

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train import DataConfig as RayDataConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if resume:
        mt.client(uri).update_run(run_id, status="RUNNING")
    else:
        tags = {
            **mt.version_tags(),
            "world_size": str(cfg.train.num_workers),
            "device_type": "cuda" if cfg.train.use_gpu else "cpu",
            **(extra_tags or {}),
        }
        run_id = mt.create_run(
            uri,
            cfg.tracking.experiment,
            cfg.tracking.run_name,
            cfg.flat(),
            tags,
            cfg.to_yaml(),
            parent_run_id=parent_run_id,
        )
    name = cfg.train.name or f"moco-{run_id}"
    run_dir = f"{store.rstrip('/')}/{name}"
    mt.set_tags(uri, run_id, {RUN_DIR_TAG: run_dir, STORAGE_TAG: store, NAME_TAG: name})
    epoch_offset = 0
    if resume_from:
        from moco_ray.train.checkpoint import load_state

        epoch_offset = int(load_state(resume_from)["epoch"]) + 1

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "run_id": run_id,
            "tracking_uri": uri,
            "steps_per_epoch": prep["steps_per_epoch"],
            "resume_from": resume_from,
            "marker_dir": store if "://" not in store else None,
            "test_hooks": test_hooks or {},
            "knn": knn_available(cfg, prep["manifest"]),
        },
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})},
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=store,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks or [],
            # Ray Train's per-report INFO lines ("Reporting training result ...", "Checkpoint successfully
            # created ...") bury the epoch lines; they stay in the session's ray-train-sys log files.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=_datasets(cfg, prep["manifest"], epoch_offset),
        dataset_config=RayDataConfig(datasets_to_split=["train"]),
    )
    status = "FAILED"
    try:
        result = trainer.fit()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            mt.finish_run(uri, run_id, status)
    return _finish(cfg, uri, run_id, result)


def _finish(cfg: Config, uri: str, run_id: str, result) -> PretrainResult:
    """Load the final checkpoint on the driver and log the encoder, plots and the checkpoint location."""
    from moco_ray.core.methods import backbone_of, build_method
    from moco_ray.tracking import mlflow_run as mt
    from moco_ray.tracking.plots import plot_training_curves
    from moco_ray.train.checkpoint import load_state

    if result.checkpoint is None:
        mt.finish_run(uri, run_id, "FAILED")
        raise RuntimeError(f"run {run_id}: training reported no checkpoint")
    ckpt_path = result.checkpoint.path
    with result.checkpoint.as_directory() as d:
        state = load_state(d)
    history = state["history"]
    mt.log_epochs(uri, run_id, history)  # idempotent: fills anything the workers could not write
    last_epoch = int(state["epoch"])
    mt.set_tags(uri, run_id, {"moco_ray.checkpoint": ckpt_path, "moco_ray.last_epoch": last_epoch})
    with tempfile.TemporaryDirectory() as d:
        mt.client(uri).log_artifact(
            run_id,
            str(plot_training_curves(history, Path(d) / "training_curves.png", title=cfg.tracking.run_name or run_id)),
            "plots",
        )
    if last_epoch + 1 < cfg.train.epochs:
        mt.finish_run(uri, run_id, "KILLED")
        raise RunInterrupted(run_id, last_epoch)
    model = build_method(cfg)
    model.load_state_dict(state["model"])
    backbone = backbone_of(model).eval()
    encoder_uri = mt.log_trained_encoder(uri, run_id, backbone, cfg.model.arch, cfg.model.small_stem)
    mt.finish_run(uri, run_id, "FINISHED")
    metrics = {k: float(v) for k, v in history[-1].items()}
    return PretrainResult(run_id, uri, metrics, history, encoder_uri, ckpt_path)


__all__ = ["PretrainResult", "RunInterrupted", "run_pretraining"]
