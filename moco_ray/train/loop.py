"""The per-worker MoCo training loop that Ray Train's TorchTrainer runs on every worker.

The worker receives a :class:`~moco_ray.train.spec.RunSpec` resolved on the driver. Every rank builds the model,
takes rank 0's initial state (so key encoders, queues and BN buffers start identical whatever the seeds), trains
with :func:`~moco_ray.train.step.train_step`, and reports once per epoch (a barrier); rank 0 checkpoints and
writes the run's MLflow metrics. See "GPU contract" in docs/architecture.md for what may sync with the host.
Imported only on the workers (``jobs.pretrain`` hands ``train_loop_per_worker`` to the trainer), so Ray, the data
stream and the kNN monitor are imported at the top.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from moco_ray.config import Config
from moco_ray.core.normalize import Normalizer
from moco_ray.data.decode import TooManyCorruptImages
from moco_ray.data.gpu_augment import GpuViewAugment, sources_from_bytes
from moco_ray.data.stream import iter_pairs
from moco_ray.tracking.history import EpochMetrics
from moco_ray.tracking.system_metrics import start_system_metrics, stop_system_metrics
from moco_ray.train.checkpoint import TrainState, load_state, set_rng_state
from moco_ray.train.knn_monitor import KnnMonitor
from moco_ray.train.model import build_method, sync_batchnorm
from moco_ray.train.progress import StepProgress, TimedIter, log_every
from moco_ray.train.reporting import Reporter
from moco_ray.train.schedule import lr_at, momentum_at
from moco_ray.train.spec import RunSpec
from moco_ray.train.step import MixedPrecision, build_optimizer, set_lr, train_step
from moco_ray.train.watchdog import StallWatchdog

_log = logging.getLogger(__name__)


def _quiet_report_lines() -> None:
    """Drop Ray Train's per-report INFO line from the console (it stays in the session's log files).

    RunConfig's LoggingConfig(log_level="WARNING") filters ``ray.train.*`` loggers, but "Reporting training result
    ..." comes from a logger named by its file path (``logging.getLogger(__file__)`` in Ray 2.60), which the filter
    does not match; every epoch printed a long TrainingReport repr beside the epoch line.
    """
    try:
        from ray.train.v2._internal.execution import context  # lazy: Ray Train V2's private module, not in every Ray
    except ImportError:  # a Ray without that module does not print the line either
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def seed_everything(seed: int | None, rank: int) -> None:
    """Per-rank seeds: the ranks' views and shuffles differ; the model's initial state comes from rank 0."""
    if seed is None:
        return
    s = seed * 1000 + rank
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


@torch.no_grad()
def broadcast_state(model: torch.nn.Module, src: int = 0) -> None:
    """Every parameter and buffer (key encoder, queue and pointer, BN statistics) from rank ``src`` to all ranks.

    DDP broadcasts only the module it wraps (the query encoder); MoCo's key encoder and queue would otherwise start
    rank-dependent, and shuffle-BN mixes keys from every rank.
    """
    for t in model.state_dict().values():
        dist.broadcast(t, src)


@torch.no_grad()
def mean_over_ranks_(sums: torch.Tensor, world: int) -> torch.Tensor:
    """``sums`` averaged over all ranks, in place, on ``sums``' own device (no host read).

    NCCL process groups have no CPU backend: a CPU tensor here fails with "No backend type associated with device
    type cpu" on a multi-GPU run, so the caller accumulates ``sums`` on the training device.
    """
    if world > 1:
        dist.all_reduce(sums)
        sums /= world
    return sums


class Worker:
    """One rank's training state and its per-epoch work."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec, cfg = spec, spec.config
        self.cfg = cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
        on_gpu = self.device.type == "cuda"
        if on_gpu:  # input shapes are fixed for the whole run: let cuDNN pick its fastest kernels once
            torch.backends.cudnn.benchmark = True
        self.channels_last = cfg.train.channels_last and on_gpu
        self.precision = MixedPrecision.of(cfg.train.precision, self.device)  # fp32 on CPU workers
        self.autocast = self.precision.autocast
        seed_everything(cfg.train.seed, self.rank)
        model = sync_batchnorm(build_method(cfg).to(self.device), cfg, self.device.type, self.world)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.opt = model, build_optimizer(cfg, model)
        self.start_epoch, self.global_step = 0, 0
        self.history: list[EpochMetrics] = []
        self.reporter = Reporter(spec, self.rank, self.world)
        state, why = self._restore()
        if state is not None:
            self._load(state)
        self.reporter.start(self.model, state, why)
        if self.world > 1:
            broadcast_state(self.model)
            # only what takes gradients is wrapped; the key encoder and queue are kept equal by the method itself
            ids = [self.device.index] if on_gpu else None
            self.model.wrap_trainable(lambda module: DDP(module, device_ids=ids))
        if cfg.train.compile:  # the encoder's graph; the queue and EMA bookkeeping stay eager
            self.model.wrap_trainable(torch.compile)
        self.normalize = Normalizer(cfg.data.mean, cfg.data.std, device=self.device, channels_last=self.channels_last)
        self.gpu_aug = self._gpu_augment()
        self.knn = self._knn_monitor()
        self.progress = self._step_progress()
        self.shard = ray.train.get_dataset_shard("train")
        self.watchdog = StallWatchdog(cfg.data.stall_timeout_s, self.rank)  # fails a stream that stalls

    def _restore(self) -> tuple[TrainState | None, str]:
        """The state to continue from, and why: Ray Train's checkpoint after a worker failure in this fit, else the
        driver's one choice (``spec.resume_from``, read whole on the driver), else none (the first epoch).

        ``get_checkpoint()`` names only checkpoints this fit reported: before a resumed fit the driver removes Ray
        Train's record of the earlier fits (``jobs.resume.forget_ray_record``), which named another checkpoint than
        the driver's (older, or cut short) after a killed driver.
        """
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                return load_state(d), "a worker restart"
        if self.spec.resume_from:
            return load_state(self.spec.resume_from), "resume"
        return None, "a worker restart"

    def _load(self, state: TrainState) -> None:
        # state is on the CPU (load_state's map_location): load_state_dict copies onto the model's device, and the
        # RNG states must stay CPU ByteTensors for torch.set_rng_state.
        self.model.load_state_dict(state.model)
        self.opt.load_state_dict(state.optimizer)
        self.precision.load_state_dict(state.scaler)  # fp16's loss scale continues where it was
        self.start_epoch, self.global_step = state.epoch + 1, state.global_step
        self.history = list(state.history)
        set_rng_state(state.rng_of(self.rank))

    def _gpu_augment(self) -> GpuViewAugment | None:
        if self.cfg.aug.device != "gpu":
            return None
        a = self.cfg.aug
        return GpuViewAugment(a.preset, a.image_size, a.strength, crop_min=a.crop_min)

    def _knn_monitor(self) -> KnnMonitor | None:
        if self.rank != 0 or not self.spec.knn or not self.cfg.eval.knn_every:
            return None
        return KnnMonitor.load(self.cfg)

    def _step_progress(self) -> StepProgress | None:
        """Rank 0's step-level metrics (``tracking.log_every_steps``) and progress lines (``progress_every_s``)."""
        tr = self.cfg.tracking
        every = log_every(tr.log_every_steps, self.spec.steps_per_epoch)
        if self.rank != 0 or self.reporter.run is None or not (every or tr.progress_every_s):
            return None
        t = self.cfg.train
        run = self.reporter.run
        return StepProgress(every, t.epochs, self.spec.steps_per_epoch, t.batch_size, self.device,
                            run.log_step_metrics, lambda line: _log.info(self.spec.console(line)),
                            line_seconds=tr.progress_every_s, first_step_line=not self.spec.label)  # fmt: skip

    def views(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The two normalised views of a batch, on the device.

        aug.device=gpu: the batch carries encoded bytes (``jpeg``); they are decoded on the device here and the
        corrupt flags of that decode are put into ``batch["corrupt"]``, where the epoch's count reads them.
        """
        if self.gpu_aug is not None:
            src, corrupt = sources_from_bytes(batch["jpeg"], self.gpu_aug.image_size, self.device)
            batch["corrupt"] = corrupt.to(self.device, non_blocking=True)
            q_u8, k_u8 = self.gpu_aug.pair(src)
        else:
            q_u8, k_u8 = batch["q"], batch["k"]
        return self.normalize(q_u8), self.normalize(k_u8)

    def run_epoch(self, epoch: int) -> EpochMetrics:
        """One epoch of exactly ``spec.steps_per_epoch`` steps; the metrics averaged over all ranks."""
        cfg, steps = self.cfg, self.spec.steps_per_epoch
        self.model.train()
        t0 = time.perf_counter()
        batches = TimedIter(self.watchdog.watch(iter_pairs(self.shard, cfg.per_worker_batch, steps, cfg.data)))
        sums, lr = self._train_steps(epoch, batches)
        loss, acc1, corrupt = mean_over_ranks_(sums, self.world).tolist()  # the epoch's one host-device sync
        seconds = time.perf_counter() - t0
        images = steps * cfg.train.batch_size
        self._check_corrupt(epoch, corrupt * self.world, images)
        knn = None
        if self.knn is not None and self.knn.due(epoch):
            knn = self.knn.score(self.model, self.device, self.autocast)
        return EpochMetrics(
            epoch=epoch,
            loss=loss / steps,
            acc1=acc1 / steps,
            lr=lr,
            epoch_seconds=seconds,
            images_per_s=images / seconds,
            corrupt_images=corrupt * self.world,
            # this rank's time waiting for the next batch (the stream, timed by TimedIter), and its share of the epoch
            data_wait_seconds=batches.wait,
            data_wait_frac=batches.wait / seconds,
            knn_top1=knn,
        )

    def _train_steps(self, epoch: int, batches: TimedIter) -> tuple[torch.Tensor, float]:
        """The epoch's steps. Returns the sums of loss, acc1 and corrupt images (still on the device: read once, at
        the end of the epoch) and the last step's learning rate."""
        cfg, steps = self.cfg, self.spec.steps_per_epoch
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        n, lr = 0, cfg.lr
        if self.progress is not None:
            self.progress.start_epoch(epoch, batches)
        for batch in batches:
            lr = lr_at(cfg.optim, cfg.lr, epoch, n, steps, cfg.train.epochs)
            set_lr(self.opt, lr)
            if self.model.momentum is not None:  # a method without a momentum encoder (SimCLR) has none to schedule
                self.model.momentum = momentum_at(cfg.moco, epoch, n, steps, cfg.train.epochs)
            q, k = self.views(batch)
            out = train_step(self.model, self.opt, q, k, autocast=self.autocast, scaler=self.precision.scaler)
            sums[0] += out["loss"]
            sums[1] += out["acc1"]
            if "corrupt" in batch:
                sums[2] += batch["corrupt"].sum()
            self.global_step += 1
            n += 1
            if self.progress is not None:
                self.progress.after_step(out["loss"], lr, self.global_step)
            self.spec.hooks.after_step(self.spec.run_id, self.global_step, self.rank)
        if n != steps:
            raise RuntimeError(f"worker {self.rank} took {n} steps in epoch {epoch + 1}, expected {steps}")
        return sums, lr

    def _check_corrupt(self, epoch: int, corrupt: float, images: int) -> None:
        """Warn about any corrupt image; fail above ``data.max_corrupt_fraction`` (training on grey stand-ins).

        ``corrupt`` is all-reduced, so every rank decides alike and raises together (no rank left in a collective).
        """
        n = int(round(corrupt))
        if n == 0:
            return
        limit = self.cfg.data.max_corrupt_fraction
        what = f"{n} of {images} images in epoch {epoch + 1} were corrupt ({n / images:.1%}; decoded as grey)"
        if n / images > limit:
            raise TooManyCorruptImages(
                f"data: {what}, above data.max_corrupt_fraction = {limit:g}; re-ingest the shards "
                "(`moco-ray ingest` skips bad files) or raise the limit"
            )
        if self.rank == 0:
            _log.warning(self.spec.console(f"moco-ray: warning: {what}"))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Train MoCo on this worker; rank 0 checkpoints and logs to MLflow. ``loop_config``: ``{"spec": RunSpec}``."""
    spec: RunSpec = loop_config["spec"]
    _quiet_report_lines()
    w = Worker(spec)
    w.reporter.record_worker_nodes()
    if w.rank == 0 and not spec.label:  # a phase line (a sweep's trials have the sweep's lines instead)
        _log.info(spec.console(f"moco-ray: {w.world} training worker(s) up, model built; waiting for the first batch"))
    monitor = None
    if w.rank == 0:  # MLflow's system/* metrics (CPU, memory, GPU) of rank 0's node while it trains
        monitor = start_system_metrics(spec.tracking_uri, spec.run_id, spec.config.tracking.system_metrics_interval)
    try:
        _train_epochs(w, spec)
    finally:
        stop_system_metrics(monitor)


def _train_epochs(w: Worker, spec: RunSpec) -> None:
    for epoch in range(w.start_epoch, spec.epochs):
        metrics = w.run_epoch(epoch)
        w.history.append(metrics)
        last = epoch == spec.epochs - 1
        w.reporter.report(w.model, w.opt, epoch, w.global_step, w.history, last, precision=w.precision)
        if w.rank == 0:
            # logged, not printed: Ray Train's patched print() on a worker both tees to stdout and logs, so a
            # printed line reached the driver twice; the root logger's console handler forwards it once.
            _log.info(spec.console(epoch_line(spec.config, metrics)))
        if spec.hooks.stop_after(epoch) and not last:
            break  # test-only: an interrupted run (the driver marks it KILLED; --resume continues it)


def epoch_line(cfg: Config, m: EpochMetrics) -> str:
    """Rank 0's console line for an epoch."""
    knn = f"  knn {m.knn_top1:.4f}" if m.knn_top1 is not None else ""
    return (
        f"epoch {m.epoch + 1}/{cfg.train.epochs}  loss {m.loss:.4f}  top1 {m.acc1:.3f}{knn}"
        f"  lr {m.lr:.4g}  {m.images_per_s:.0f} img/s  {m.epoch_seconds:.1f}s"
    )
