"""``pretrain --resume RUN_ID [overrides]``: the stopped run, its checkpoint, and what the overrides change.

A resume continues the run's own config (its ``config.yaml`` artifact). An override that would not fit the saved
state (a parameter or buffer shape, the optimizer state's layout) is refused in one line before Ray starts and
before the run is touched; any other change is printed, one line per key, and written into the run's record (a
tag listing every resume's changes, ``config.yaml`` replaced by what runs, the config it replaces kept under
``config_history/``), so MLflow shows what trained, and a later plain ``--resume`` keeps the new values.

A resume cannot lie about what it continues: one driver at a time per run dir (:func:`lock_run`), one checkpoint
chosen and read whole on the driver (:func:`chosen_checkpoint`) and restored by every rank (Ray Train's own record
of the last fit is removed first, :func:`forget_ray_record`), and the older checkpoints beyond
``train.keep_checkpoints`` removed once the fit ends (:func:`prune_checkpoints`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any

from moco_ray.config import Config, load_config
from moco_ray.data.manifest import join, resolve_fs
from moco_ray.jobs.resolve import latest_checkpoint, with_absolute_paths
from moco_ray.tracking.run_log import CONFIG_FILE, RunLog, open_run
from moco_ray.tracking.store import open_store
from moco_ray.train.checkpoint import load_state
from moco_ray.train.keep_best import Pruned, prune

RUN_DIR_TAG = "moco_ray.run_dir"  # where the run's Ray Train checkpoints are (set when training starts)
RESUME_CHANGES_TAG = "moco_ray.resume_changes"  # one line per resume that changed the config, oldest first
CONFIG_HISTORY_DIR = "config_history"  # config-<n>.yaml: the config.yaml that line n of the tag replaced
LOCK_FILE = ".moco-ray.lock"  # in the run dir: "pid host doing run_id" of the driver that holds it
# Ray Train V2's record of a run's checkpoints in the run dir (ray.train.v2._internal.constants, Ray 2.60)
RAY_RECORD = "checkpoint_manager_snapshot.json"

_OPTIMIZER_STATE = "restored from the checkpoint's optimizer state, so a new value would not apply"
_RUN_DIR = "where the run's checkpoints are written (a second directory would split them)"
# Dotted key (or "section." for a whole section) -> why the saved state fixes it. Everything else may change:
# data.* too (the same images moved, or other shards: the model's shapes do not depend on them).
FIXED_ON_RESUME: dict[str, str] = {
    "model.": "it builds the networks: parameter and buffer shapes",
    "moco.method": "the method's modules (queue, predictor, key encoder) in the checkpoint",
    "moco.queue_size": "the queue buffer's shape (K x model.dim)",
    "optim.optimizer": "the optimizer state's layout (SGD's momentum_buffer, LARS's mu)",
    "optim.momentum": _OPTIMIZER_STATE,
    "optim.weight_decay": _OPTIMIZER_STATE,
    "train.storage_path": _RUN_DIR,
    "train.name": _RUN_DIR,
}
# Fixed for a Vision Transformer only: the fixed position embedding has one row per patch of the image
FIXED_FOR_VIT: dict[str, str] = {"aug.image_size": "a ViT's position embedding has one row per patch of its image"}
NOT_COMPARED = ("tracking.",)  # how the run is found (tracking_uri) and logged, not how it trains


@dataclass(frozen=True)
class Change:
    """One config key a resume changes."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {json.dumps(self.old)} -> {json.dumps(self.new)}"


@dataclass
class ResumeTarget:
    """A stopped run ready to continue: the config it continues with (overrides applied), its handle, its newest
    checkpoint, that checkpoint's epoch (0-based, the last finished), what the overrides change, the
    ``config.yaml`` text and changes tag as the run has them now (what :func:`record_resume` keeps), and its run
    dir (locked by this process until :func:`release_run`)."""

    config: Config
    log: RunLog
    checkpoint: str
    epoch: int
    changes: list[Change] = field(default_factory=list)
    run_yaml: str = ""
    recorded: str = ""
    run_dir: str = ""


def resume_target(run_id: str, overrides: list[str] | dict[str, Any] | None) -> ResumeTarget:
    """The stopped run, checked: ValueError (one line) for a FINISHED run, one without its config or checkpoint,
    an override the saved state cannot take, a run another live driver holds, or a checkpoint that is not a whole
    moco-ray state. Nothing is written to the run here; changes are printed. On success this process holds the
    run dir's lock (:func:`lock_run`)."""
    over = load_config(None, overrides)  # only for the tracking URI: the run's config comes from MLflow
    log, run = open_run(open_store(over.tracking.tracking_uri), run_id)  # unreachable server: one line, seconds
    _refuse_finished(run_id, run.info.status)
    with tempfile.TemporaryDirectory() as d:
        try:
            cfg_path = log.download(CONFIG_FILE, d)
        except Exception:
            raise ValueError(f"run {run_id} has no {CONFIG_FILE} artifact: not a moco-ray pretraining") from None
        run_yaml = cfg_path.read_text()
        run_cfg = with_absolute_paths(load_config(cfg_path))
        cfg = with_absolute_paths(load_config(cfg_path, overrides))
    changes = config_changes(run_cfg, cfg)
    refuse_fixed(run_id, changes, vit=run_cfg.backbone.is_vit)
    run_dir = run.data.tags.get(RUN_DIR_TAG, "")
    lock_run(run_dir, run_id, "resumed")  # a second driver of this run stops here, before anything is written
    try:
        _refuse_finished(run_id, log.get().info.status)  # again, under the lock: its last holder may have finished
        checkpoint, epoch = chosen_checkpoint(run_id, run_dir)
    except BaseException:
        release_run(run_id)
        raise
    for c in changes:
        print(f"moco-ray: resume changes {c}", file=sys.stderr, flush=True)
    recorded = run.data.tags.get(RESUME_CHANGES_TAG, "")
    return ResumeTarget(cfg, log, checkpoint, epoch, changes, run_yaml, recorded, run_dir)


def _refuse_finished(run_id: str, status: str) -> None:
    if status == "FINISHED":
        raise ValueError(f"run {run_id} already FINISHED; nothing to resume (start a new run instead)")


def chosen_checkpoint(run_id: str, run_dir: str) -> tuple[str, int]:
    """The one checkpoint a resume continues from, and its epoch: the newest complete one, read whole here on the
    driver, so a file that is not a moco-ray state (a pickle that would run code, a damaged archive) is refused in
    one line before Ray starts or the run is reopened, and every rank restores this one (``RunSpec.resume_from``)."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ValueError(f"run {run_id}: no checkpoint found under {run_dir or '(unknown run dir)'}")
    try:
        return checkpoint, load_state(checkpoint).epoch
    except ValueError as e:  # NotACheckpoint: its one line, with the run it belongs to
        raise ValueError(f"run {run_id}: {e}") from None


def config_changes(run_cfg: Config, cfg: Config) -> list[Change]:
    """Keys whose value differs between the run's config and the one it would continue with, in config order."""
    old, new = run_cfg.flat(), cfg.flat()
    return [Change(k, old.get(k), v) for k, v in new.items() if not k.startswith(NOT_COMPARED) and old.get(k) != v]


def fixed_reason(key: str, vit: bool = False) -> str | None:
    """Why ``key`` cannot change on resume (of a ViT run with ``vit``), or None when it may."""
    section = key.split(".", 1)[0] + "."
    return FIXED_ON_RESUME.get(key) or FIXED_ON_RESUME.get(section) or (FIXED_FOR_VIT.get(key) if vit else None)


def refuse_fixed(run_id: str, changes: list[Change], vit: bool = False) -> None:
    """One ValueError naming every change the saved state cannot take (the trainer would fail on it mid-start,
    after Ray started and the run was reopened, with a state-dict traceback)."""
    fixed = [f"{c} ({fixed_reason(c.key, vit)})" for c in changes if fixed_reason(c.key, vit)]
    if fixed:
        raise ValueError(
            f"run {run_id}: cannot change on resume: {'; '.join(fixed)}. Drop these overrides to continue the run, "
            "or start a new run with them"
        )


def record_resume(target: ResumeTarget) -> None:
    """Make the run's record say what runs from here: a line appended to the changes tag ("after epoch N: key:
    old -> new; ..."), the replaced ``config.yaml`` kept as ``config_history/config-<n>.yaml`` (n: the line's
    number), and ``config.yaml`` replaced by the config the run continues with. MLflow params cannot change, so
    they keep the values the run started with. No change: nothing written.

    The tag goes first: if a later write fails, the old ``config.yaml`` is still in place, and the next resume
    finds the same changes and records them again, under the next number; nothing is overwritten before it is
    kept.
    """
    if not target.changes:
        return
    line = f"after epoch {target.epoch + 1}: " + "; ".join(str(c) for c in target.changes)
    lines = [*target.recorded.splitlines(), line]
    log = target.log
    log.set_tags({RESUME_CHANGES_TAG: "\n".join(lines)})
    log.log_text(target.run_yaml, f"config-{len(lines)}.yaml", CONFIG_HISTORY_DIR)
    log.log_text(target.config.to_yaml(), CONFIG_FILE)


@dataclass
class _Held:
    run_id: str
    file: IO[str]


_HELD: dict[str, _Held] = {}  # local run dir (real path) -> this process's lock on it


def _local_dir(run_dir: str) -> str | None:
    """The run dir as a local path (``file://`` URIs included), or None on remote storage."""
    if "://" not in run_dir:
        return os.path.realpath(run_dir)
    return os.path.realpath(resolve_fs(run_dir)[1]) if run_dir.startswith("file:") else None


def lock_run(run_dir: str, run_id: str, doing: str) -> None:
    """Hold the run dir's exclusive lock (``fcntl.flock`` on ``LOCK_FILE``, which names the holder) until
    :func:`release_run` or this process ends: a second driver of the same run dir (two ``--resume`` at once, or a
    resume while the first run still trains) is refused here, in one line naming the holder's pid, before it
    starts Ray or writes anything. Two drivers in one folder both trained, and one's checkpoint clean-up deleted
    the other's checkpoints. flock dies with its process, ``kill -9`` included, so a dead driver never blocks a
    resume. This process may take a lock it already holds (a run of it that ended with an exception).

    Remote run dirs (s3://, gs://, ...) are not locked: object stores have no such lock, so two drivers of one
    run there are not stopped. A shared POSIX file system is locked where it honours flock across nodes.
    """
    path = _local_dir(run_dir) if run_dir else None
    if path is None:
        return
    held = _HELD.get(path)
    if held is None:
        os.makedirs(path, exist_ok=True)
        f = open(os.path.join(path, LOCK_FILE), "a+")  # kept open: the lock lives as long as this file
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip().split(maxsplit=3)
            f.close()
            raise ValueError(_busy(run_id, holder)) from None
        held = _HELD[path] = _Held(run_id, f)
    held.run_id = run_id
    held.file.seek(0)
    held.file.truncate()
    held.file.write(f"{os.getpid()} {socket.gethostname()} {doing} {run_id}\n")
    held.file.flush()


def _busy(run_id: str, holder: list[str]) -> str:
    if len(holder) < 4:  # the holder took the lock a moment ago and has not written its name yet
        return f"run {run_id} is being trained or resumed by another process; wait for it or stop it first"
    pid, host, doing, holder_run = holder
    where = "" if host == socket.gethostname() else f" on {host}"
    return f"run {holder_run} is being {doing} by pid {pid}{where}; wait for it or stop it first"


def release_run(run_id: str) -> None:
    """Release this process's locks taken for ``run_id`` (closing the file ends the flock)."""
    for path, held in list(_HELD.items()):
        if held.run_id == run_id:
            del _HELD[path]
            held.file.close()


def forget_ray_record(run_dir: str) -> None:
    """Remove Ray Train's record of the run's checkpoints before a resumed fit starts.

    Ray Train V2 restores its own latest checkpoint into every worker (``ray.train.get_checkpoint()``) when the
    run dir has this record, whatever the driver chose: an older one when the driver was killed between a
    checkpoint's upload and Ray's registering it (the workers retrained an epoch whose metrics MLflow already had
    from the discarded branch), or one whose state file was cut short (every rank crashed). Without the record,
    ``get_checkpoint()`` names only checkpoints this fit reported, right for a worker restart, and a first start
    takes the driver's ``RunSpec.resume_from``. Ray then prunes only this fit's checkpoints: the older ones go in
    :func:`prune_checkpoints`.
    """
    fs, base = resolve_fs(run_dir)
    try:
        fs.delete_file(join(base, RAY_RECORD))
    except FileNotFoundError:
        pass


def prune_checkpoints(run_dir: str, keep: int, final: str, best_metric: str = "") -> Pruned:
    """Delete the run dir's checkpoints but ``final``, the ``keep - 1`` newest others (state file's mtime, then
    name, as :func:`latest_checkpoint` orders them) and, with ``best_metric`` (``train.keep_best``), the best by it
    (``moco_ray.train.keep_best``); returns the names deleted and the best. Ray Train keeps
    ``train.keep_checkpoints`` of the checkpoints its fit reported, not those of the fits before a resume."""
    return prune(run_dir, keep, final, best_metric)


__all__ = [
    "CONFIG_HISTORY_DIR",
    "FIXED_ON_RESUME",
    "LOCK_FILE",
    "RAY_RECORD",
    "RESUME_CHANGES_TAG",
    "RUN_DIR_TAG",
    "Change",
    "ResumeTarget",
    "chosen_checkpoint",
    "config_changes",
    "forget_ray_record",
    "lock_run",
    "prune_checkpoints",
    "record_resume",
    "refuse_fixed",
    "release_run",
    "resume_target",
]
