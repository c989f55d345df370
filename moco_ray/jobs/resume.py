"""``pretrain --resume RUN_ID [overrides]``: the stopped run, its checkpoint, and what the overrides change.

A resume continues the run's own config (its ``config.yaml`` artifact). An override that would not fit the saved
state (a parameter or buffer shape, the optimizer state's layout) is refused in one line before Ray starts and
before the run is touched; any other change is printed, one line per key, and written into the run's record (a
tag listing every resume's changes, ``config.yaml`` replaced by what runs, the config it replaces kept under
``config_history/``), so MLflow shows what trained, and a later plain ``--resume`` keeps the new values.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from moco_ray.config import Config, load_config
from moco_ray.jobs.resolve import latest_checkpoint, with_absolute_paths
from moco_ray.tracking.run_log import CONFIG_FILE, RunLog, open_run
from moco_ray.tracking.store import open_store
from moco_ray.train.checkpoint import load_state

RUN_DIR_TAG = "moco_ray.run_dir"  # where the run's Ray Train checkpoints are (set when training starts)
RESUME_CHANGES_TAG = "moco_ray.resume_changes"  # one line per resume that changed the config, oldest first
CONFIG_HISTORY_DIR = "config_history"  # config-<n>.yaml: the config.yaml that line n of the tag replaced

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
    checkpoint, that checkpoint's epoch (0-based, the last finished), what the overrides change, and the
    ``config.yaml`` text and changes tag as the run has them now (what :func:`record_resume` keeps)."""

    config: Config
    log: RunLog
    checkpoint: str
    epoch: int
    changes: list[Change] = field(default_factory=list)
    run_yaml: str = ""
    recorded: str = ""


def resume_target(run_id: str, overrides: list[str] | dict[str, Any] | None) -> ResumeTarget:
    """The stopped run, checked: ValueError (one line) for a FINISHED run, one without its config or checkpoint,
    or an override the saved state cannot take. Nothing is written to the run here; changes are printed."""
    over = load_config(None, overrides)  # only for the tracking URI: the run's config comes from MLflow
    log, run = open_run(open_store(over.tracking.tracking_uri), run_id)  # unreachable server: one line, seconds
    if run.info.status == "FINISHED":
        raise ValueError(f"run {run_id} already FINISHED; nothing to resume (start a new run instead)")
    with tempfile.TemporaryDirectory() as d:
        try:
            cfg_path = log.download(CONFIG_FILE, d)
        except Exception:
            raise ValueError(f"run {run_id} has no {CONFIG_FILE} artifact: not a moco-ray pretraining") from None
        run_yaml = cfg_path.read_text()
        run_cfg = with_absolute_paths(load_config(cfg_path))
        cfg = with_absolute_paths(load_config(cfg_path, overrides))
    changes = config_changes(run_cfg, cfg)
    refuse_fixed(run_id, changes)
    run_dir = run.data.tags.get(RUN_DIR_TAG, "")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ValueError(f"run {run_id}: no checkpoint found under {run_dir or '(unknown run dir)'}")
    for c in changes:
        print(f"moco-ray: resume changes {c}", file=sys.stderr, flush=True)
    epoch = load_state(checkpoint).epoch
    return ResumeTarget(cfg, log, checkpoint, epoch, changes, run_yaml, run.data.tags.get(RESUME_CHANGES_TAG, ""))


def config_changes(run_cfg: Config, cfg: Config) -> list[Change]:
    """Keys whose value differs between the run's config and the one it would continue with, in config order."""
    old, new = run_cfg.flat(), cfg.flat()
    return [Change(k, old.get(k), v) for k, v in new.items() if not k.startswith(NOT_COMPARED) and old.get(k) != v]


def fixed_reason(key: str) -> str | None:
    """Why ``key`` cannot change on resume, or None when it may."""
    section = key.split(".", 1)[0] + "."
    return FIXED_ON_RESUME.get(key) or FIXED_ON_RESUME.get(section)


def refuse_fixed(run_id: str, changes: list[Change]) -> None:
    """One ValueError naming every change the saved state cannot take (the trainer would fail on it mid-start,
    after Ray started and the run was reopened, with a state-dict traceback)."""
    fixed = [f"{c} ({fixed_reason(c.key)})" for c in changes if fixed_reason(c.key)]
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


__all__ = [
    "CONFIG_HISTORY_DIR",
    "FIXED_ON_RESUME",
    "RESUME_CHANGES_TAG",
    "RUN_DIR_TAG",
    "Change",
    "ResumeTarget",
    "config_changes",
    "record_resume",
    "refuse_fixed",
    "resume_target",
]
