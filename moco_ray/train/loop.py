"""The per-worker MoCo training loop that Ray Train's TorchTrainer runs on every worker."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moco_ray.config import Config, load_config
from moco_ray.core.methods import backbone_of, build_method
from moco_ray.train.checkpoint import load_state, rng_state, save_state, set_rng_state
from moco_ray.train.schedule import lr_at

_log = logging.getLogger(__name__)

# Test-only hooks, passed as loop_config["test_hooks"] (never set by the CLI or the API):
#   fail_at_step: rank 0 raises InjectedFailure once when the global step reaches it (a marker file next to the
#                 checkpoints makes it fire once per run), to exercise FailureConfig restarts;
#   stop_after_epoch: every worker stops after this epoch (0-based), as an interrupted run would.


class InjectedFailure(RuntimeError):
    """Raised by the test-only fault-injection hook."""


def _device(cfg: Config) -> torch.device:
    if cfg.train.use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _quiet_report_lines() -> None:
    """Drop Ray Train's per-report INFO line from the console (it stays in the session's log files).

    RunConfig's LoggingConfig(log_level="WARNING") filters ``ray.train.*`` loggers, but "Reporting training result
    ..." comes from a logger named by its file path (``logging.getLogger(__file__)`` in Ray 2.60), which the filter
    does not match; every epoch printed a long TrainingReport repr beside the epoch line.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a Ray without that module does not print the line either
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _seed_everything(seed: int | None, rank: int) -> None:
    if seed is None:
        return
    s = seed * 1000 + rank
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    import random

    random.seed(s)


def _knn_eval(cfg: Config, model: torch.nn.Module, device: torch.device, autocast, bank, query) -> float:
    """Weighted kNN top-1 of the query backbone on the labelled split (rank 0 only)."""
    from moco_ray.evaluation.features import extract_features
    from moco_ray.evaluation.knn import knn_accuracy

    backbone = backbone_of(model)

    def batches(imgs: torch.Tensor, labels: torch.Tensor):
        for i in range(0, len(imgs), 256):
            yield imgs[i : i + 256], labels[i : i + 256]

    feats_b, labels_b = extract_features(backbone, batches(*bank), device, autocast_dtype=autocast, out_device=device)
    feats_q, labels_q = extract_features(backbone, batches(*query), device, autocast_dtype=autocast, out_device=device)
    return knn_accuracy(feats_b, labels_b, feats_q, labels_q, k=cfg.eval.knn_k, t=cfg.eval.knn_t, device=device)


def _load_knn_data(cfg: Config, loop_config: dict[str, Any]):
    """The kNN memory-bank and query splits, decoded once per run on rank 0 (None when the monitor is off)."""
    if not cfg.eval.knn_every or not loop_config.get("knn"):
        return None
    from moco_ray.data.stream import eval_arrays

    d, e = cfg.data, cfg.eval
    bank = eval_arrays(d.shards, d.knn_train_split, cfg.aug.image_size, e.knn_max_bank)[:2]
    query = eval_arrays(d.shards, d.knn_test_split, cfg.aug.image_size, e.knn_max_queries)[:2]
    return bank, query


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Train MoCo on this worker; rank 0 checkpoints and logs to MLflow.

    ``loop_config``: ``config`` (the resolved Config as a dict), ``run_id`` and ``tracking_uri`` of the MLflow
    run, ``steps_per_epoch`` (equal on every worker), ``resume_from`` (a checkpoint directory, for
    ``--resume``), ``marker_dir`` (for the test-only fault injection).
    """
    import ray.train
    from torch.nn.parallel import DistributedDataParallel as DDP

    from moco_ray.data.augment import normalize_on_device
    from moco_ray.data.stream import iter_pairs
    from moco_ray.tracking.mlflow_run import set_tags

    cfg = load_config(loop_config["config"])
    _quiet_report_lines()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device(cfg)
    on_gpu = device.type == "cuda"
    if on_gpu:  # input shapes are fixed for the whole run: let cuDNN pick its fastest kernels once
        torch.backends.cudnn.benchmark = True
    channels_last = cfg.train.channels_last and on_gpu
    autocast = torch.bfloat16 if (cfg.train.precision == "bf16" and on_gpu) else None
    _seed_everything(cfg.train.seed, rank)

    model = build_method(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        model.encoder_q.parameters(), lr=cfg.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
    )
    start_epoch, global_step, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()  # set after a worker failure: restore the last checkpoint
    ckpt_dir_ctx = checkpoint.as_directory() if checkpoint else None
    resume_dir = loop_config.get("resume_from")
    source = ckpt_dir_ctx.__enter__() if ckpt_dir_ctx else resume_dir
    try:
        if source:
            state = load_state(source, map_location=device)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start_epoch, global_step, history = state["epoch"] + 1, state["global_step"], state["history"]
            set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
            if rank == 0 and hasattr(model, "queue"):
                import hashlib

                digest = hashlib.sha256(model.queue.keys.cpu().numpy().tobytes()).hexdigest()
                set_tags(
                    loop_config["tracking_uri"],
                    loop_config["run_id"],
                    {
                        "moco_ray.restored_from_epoch": state["epoch"],
                        "moco_ray.restored_queue_sha256": digest,
                        "moco_ray.restored_queue_ptr": int(model.queue.ptr),
                    },
                )
    finally:
        if ckpt_dir_ctx:
            ckpt_dir_ctx.__exit__(None, None, None)

    _record_worker_nodes(loop_config, rank, world)
    if world > 1:  # only what takes gradients is wrapped; the key encoder and queue stay plain
        model.encoder_q = DDP(model.encoder_q, device_ids=[device.index] if on_gpu else None)
    if cfg.train.compile:  # the encoder's graph; the queue and EMA bookkeeping stay eager
        model.encoder_q = torch.compile(model.encoder_q)

    gpu_aug = None
    if cfg.aug.device == "gpu":
        from moco_ray.data.gpu_augment import GpuViewAugment

        gpu_aug = GpuViewAugment(cfg.aug.preset, cfg.aug.image_size, cfg.aug.strength)

    knn_data = _load_knn_data(cfg, loop_config) if rank == 0 else None
    steps = int(loop_config["steps_per_epoch"])
    local_batch = cfg.per_worker_batch
    shard = ray.train.get_dataset_shard("train")
    hooks = loop_config.get("test_hooks") or {}
    fail_at = int(hooks.get("fail_at_step", 0))
    marker = Path(loop_config.get("marker_dir") or tempfile.gettempdir()) / f"injected-failure-{loop_config['run_id']}"

    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64)  # loss, acc1, corrupt images
        n_steps = 0
        for batch in iter_pairs(shard, local_batch, steps, cfg.data):
            lr = lr_at(cfg.optim, cfg.lr, epoch, n_steps, steps, cfg.train.epochs)
            for g in opt.param_groups:
                g["lr"] = lr
            if gpu_aug is not None:
                imgs = batch["img"].to(device, non_blocking=True)
                q_u8, k_u8 = gpu_aug.pair(imgs)
            else:
                q_u8, k_u8 = batch["q"], batch["k"]
            im_q = normalize_on_device(q_u8, device, channels_last=channels_last)
            im_k = normalize_on_device(k_u8, device, channels_last=channels_last)
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                out = model(im_q, im_k)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            global_step += 1
            n_steps += 1
            sums[0] += out["loss"].detach().float().item()
            sums[1] += out["acc1"].detach().float().item()
            if "corrupt" in batch:
                sums[2] += float(batch["corrupt"].sum())
            if fail_at and global_step == fail_at and rank == 0 and not marker.exists():
                marker.write_text(str(global_step))
                raise InjectedFailure(f"test-only failure injected at step {global_step}")
        if n_steps != steps:
            raise RuntimeError(f"worker {rank} took {n_steps} steps in epoch {epoch}, expected {steps}")
        if world > 1:  # epoch means over all workers (rank 0 reports)
            dist.all_reduce(sums)
            sums /= world
        seconds = time.perf_counter() - t0
        metrics: dict[str, float] = {
            "epoch": epoch,
            "loss": float(sums[0] / steps),
            "acc1": float(sums[1] / steps),
            "lr": lr,
            "epoch_seconds": seconds,
            "images_per_s": steps * cfg.train.batch_size / seconds,
            "corrupt_images": float(sums[2] * world),
        }
        last = epoch == cfg.train.epochs - 1
        if knn_data is not None and ((epoch + 1) % cfg.eval.knn_every == 0 or last):
            metrics["knn_top1"] = _knn_eval(cfg, model, device, autocast, *knn_data)
        history.append(metrics)
        _report(cfg, loop_config, model, opt, epoch, global_step, history, rank, world, last)
        if rank == 0:
            # logged, not printed: Ray Train's patched print() on a worker both tees to stdout and logs, so a
            # printed line reached the driver twice; the root logger's console handler forwards it once.
            _log.info(_epoch_line(cfg, metrics))
        if hooks.get("stop_after_epoch") == epoch and not last:
            break  # test-only: an interrupted run (the driver marks it KILLED; --resume continues it)


def _record_worker_nodes(loop_config: dict[str, Any], rank: int, world: int) -> None:
    """Tag the run with the Ray node of every worker, so a multi-node run shows which nodes took part."""
    import ray

    from moco_ray.tracking.mlflow_run import set_tags

    node = ray.get_runtime_context().get_node_id()
    nodes: list[Any] = [node]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, node)
    if rank == 0:
        set_tags(loop_config["tracking_uri"], loop_config["run_id"], {"moco_ray.worker_nodes": ",".join(nodes)})


def _epoch_line(cfg: Config, m: dict[str, float]) -> str:
    knn = f"  knn {m['knn_top1']:.4f}" if "knn_top1" in m else ""
    return (
        f"epoch {int(m['epoch']) + 1}/{cfg.train.epochs}  loss {m['loss']:.4f}  top1 {m['acc1']:.3f}{knn}"
        f"  lr {m['lr']:.4g}  {m['images_per_s']:.0f} img/s  {m['epoch_seconds']:.1f}s"
    )


def _report(cfg, loop_config, model, opt, epoch, global_step, history, rank, world, last) -> None:
    """ray.train.report on every worker (it is a barrier); rank 0 attaches a checkpoint every N epochs.

    MLflow metrics are written only after the checkpoint that holds them is persisted (and from the
    checkpoint's history on restore), so a worker restart neither loses nor duplicates an epoch.
    """
    import ray.train

    from moco_ray.tracking.mlflow_run import log_epochs

    metrics = history[-1]
    do_ckpt = last or (epoch + 1) % cfg.train.checkpoint_every == 0
    # RNG states of every rank travel in rank 0's checkpoint
    rngs = [rng_state()]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    if do_ckpt and rank == 0:
        with tempfile.TemporaryDirectory() as d:
            save_state(
                d,
                {
                    "model": _plain_state_dict(model),
                    "optimizer": opt.state_dict(),
                    "epoch": epoch,
                    "global_step": global_step,
                    "rng": rngs,
                    "history": history,
                    "config": cfg.to_dict(),
                    "run_id": loop_config["run_id"],
                },
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)
    if do_ckpt and rank == 0:
        log_epochs(loop_config["tracking_uri"], loop_config["run_id"], history)


def _plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without DDP's ``module.`` prefix, so it loads into an unwrapped model."""

    def plain(k: str) -> str:
        return k.replace("_orig_mod.", "").replace("encoder_q.module.", "encoder_q.")

    return {plain(k): v.detach().cpu() for k, v in model.state_dict().items()}
