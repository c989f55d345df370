"""``moco-ray runs [EXPERIMENT]``: an experiment's runs as a table in the terminal (over ssh, without the MLflow UI).

One row per pretraining run (sweep trials and imported checkpoints included; the evaluation child runs are folded
into their run's ``eval_*`` summary metrics, so they get no row of their own). Values come from the run's params
and latest metrics; a value the run does not have is blank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moco_ray.jobs.evaluate import EVAL_TAG
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
    uri = open_store(tracking_uri)
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in c.search_experiments())
        raise ValueError(f"no experiment {experiment!r} in {uri}; experiments there: {', '.join(names) or 'none'}")
    rows, token = [], None
    while True:
        page = c.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        rows += [_row(r) for r in page if EVAL_TAG not in r.data.tags]
        token = page.token
        if not token:
            return rows


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


__all__ = ["COLUMNS", "SORTABLE", "RunRow", "experiment_runs", "format_table", "sort_rows"]
