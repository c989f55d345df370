"""After ``fit()``: every trial's end state made MLflow's, one :class:`TrialRow` per trial.

Tune knows how a trial ended; its child run only knows what the trial managed to record. Each trial's latest
child run gets its state: finished -> FINISHED; stopped by ASHA -> KILLED + ``moco_ray.trial_state=stopped_early``;
failed -> FAILED + ``moco_ray.error`` (a run is created for a trial that failed before it had one); cut by Ctrl-C
or an outage -> KILLED, ``interrupted``. Older runs of a trial restarted on resume become KILLED too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from moco_ray.config import load_config
from moco_ray.tracking.run_log import RunLog, create_run, version_tags
from moco_ray.tuning.errors import trial_error
from moco_ray.tuning.parent import OpenSweep
from moco_ray.tuning.trial import ERROR_TAG, STATE_TAG, TRIAL_NAME_TAG, TRIAL_TAG, run_name

TRIAL_STATES = ("finished", "stopped_early", "failed", "interrupted", "pending", "not_started")
ENDED = ("finished", "stopped_early", "failed")  # states a resume does not run again


@dataclass(frozen=True)
class TrialRow:
    """One trial after reconciliation: its searched values, end state and the child run that records it."""

    trial_id: str
    params: dict[str, Any]  # the trial's searched values (Tune's trial.config)
    run_id: str  # its latest child run; "" when it never had one
    state: str  # one of TRIAL_STATES
    error: str = ""  # a failed trial's describe_error
    last_result: dict[str, Any] = field(default_factory=dict)  # Tune's last report: epoch metrics and Tune's own
    # per-epoch ``[(epoch, value)]`` of loss and the sweep's metric, read back from the child run
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return run_name(self.params)

    @property
    def epochs_done(self) -> int:
        return int(self.last_result.get("epoch", 0))  # Tune's last report: the epoch's number (1 = first)

    def final(self, metric: str) -> float | None:
        """The metric's last reported value; None when the trial never reported it."""
        v = self.last_result.get(metric)
        return float(v) if isinstance(v, int | float) else None


def reconcile(sw: OpenSweep) -> list[TrialRow]:
    """Every trial of the experiment (by id), its child runs reconciled, with its learning curves."""
    from ray.tune import ExperimentAnalysis  # lazy: ray.tune takes seconds to import; a bad sweep file is refused first

    s = sw.spec.settings
    analysis = ExperimentAnalysis(sw.exp_dir, default_metric=s.metric, default_mode=s.mode)
    children = _child_runs(sw.parent)
    rows = [_reconcile(sw, t, children.get(t.trial_id, [])) for t in sorted(analysis.trials, key=lambda t: t.trial_id)]
    return [_with_curves(sw.parent.uri, r, s.metric) for r in rows]


def _child_runs(parent: RunLog) -> dict[str, list[Any]]:
    """Child runs of the parent grouped by trial id, oldest first (a trial restarted on resume has several)."""
    out: dict[str, list[Any]] = {}
    for r in parent.children():
        out.setdefault(r.data.tags.get(TRIAL_TAG, ""), []).append(r)
    return out


def _reconcile(sw: OpenSweep, trial: Any, runs: list[Any]) -> TrialRow:
    """Set the MLflow end state of the trial's latest child run; older ones (restarted trials) become KILLED."""
    uri = sw.parent.uri
    for old in runs[:-1]:
        if old.info.status == "RUNNING":
            _end(RunLog(uri, old.info.run_id), "KILLED", {STATE_TAG: "interrupted"})
    run_id = runs[-1].info.run_id if runs else ""
    status = runs[-1].info.status if runs else None
    error = ""
    if trial.status == "ERROR":
        state, error = "failed", trial_error(trial)
        if not run_id:  # failed before its run existed (e.g. a data check in the trial): record it anyway
            run_id = _create_failed_child(sw, trial).run_id
        _end(RunLog(uri, run_id), "FAILED", {STATE_TAG: state, ERROR_TAG: error})
    elif trial.status == "TERMINATED":
        # The trainable returns only after run_pretraining marked the run FINISHED; anything else was stopped.
        state = "finished" if status == "FINISHED" else "stopped_early"
        if run_id:
            _end(RunLog(uri, run_id), None if status == "FINISHED" else "KILLED", {STATE_TAG: state})
    else:  # PENDING / RUNNING / PAUSED: the sweep stopped before this trial ended
        state = "interrupted" if run_id else "pending"
        if run_id and status == "RUNNING":
            _end(RunLog(uri, run_id), "KILLED", {STATE_TAG: state})
    return TrialRow(trial.trial_id, dict(trial.config), run_id, state, error, dict(trial.last_result or {}))


def _end(run: RunLog, status: str | None, tags: dict[str, str]) -> None:
    """Tag a trial's child run with its end state and, unless ``status`` is None, terminate it so."""
    run.set_tags(tags)
    if status:
        run.finish(status)


def _create_failed_child(sw: OpenSweep, trial: Any) -> RunLog:
    params = dict(trial.config)
    cfg = load_config(sw.spec.base_raw, {**sw.fixed, **params, "tracking.run_name": run_name(params)})
    tags = {TRIAL_TAG: trial.trial_id, TRIAL_NAME_TAG: str(trial), **version_tags()}
    name = cfg.tracking.run_name
    return create_run(sw.parent.uri, sw.experiment, name, cfg.flat(), tags, cfg.to_yaml(), sw.parent.run_id)


def _with_curves(uri: str, row: TrialRow, metric: str) -> TrialRow:
    """The row with loss and `metric` per epoch, read from its child run's MLflow history (none without a run)."""
    if not row.run_id:
        return row
    run = RunLog(uri, row.run_id)
    return replace(row, curves={k: run.metric_history(k) for k in {"loss", metric}})
