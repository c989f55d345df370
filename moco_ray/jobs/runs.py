"""``moco-ray runs [EXPERIMENT]``: an experiment's runs as a table in the terminal (over ssh, without the MLflow UI);
and the run ``moco-ray pretrain --resume last`` continues.

One row per pretraining run (sweep trials and imported checkpoints included; the evaluation child runs are folded
into their run's ``eval_*`` summary metrics, so they get no row of their own). Values come from the run's params
and latest metrics; a value the run does not have is blank.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from moco_ray.config import Config, load_config, parse_overrides
from moco_ray.config_files import experiment_file
from moco_ray.jobs.evaluate import EVAL_TAG
from moco_ray.jobs.resolve import latest_checkpoint
from moco_ray.jobs.resume import RUN_DIR_TAG
from moco_ray.tracking.run_log import epochs_done
from moco_ray.tracking.store import client, open_store

# Column -> (where it comes from, its name there). The params are the config's dotted keys, the metrics the run's.
COLUMNS: dict[str, tuple[str, str]] = {
    "method": ("param", "moco.method"),
    "K": ("param", "moco.queue_size"),
    "m": ("param", "moco.momentum"),
    "T": ("param", "moco.temperature"),
    "epochs": ("param", "train.epochs"),
    "loss": ("metric", "loss"),
    "knn_top1": ("metric", "knn_top1"),
    "eval_linear_top1": ("metric", "eval_linear_top1"),
}
SORTABLE = ("start", "name", "state", *COLUMNS)
LAST = "last"  # `--resume last`
_DESCENDING = {"start", "knn_top1", "eval_linear_top1"}  # newest first, best first; loss and the rest ascend


@dataclass(frozen=True)
class RunRow:
    """One run as the table shows it (strings for params, floats for metrics, None where the run has none)."""

    run_id: str
    name: str
    state: str
    start: int  # ms since the epoch (MLflow's start_time)
    values: dict[str, str | float | None]


def experiment_runs(experiment: str, tracking_uri: str = "") -> list[RunRow]:
    """The runs of ``experiment`` (every page of MLflow's search), evaluation child runs left out.

    ValueError (one line) for an experiment the store does not have, naming the ones it does."""
    return [_row(r) for r in _runs(experiment, tracking_uri)[1] if EVAL_TAG not in r.data.tags]


def _runs(experiment: str, tracking_uri: str) -> tuple[str, list]:
    """(the resolved store URI, every MLflow run of ``experiment``: all pages of the search)."""
    uri = open_store(tracking_uri)
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in c.search_experiments())
        raise ValueError(f"no experiment {experiment!r} in {uri}; experiments there: {', '.join(names) or 'none'}")
    runs, token = [], None
    while True:
        page = c.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return uri, runs


def _row(run) -> RunRow:
    values: dict[str, str | float | None] = {}
    for col, (kind, key) in COLUMNS.items():
        values[col] = run.data.params.get(key) if kind == "param" else run.data.metrics.get(key)
    name = run.info.run_name or run.info.run_id
    return RunRow(run.info.run_id, name, run.info.status, run.info.start_time or 0, values)


def sort_rows(rows: list[RunRow], by: str = "start", reverse: bool = False) -> list[RunRow]:
    """Rows ordered by a column (``SORTABLE``); blanks last in either direction. Metrics best first (loss lowest),
    the start time newest first; ``reverse`` flips that."""
    if by not in SORTABLE:
        raise ValueError(f"--sort: {by!r} is not a column; allowed: {', '.join(SORTABLE)}")

    def key(r: RunRow):
        v = {"start": r.start, "name": r.name, "state": r.state}.get(by, r.values.get(by))
        return _number(v) if _number(v) is not None else v

    present = [r for r in rows if key(r) is not None]
    blank = [r for r in rows if key(r) is None]
    descending = (by in _DESCENDING) != reverse
    return sorted(present, key=key, reverse=descending) + blank


def _number(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def format_table(rows: list[RunRow]) -> str:
    """A plain-text table: run id, name, state, then `COLUMNS`; metrics to 4 significant digits."""
    head = ["run_id", "name", "state", *COLUMNS]
    body = [[r.run_id, r.name, r.state, *(_cell(r.values[c]) for c in COLUMNS)] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body]]
    return "\n".join(lines)


def _cell(v: str | float | None) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class LastRun:
    """The run ``--resume last`` continues: its id, name, state, last logged epoch (0-based; None before the
    first) and ``train.epochs``, and the experiment it was found in."""

    run_id: str
    name: str
    state: str
    last_epoch: int | None
    epochs: str | None
    experiment: str

    def __str__(self) -> str:
        done = "no epoch logged" if self.last_epoch is None else f"last epoch {self.last_epoch + 1} of {self.epochs}"
        return f"{self.run_id} ({self.name}, {self.state}, {done}) of experiment {self.experiment}"


def last_unfinished(experiment: str, tracking_uri: str = "") -> LastRun:
    """The newest pretraining run of ``experiment`` that ended without finishing (FAILED, KILLED, or RUNNING
    after its driver died) and has a checkpoint to continue from. A run still trained by a live driver is chosen
    too: its resume is then refused by the run dir's lock (``jobs.resume.lock_run``), as for its run id. Sweep
    trials (child runs: ``moco-ray sweep --resume`` continues them), sweep parents and imported checkpoints never
    trained here (no run dir) and are not candidates; nor is a run stopped before its first checkpoint.
    ValueError (one line, listing the experiment's runs) when there is none."""
    try:
        uri, runs = _runs(experiment, tracking_uri)
    except ValueError as e:  # no such experiment: the ones the store has
        raise ValueError(f"--resume last: {e}") from None
    top = sorted(
        (r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags and EVAL_TAG not in r.data.tags),
        key=lambda r: r.info.start_time or 0,
        reverse=True,
    )
    no_checkpoint = set()
    for r in top:
        run_dir = r.data.tags.get(RUN_DIR_TAG, "")
        if r.info.status == "FINISHED" or not run_dir:
            continue
        if latest_checkpoint(run_dir) is None:
            no_checkpoint.add(r.info.run_id)
            continue
        done = epochs_done(r)
        name = r.info.run_name or r.info.run_id
        return LastRun(r.info.run_id, name, r.info.status, done - 1 if done else None,
                       r.data.params.get("train.epochs"), experiment)  # fmt: skip
    listed = [f"{r.info.run_name or '-'} {r.info.run_id} {r.info.status}" for r in top[:8]]
    listed = [f"{s} (no checkpoint)" if r.info.run_id in no_checkpoint else s for s, r in zip(listed, top)]
    more = f", and {len(top) - 8} more (moco-ray runs {experiment})" if len(top) > 8 else ""
    raise ValueError(
        f"--resume last: no unfinished run with a checkpoint in experiment {experiment!r} ({uri}); runs, newest "
        f"first: {', '.join(listed) or 'none'}{more}"
    )


def resolve_resume(
    resume: str, config: str | Path | dict | Config, overrides: list[str] | dict[str, Any] | None
) -> tuple[str, list[str] | dict[str, Any] | None]:
    """(run id, overrides) to resume with: a run id as given; ``last``: the run :func:`last_unfinished` finds in
    the experiment and store that ``config`` (a path or a shipped name, with ``overrides``) names, said on
    stderr, with the store added to the overrides when only the config file named it (a resume reads its store
    from the overrides, as it continues the run's own config, so it would look in the default store)."""
    if resume != LAST:
        return resume, overrides
    cfg = load_config(experiment_file(config) if isinstance(config, str | Path) else config, overrides)
    found = last_unfinished(cfg.tracking.experiment, cfg.tracking.tracking_uri)
    print(f"moco-ray: resuming run {found}", file=sys.stderr, flush=True)
    uri = cfg.tracking.tracking_uri
    if not uri or "tracking_uri" in parse_overrides(overrides).get("tracking", {}):
        return found.run_id, overrides
    if isinstance(overrides, dict):
        return found.run_id, {**overrides, "tracking.tracking_uri": uri}
    return found.run_id, [*(overrides or []), f"tracking.tracking_uri={uri}"]


__all__ = [
    "COLUMNS",
    "LAST",
    "SORTABLE",
    "LastRun",
    "RunRow",
    "experiment_runs",
    "format_table",
    "last_unfinished",
    "resolve_resume",
    "sort_rows",
]
