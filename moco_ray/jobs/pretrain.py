"""Driver side of a pretraining run: resolve, open the MLflow run, build the TorchTrainer, run it, log results."""

from __future__ import annotations

import contextlib
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moco_ray.config import Config, load_config
from moco_ray.core.backbone_io import backbone_of
from moco_ray.data.decode import TooManyCorruptImages
from moco_ray.data.manifest import steps_per_epoch
from moco_ray.data.stream import pair_dataset, quiet_progress
from moco_ray.jobs.local_ray import init_ray, interruption, mute_worker_logs, say
from moco_ray.jobs.resolve import (
    Prepared,
    check_local_gpus,
    check_resources,
    ingest_missing_shards,
    knn_available,
    latest_checkpoint,
    prepare,
    with_absolute_paths,
)
from moco_ray.jobs.resources import TRIAL_CPU, data_execution_options, worker_resources
from moco_ray.jobs.resume import (
    RUN_DIR_TAG,
    ResumeTarget,
    forget_ray_record,
    lock_run,
    prune_checkpoints,
    record_resume,
    release_run,
    resume_target,
)
from moco_ray.tracking.datasets import EVALUATION, TRAINING
from moco_ray.tracking.history import EpochMetrics
from moco_ray.tracking.plots import plot_training_curves
from moco_ray.tracking.run_log import RunLog, create_run, version_tags
from moco_ray.tracking.store import resolve_tracking_uri
from moco_ray.train.checkpoint import TrainState, load_state
from moco_ray.train.hooks import FaultHooks
from moco_ray.train.keep_best import Candidate
from moco_ray.train.model import build_method
from moco_ray.train.spec import RunSpec

STORAGE_TAG = "moco_ray.storage_path"
NAME_TAG = "moco_ray.ray_run_name"
ENCODER_EPOCH_TAG = "moco_ray.encoder_epoch"  # the epoch (its number, 1 = first) of the encoder artifact's checkpoint


@dataclass
class PretrainResult:
    """What a pretraining run leaves behind."""

    run_id: str
    tracking_uri: str
    metrics: dict[str, float]  # the last epoch's, by name (EpochMetrics.as_dict)
    history: list[EpochMetrics] = field(default_factory=list)
    encoder_uri: str = ""
    checkpoint_path: str = ""
    status: str = "FINISHED"


def resume_command(run_id: str, uri: str) -> str:
    """The command that continues ``run_id``: it names the tracking store when a bare ``--resume`` would look in
    another one (the store came from a config file, an override or a different environment)."""
    store = "" if uri == resolve_tracking_uri("") else f" tracking.tracking_uri={uri}"
    return f"moco-ray pretrain --resume {run_id}{store}"


class RunInterrupted(RuntimeError):
    """The run stopped before its last epoch; ``moco-ray pretrain --resume RUN_ID`` continues it."""

    def __init__(self, run_id: str, epoch: int, uri: str = "") -> None:
        super().__init__(f"run {run_id} stopped after epoch {epoch + 1}; continue with: {resume_command(run_id, uri)}")
        self.run_id, self.epoch = run_id, epoch


class RunKilled(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM / SIGHUP, routed as one) during a run: its MLflow run is KILLED, and when it has a
    checkpoint ``moco-ray pretrain --resume RUN_ID`` continues it; before its first one there is nothing to resume
    (a ``--resume`` would be refused), and the message says so instead."""

    def __init__(self, run_id: str, uri: str = "", *, resumable: bool = True) -> None:
        what = f"run {run_id} {interruption()} (KILLED)"
        if resumable:
            super().__init__(f"{what}; continue with: {resume_command(run_id, uri)}")
        else:
            super().__init__(f"{what} before its first checkpoint: nothing to resume; start it again")
        self.run_id, self.resumable = run_id, resumable


def _resumable(log: RunLog, target: ResumeTarget | None) -> bool:
    """Whether ``--resume`` would find a checkpoint: a resumed run has one, a new run once it wrote its first."""
    if target is not None:
        return True
    run_dir = log.get().data.tags.get(RUN_DIR_TAG, "")  # set once training starts (_spec)
    return bool(run_dir) and latest_checkpoint(run_dir) is not None


def _new_run(cfg: Config, prep: Prepared, parent_run_id: str | None, extra_tags: dict[str, str] | None) -> RunLog:
    tags = {
        **version_tags(),
        "world_size": str(cfg.train.num_workers),
        "device_type": "cuda" if cfg.train.use_gpu else "cpu",
        **(extra_tags or {}),
    }
    t = cfg.tracking
    return create_run(prep.tracking_uri, t.experiment, t.run_name, cfg.flat(), tags, cfg.to_yaml(), parent_run_id)


def _dataset_contexts(cfg: Config, prep: Prepared) -> dict[str, str]:
    """The splits the run reads: the training split, and the kNN monitor's splits when it runs."""
    d = cfg.data
    contexts = {d.train_split: TRAINING}
    knn = {d.knn_train_split, d.knn_test_split}
    if cfg.eval.knn_every > 0 and knn <= set(prep.manifest.splits):  # knn_available's test, without its notice
        contexts.setdefault(d.knn_train_split, EVALUATION)
        contexts.setdefault(d.knn_test_split, EVALUATION)
    return contexts


def _trainer(spec: RunSpec, callbacks: list | None, epoch_offset: int):
    from ray.train import (  # lazy: Ray Train only once a run starts (moco_ray.api imports this module, Ray-free)
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train import DataConfig as RayDataConfig  # lazy: as above
    from ray.train.torch import TorchConfig, TorchTrainer  # lazy: as above

    from moco_ray.train.loop import train_loop_per_worker  # lazy: the workers' module imports Ray Train at its top

    cfg, t = spec.config, spec.config.train
    quiet_progress()
    train = pair_dataset(
        cfg.data.shards, cfg.data.train_split, cfg.aug, seed=t.seed, epoch_offset=epoch_offset,
        limit=cfg.data.limit, map_batch_size=cfg.data.map_batch_size, manifest=spec.manifest,
        shuffle=cfg.data.shuffle,
    )  # fmt: skip
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker=worker_resources(cfg),
            placement_strategy=t.placement_strategy,
        ),
        run_config=RunConfig(
            name=Path(spec.run_dir).name,
            storage_path=spec.storage_path,
            # train.keep_best: Ray keeps every checkpoint and moco-ray prunes (the latest N and the best, which
            # Ray's CheckpointConfig cannot express: moco_ray.train.keep_best)
            checkpoint_config=CheckpointConfig(num_to_keep=None if t.keep_best else t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks or [],
            # Ray Train's per-report INFO lines ("Reporting training result ...", "Checkpoint successfully
            # created ...") bury the epoch lines; they stay in the session's ray-train-sys log files.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": train},
        dataset_config=RayDataConfig(datasets_to_split=["train"], execution_options=data_execution_options(cfg)),
    )


def run_pretraining(
    cfg: Config | str | dict | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    resume: str | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    callbacks: list | None = None,
    hooks: FaultHooks | None = None,
    prepared: Prepared | None = None,
) -> PretrainResult:
    """Run (or, with ``resume=RUN_ID``, continue) one pretraining. See :func:`moco_ray.pretrain`.

    ``prepared``: what a sweep already checked (reused when it serves this config); ``hooks``: test-only faults.
    """
    target: ResumeTarget | None = None
    if resume:  # the run's own config; an override the checkpoint cannot take, or a second driver, refused here
        target = resume_target(resume, overrides)  # holds the run dir's lock from here (released by _finish)
    try:
        cfg, prep, log = _open(target or load_config(cfg, overrides), prepared, parent_run_id, extra_tags)
    except BaseException:  # refused or stopped before training: the run is free for the next resume
        if target is not None:
            release_run(target.log.run_id)
        raise
    resume_from = target.checkpoint if target else None
    try:
        spec = _spec(cfg, prep, log, resume_from, hooks, label=cfg.tracking.run_name if parent_run_id else "")
        epoch_offset = target.epoch + 1 if target else 0
        result = _fit(_trainer(spec, callbacks, epoch_offset), log)
        return _finish(spec, log, result)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: KILLED (not FAILED), and how to continue if it can
        log.finish("KILLED")
        raise RunKilled(log.run_id, log.uri, resumable=_resumable(log, target)) from None
    finally:  # a crash or a stop frees the run dir too (an API or notebook process lives on after it)
        release_run(log.run_id)


def _open(
    run: Config | ResumeTarget, prepared: Prepared | None, parent_run_id: str | None, extra_tags: dict[str, str] | None
) -> tuple[Config, Prepared, RunLog]:
    """Everything before training, in order: the checks, Ray, then the MLflow run (``run``: a new run's config,
    or the resumed run, reopened with its record saying what runs and Ray's record of its last fit removed)."""
    target = run if isinstance(run, ResumeTarget) else None
    cfg = with_absolute_paths(target.config if target else run)
    ingest_missing_shards(cfg, prepared)  # the quickstart's first run: data.source -> data.shards, announced
    prep = prepare(cfg, prepared)  # checks only; may raise a clear error: nothing started yet
    check_local_gpus(cfg)  # a local Ray on a machine without GPUs: say so before starting it
    init_ray()
    check_resources(cfg, TRIAL_CPU if parent_run_id else 0.0)  # one clear line, not a run that never starts
    if target is None:
        log = _new_run(cfg, prep, parent_run_id, extra_tags)
        with _ended_on_error(log):
            log.log_dataset_inputs(prep.manifest, _dataset_contexts(cfg, prep))
        if parent_run_id is None:  # a sweep's trials are announced by the sweep's own lines
            say(f"moco-ray: run {log.run_id} in experiment {cfg.tracking.experiment}; "
                f"starting {cfg.train.num_workers} training worker(s) ...")  # fmt: skip
        return cfg, prep, log
    record_resume(target)  # every check passed: the run's record now says what runs (changes, config.yaml)
    target.log.reopen()
    with _ended_on_error(target.log):
        forget_ray_record(target.run_dir)  # every rank restores target.checkpoint, not Ray's record of the last fit
    return cfg, prep, target.log


@contextlib.contextmanager
def _ended_on_error(log: RunLog):
    """A run opened (RUNNING) but not yet training: a stop here ends it KILLED, an error FAILED, never RUNNING."""
    try:
        yield
    except KeyboardInterrupt:
        log.finish("KILLED")
        raise
    except BaseException:
        log.finish("FAILED")
        raise


def _spec(
    cfg: Config, prep: Prepared, log: RunLog, resume_from: str | None, hooks: FaultHooks | None, label: str = ""
) -> RunSpec:
    d = cfg.data
    name = cfg.train.name or f"moco-{log.run_id}"
    run_dir = f"{prep.storage_path.rstrip('/')}/{name}"
    try:  # a resume took it already; a first run takes it here, so a resume while it trains is refused
        lock_run(run_dir, log.run_id, "resumed" if resume_from else "trained")
    except ValueError as e:  # another live run trains in this folder (the same train.name)
        log.finish("FAILED")
        raise ValueError(f"train.name {name}: {run_dir} is in use: {e}") from None
    log.set_tags({RUN_DIR_TAG: run_dir, STORAGE_TAG: prep.storage_path, NAME_TAG: name})
    hooks = hooks or FaultHooks()
    if hooks.marker_dir is None and "://" not in prep.storage_path:
        hooks.marker_dir = prep.storage_path
    steps = steps_per_epoch(prep.manifest, d.train_split, cfg.train.batch_size, d.limit, cfg.train.max_steps_per_epoch)
    return RunSpec(
        config=cfg,
        run_id=log.run_id,
        tracking_uri=prep.tracking_uri,
        storage_path=prep.storage_path,
        run_dir=run_dir,
        manifest=prep.manifest,
        steps_per_epoch=steps,
        knn=knn_available(cfg, prep.manifest),
        resume_from=resume_from,
        hooks=hooks,
        label=label,
    )


class _SigintWatch:
    """Records a SIGINT that reaches the driver while ``trainer.fit()`` runs, whoever's handler takes it (a SIGHUP
    too: the CLI routes it to the SIGINT handler, moco_ray.jobs.local_ray.stop_signals_as_ctrl_c).

    Ray Train V2's ``fit()`` installs its own SIGINT handler (``_register_sigint_handler``, main thread only): it
    aborts the controller and then calls ``sys.exit(0)``, so the driver sees ``SystemExit`` (or, racing it, the
    controller's death), never ``KeyboardInterrupt``. Wrapping that registration lets us tell a Ctrl-C from a crash;
    the previous handler is put back afterwards (Ray's would otherwise outlive the run and ``sys.exit`` on the next
    Ctrl-C).
    """

    def __init__(self, trainer) -> None:
        self.seen = False
        self.main = threading.current_thread() is threading.main_thread()
        self.previous = signal.getsignal(signal.SIGINT) if self.main else None
        register = getattr(trainer, "_register_sigint_handler", None)
        if self.main and register is not None:
            trainer._register_sigint_handler = lambda controller: self._wrap(register, controller)

    def _wrap(self, register, controller) -> None:
        register(controller)
        theirs = signal.getsignal(signal.SIGINT)

        def handler(signum, frame) -> None:
            self.seen = True
            mute_worker_logs()  # the teardown's tracebacks would bury the resume hint
            if callable(theirs):
                theirs(signum, frame)
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)

    def restore(self) -> None:
        if self.main and self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _fit(trainer, log: RunLog):
    """``trainer.fit()``; a crash marks the run FAILED, a clean exit (Tune stopping a trial) KILLED, and a Ctrl-C
    raises KeyboardInterrupt (the caller: KILLED)."""
    watch = _SigintWatch(trainer)
    try:
        return trainer.fit()
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        if watch.seen:  # Ray's handler ended fit() with SystemExit or the aborted controller's error
            raise KeyboardInterrupt from None
        if isinstance(e, SystemExit) and e.code in (0, None):
            # Tune stopping this trial (ASHA): it ends the trainable's thread with a clean exit. Stopped, not
            # crashed; marking it FAILED raced the sweep's own KILLED and sometimes won.
            log.finish("KILLED")
            raise
        log.finish("FAILED")
        user = _user_error(e)
        if user is not None:  # a data problem the user fixes: its message, not Ray's traceback of the worker
            raise ValueError(f"run {log.run_id} FAILED: {user}") from None
        raise
    finally:
        watch.restore()


def _user_error(e: BaseException) -> TooManyCorruptImages | None:
    """The workers' TooManyCorruptImages inside Ray Train's error (``worker_failures``: rank -> the worker's
    exception, a RayTaskError whose ``cause`` is the original), if that is what ended the run."""
    for failure in getattr(e, "worker_failures", {}).values():
        cause = getattr(failure, "cause", failure)
        if isinstance(cause, TooManyCorruptImages):
            return cause
    return None


def _finish(spec: RunSpec, log: RunLog, result) -> PretrainResult:
    """Load the final checkpoint on the driver and log the encoder, plots and the checkpoint location; then the run
    dir's checkpoints beyond ``train.keep_checkpoints`` go and its lock is released."""
    try:
        return _log_final(spec, log, result)
    finally:
        release_run(spec.run_id)


def _final_state(spec: RunSpec, log: RunLog, result) -> tuple[str, TrainState]:
    """This fit's last checkpoint, or the one it resumed from when it reported none (no epoch was left to train:
    Ray's result then names no checkpoint, since the driver removed Ray's record of the earlier fits)."""
    if result.checkpoint is not None:
        path = result.checkpoint.path
        if "://" in spec.run_dir:  # Ray's path is inside its filesystem ("bucket/runs/..."): keep a loadable URI
            path = f"{spec.run_dir}/{Path(path).name}"
        with result.checkpoint.as_directory() as d:
            return path, load_state(d)
    if spec.resume_from:
        return spec.resume_from, load_state(spec.resume_from)
    log.finish("FAILED")
    raise RuntimeError(f"run {log.run_id}: training reported no checkpoint")


def _log_final(spec: RunSpec, log: RunLog, result) -> PretrainResult:
    cfg = spec.config
    ckpt_path, state = _final_state(spec, log, result)
    history = state.history
    log.log_epochs(history)  # idempotent: fills anything the workers could not write
    last_epoch = state.epoch
    log.set_tags({"moco_ray.checkpoint": ckpt_path, "moco_ray.last_epoch": last_epoch + 1})  # as the console counts
    with tempfile.TemporaryDirectory() as d:  # drawn from the checkpoint's history: the kept model's curves
        title = cfg.tracking.run_name or log.run_id
        log.log_artifact(plot_training_curves(history, Path(d) / "training_curves.png", title=title), "plots")
    best = _prune(spec, log, ckpt_path)
    if last_epoch + 1 < cfg.train.epochs:
        log.finish("KILLED")
        raise RunInterrupted(log.run_id, last_epoch, log.uri)
    model = build_method(cfg)
    model.load_state_dict(_encoder_state(log, ckpt_path, state, best).model)
    encoder_uri = log.log_trained_encoder(backbone_of(model).eval(), cfg.backbone)
    log.finish("FINISHED")
    metrics = {k: float(v) for k, v in history[-1].as_dict().items()}
    return PretrainResult(log.run_id, spec.tracking_uri, metrics, history, encoder_uri, ckpt_path)


def _prune(spec: RunSpec, log: RunLog, final: str) -> Candidate | None:
    """The checkpoints of the fits before a resume beyond ``train.keep_checkpoints`` (Ray prunes only its fit's),
    all of them with ``train.keep_best`` but the best by it, which is returned and tagged on the run; a storage that
    refuses the deletion costs disk, not the run."""
    t = spec.config.train
    try:
        best = prune_checkpoints(spec.run_dir, t.keep_checkpoints, final, t.keep_best).best
    except OSError as e:
        print(f"moco-ray: warning: old checkpoints in {spec.run_dir} not removed ({e})", flush=True)
        best = None
    if best is not None:
        log.set_tags(best.tags(t.keep_best))
    elif t.keep_best:
        print(f"moco-ray: warning: train.keep_best: no checkpoint has {t.keep_best}; the encoder is the last epoch's")
    return best


def _encoder_state(log: RunLog, final: str, state: TrainState, best: Candidate | None) -> TrainState:
    """The state whose encoder becomes the run's ``encoder/`` artifact: the best checkpoint's with
    ``train.keep_best`` (what a user asking for the best keeps, as load_best_model_at_end does elsewhere), else the
    last one's; the tag ``moco_ray.encoder_epoch`` says which epoch it is."""
    if best is not None and best.name != final.rstrip("/").rsplit("/", 1)[-1]:
        state = load_state(best.path)
    log.set_tags({ENCODER_EPOCH_TAG: state.epoch + 1})
    return state


__all__ = ["PretrainResult", "RunInterrupted", "RunKilled", "run_pretraining"]
