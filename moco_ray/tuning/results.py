"""A sweep's results: the table of its trials, the best one, and what the parent run shows of them.

After ``fit()`` (moco_ray.tuning.reconcile has made every child run's end state MLflow's) the parent run gets the
results table (``sweep_results.csv``), plots (moco_ray.tuning.plots), the best trial (tags and ``best_<metric>``)
and its own end state: FINISHED when every trial ended and at least one was not a failure, FAILED when all failed,
KILLED when trials are left for ``--resume``.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from moco_ray.tracking.run_log import RunLog
from moco_ray.tuning import plots
from moco_ray.tuning.parent import OpenSweep
from moco_ray.tuning.reconcile import ENDED, TRIAL_STATES, TrialRow, reconcile
from moco_ray.tuning.space import SearchSpec, SweepSettings

RESULTS_CSV = "sweep_results.csv"


@dataclass
class SweepResult:
    """One row per trial in ``table``; ``best``: trial_id, run_id, params, metric, value (empty if none)."""

    table: pd.DataFrame
    best: dict[str, Any]
    parent_run_id: str
    experiment_path: str = ""
    complete: bool = True  # False when trials were left unfinished (continue with resume=True)
    counts: dict[str, int] = field(default_factory=dict)
    tracking_uri: str = ""  # the store of the parent run (the CLI prints its page)


def finalize(sw: OpenSweep) -> SweepResult:
    """Reconcile child runs with the trials' end states, then log the table, plots and best trial to the parent."""
    s, expected = sw.spec.settings, sw.spec.num_trials()
    rows = reconcile(sw)
    table = results_table(rows, list(sw.spec.search), s.metric, s.mode)
    counts = {str(k): int(v) for k, v in table["state"].value_counts().items()} if not table.empty else {}
    if len(rows) < expected:
        counts["not_started"] = expected - len(rows)
    # trials are generated lazily: a sweep stopped early (Ctrl-C) may not have created them all
    complete = len(rows) >= expected and all(r.state in ENDED for r in rows)
    best = pick_best(table, s.metric, s.mode)
    _log_parent(sw.parent, table, best, rows, s, sw.spec.search)
    sweep_state = _close_parent(sw.parent, complete, counts)
    print(
        f"[sweep] {sweep_state}: "
        + ", ".join(f"{v} {k}" for k, v in counts.items())
        + (f"; best {s.metric} {best['value']:.4g} (trial {best['trial_id']})" if best else ""),
        flush=True,
    )
    return SweepResult(table, best, sw.parent.run_id, sw.exp_dir, complete, counts, sw.parent.uri)


def results_table(rows: list[TrialRow], keys: list[str], metric: str, mode: str) -> pd.DataFrame:
    """One row per trial: ids, end state, searched values, final metrics (last report), best `metric` over epochs."""
    pick = max if mode == "max" else min
    recs = []
    for r in rows:
        last = r.final(metric)
        values = [v for _, v in r.curves.get(metric, [])] + ([] if last is None else [last])
        rec = {
            "trial_id": r.trial_id,
            "run_id": r.run_id,
            "state": r.state,
            **{f"param:{k}": r.params.get(k) for k in keys},
            "epochs_done": r.epochs_done,
        }
        for m in dict.fromkeys(("loss", "acc1", "knn_top1", metric)):
            v = r.final(m)
            rec[f"final_{m}"] = math.nan if v is None else v
        rec[f"best_{metric}"] = pick(values) if values else math.nan
        rec["error"] = r.error
        recs.append(rec)
    return pd.DataFrame(recs)


def pick_best(table: pd.DataFrame, metric: str, mode: str) -> dict[str, Any]:
    """The best trial by its final reported `metric`; finished trials win over ones ASHA stopped early.

    A stopped trial's last value is from an earlier epoch, so it competes only when no trial finished.
    """
    col = f"final_{metric}"
    if table.empty or col not in table:
        return {}
    scored = table[table[col].notna()]
    finished = scored[scored["state"] == "finished"]
    pool = finished if not finished.empty else scored[scored["state"] == "stopped_early"]
    if pool.empty:
        return {}
    row = pool.loc[pool[col].idxmax() if mode == "max" else pool[col].idxmin()]
    params = {k[len("param:") :]: _plain(row[k]) for k in table.columns if k.startswith("param:")}
    return {
        "trial_id": row["trial_id"],
        "run_id": row["run_id"],
        "params": params,
        "metric": metric,
        "value": float(row[col]),
        "state": row["state"],
    }


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _log_parent(
    parent: RunLog,
    table: pd.DataFrame,
    best: dict[str, Any],
    rows: list[TrialRow],
    s: SweepSettings,
    search: dict[str, SearchSpec],
) -> None:
    """The table as ``sweep_results.csv``, the plots under ``plots/``, and the best trial's tags and metric."""
    with tempfile.TemporaryDirectory() as d:
        csv = Path(d) / RESULTS_CSV
        table.to_csv(csv, index=False)
        parent.log_artifact(csv)
        out = Path(d) / "plots"
        out.mkdir()
        made = [plots.plot_metric_vs_param(table, k, s.metric, out / f"{s.metric}_vs_{k}.png") for k in search]
        grid = [k for k, sp in search.items() if sp.kind == "grid"]
        if len(grid) == 2:
            made.append(plots.plot_heatmap(table, grid[0], grid[1], s.metric, out / f"{s.metric}_heatmap.png"))
        curves = {f"{r.trial_id} {r.name}": r.curves for r in rows if r.run_id}
        made.append(plots.plot_learning_curves(curves, s.metric, out / "learning_curves.png"))
        for p in made:
            if p is not None:
                parent.log_artifact(p, "plots")
    if best:
        parent.set_tags({"best_trial_id": best["trial_id"], "best_run_id": best["run_id"]})
        parent.log_step_metrics({f"best_{s.metric}": best["value"]}, step=0)


def _close_parent(parent: RunLog, complete: bool, counts: dict[str, int]) -> str:
    """The sweep's state and trial counts as tags, and the parent's end state; returns the sweep's state."""
    sweep_state = "finished" if complete else "interrupted"
    parent.set_tags(
        {"moco_ray.sweep_state": sweep_state, **{f"moco_ray.trials_{k}": counts.get(k, 0) for k in TRIAL_STATES}}
    )
    ok = counts.get("finished", 0) + counts.get("stopped_early", 0)
    parent.finish("KILLED" if not complete else ("FINISHED" if ok else "FAILED"))
    return sweep_state
