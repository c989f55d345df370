"""Ray Tune sweeps over config keys (K, m, T, augmentation strength, ...) with parent/child MLflow runs.

``run_sweep(FILE)`` validates the sweep (see moco_ray.tuning.space for the YAML format) before Ray starts,
creates the parent MLflow run, and runs one trial per search point: each a full TorchTrainer pretraining whose
child run carries ``mlflow.parentRunId`` and ``moco_ray.trial_id``. Worker reports reach Tune through
TuneReportCallback, so ASHA can stop poor trials early. Afterwards the driver reconciles every trial's child run
(finished -> FINISHED; stopped by ASHA -> KILLED + ``moco_ray.trial_state=stopped_early``; failed -> FAILED +
``moco_ray.error``) and logs the results table, plots and the best trial to the parent.

``resume=True`` restores the Tune experiment (``<storage_path>/<name>``): finished and failed trials are not
run again, unfinished ones start over, and the same parent run is reused (its id is kept in the experiment dir).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from moco_ray.config import absolute
from moco_ray.envvars import scoped_env
from moco_ray.jobs.local_ray import DropMessage, drop_messages, init_ray, muted_on_sigint
from moco_ray.jobs.resolve import Prepared, check_resources, prepare, with_absolute_paths
from moco_ray.jobs.resources import TRIAL_CPU
from moco_ray.tracking.run_log import RunLog, create_run, open_run, version_tags
from moco_ray.tracking.store import client
from moco_ray.train.hooks import FaultHooks
from moco_ray.tuning import report
from moco_ray.tuning.cleanup import remove_orphaned_placement_groups
from moco_ray.tuning.outage import TrackingOutage, TrackingWatch
from moco_ray.tuning.space import SweepSettings, SweepSpec, asha_horizon, load_sweep, parse_search, settings_from
from moco_ray.tuning.trial import (
    ERROR_TAG,
    STATE_TAG,
    SWEEP_NAME_TAG,
    SWEEP_TAG,
    TRIAL_NAME_TAG,
    TRIAL_TAG,
    make_trainable,
    run_name,
)

PARENT_FILE = "moco_ray_parent_run.txt"
STATE_FILE = "moco_ray_sweep.json"
RESULTS_CSV = "sweep_results.csv"
TRIAL_STATES = ("finished", "stopped_early", "failed", "interrupted", "pending", "not_started")


@dataclass
class SweepResult:
    """One row per trial in ``table``; ``best``: trial_id, run_id, params, metric, value (empty if none)."""

    table: pd.DataFrame
    best: dict[str, Any]
    parent_run_id: str
    experiment_path: str = ""
    complete: bool = True  # False when trials were left unfinished (continue with resume=True)
    counts: dict[str, int] = field(default_factory=dict)


def _fs(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path)


def _write(path: str, text: str) -> None:
    fs, p = _fs(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def _read(path: str) -> str | None:
    import pyarrow.fs

    fs, p = _fs(path)
    if fs.get_file_info(p).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def _tune_env(verbose: int) -> contextlib.AbstractContextManager[None]:
    """Tune's switches for the length of ``fit()``, read by Tune in the driver.

    - ``TUNE_DISABLE_STRICT_METRIC_CHECKING``: knn_top1 comes every eval.knn_every epochs only; Tune would otherwise
      fail a trial on the first report without it (the metric name is validated before Ray starts).
    - ``RAY_AIR_NEW_OUTPUT=0`` at ``sweep.verbose: 0``: Ray 2.60's new output engine prints its "Configuration for
      experiment" box, "View detailed results here" and a TensorBoard hint at every verbosity
      (``TuneTerminalReporter.experiment_started``); the legacy reporter at 0 prints nothing, leaving the console
      to the ``[sweep i/n]`` lines. Verbosity 1-3 keep the new engine's tables.
    """
    env = {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1", **({"RAY_AIR_NEW_OUTPUT": "0"} if verbose == 0 else {})}
    return scoped_env(env)


class _SweepCallback:
    """Tune callback (driver side): one line per trial that ends, freeing the placement groups of stopped trials
    (moco_ray.tuning.cleanup), and stopping the sweep as Ctrl-C does when ``watch`` says the tracking server is
    gone (moco_ray.tuning.outage). Made lazily: ray.tune imports are slow."""

    @staticmethod
    def make(metric: str, total: int, watch: TrackingWatch):
        import signal
        import time

        from ray.tune import Callback

        from moco_ray.tuning.cleanup import remove_orphaned_placement_groups

        class SweepCallback(Callback):
            def __init__(self) -> None:
                self.metric, self.total, self.ended, self.next_check = metric, total, 0, 0.0

            def on_step_begin(self, iteration, trials, **info) -> None:
                if not watch.down and watch.poll():
                    # Tune's own SIGINT handling (main thread, where fit() runs its loop): trials left RUNNING or
                    # PENDING stay unfinished in the experiment state, so --resume reruns them
                    print("[sweep] stopping: the running trials are cut and kept for --resume", flush=True)
                    signal.raise_signal(signal.SIGINT)
                # a stopped trial's actor dies shortly after Tune's decision: look again every few seconds
                if time.monotonic() >= self.next_check:
                    self.next_check = time.monotonic() + 5.0
                    remove_orphaned_placement_groups()

            def _line(self, trial, what: str, why: str = "") -> None:
                self.ended += 1
                self.next_check = 0.0
                res = trial.last_result or {}
                value = res.get(self.metric)
                shown = f"  {self.metric} {value:.4g}" if isinstance(value, int | float) else ""
                epochs = f" after {int(res['epoch']) + 1} epoch(s)" if "epoch" in res else ""
                print(
                    f"[sweep {self.ended}/{self.total}] trial {trial.trial_id} ({run_name(trial.config)}) "
                    f"{what}{epochs}{shown}{why}",
                    flush=True,
                )

            def on_trial_complete(self, iteration, trials, trial, **info) -> None:
                self._line(trial, "ended")

            def on_trial_error(self, iteration, trials, trial, **info) -> None:
                self._line(trial, "FAILED", f": {_trial_error(trial)}")

        return SweepCallback()


# Ray Tune's driver-side lines that moco-ray's own replace: a failed trial's traceback (the sweep prints the trial's
# error in one line; the child run keeps it as a tag), and on Ctrl-C Tune's summary and its advice to call
# Tuner.restore (moco-ray prints the `moco-ray sweep ... --resume` that does that). Tune's other lines still show.
TUNE_LINES_REPLACED = {
    "ray.tune.execution.tune_controller": ("Trial task failed for trial",),
    "ray.tune.tune": ("Trials did not complete", "Experiment has been interrupted"),
}


def _quiet_tune_logs() -> None:
    for name, prefixes in TUNE_LINES_REPLACED.items():
        drop_messages(name, *prefixes)


def _scheduler(s: SweepSettings, epochs: int):
    if s.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_t, stop_last = asha_horizon(s, epochs)
    # One report per epoch, so training_iteration counts epochs (epoch itself is 0-based).
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_t,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
        stop_last_trials=stop_last,
    )


def _search_alg(s: SweepSettings):
    if s.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=s.seed)
    if s.seed is not None:
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=s.seed)
    return None


def auto_concurrency(cfg, view=None, limit: int = 1024) -> int:
    """Trials the cluster can run at once when sweep.max_concurrent_trials is 0: as many as
    moco_ray.jobs.resources packs onto its nodes (or the nodes its autoscaler may add), each trial's Train workers,
    its data-stream CPUs (data.cpus) and its trainable's TRIAL_CPU included.

    The trainables request almost nothing, so Tune cannot limit them by resources: without a limit every trial
    would start and its TorchTrainer wait for workers. ``limit``: the sweep's trial count (no use counting past it).
    """
    from moco_ray.jobs.resources import current_view, max_runs, needs_of

    return max(1, max_runs(needs_of(cfg, TRIAL_CPU), view or current_view(), limit))


def check_concurrency(cfg, wanted: int, view=None) -> None:
    """An explicit sweep.max_concurrent_trials may exceed what fits (the extra trials wait for workers), but the
    trials that do start must leave a whole CPU for their streams, or none of them ever gets a batch."""
    from dataclasses import replace

    from moco_ray.jobs.resources import capacity, current_view, needs_of, place_run

    view = view or current_view()
    needs = needs_of(cfg, TRIAL_CPU)
    free = capacity(view, needs, wanted)
    started = 0
    while started < wanted and place_run(replace(needs, data_cpus=0), free):
        started += 1
    if started and not any(n.get("CPU", 0) >= 1 for n in free):
        raise ValueError(
            f"sweep.max_concurrent_trials: {started} trials' workers at once leave no whole CPU for their data "
            f"streams ({view.describe()}); set sweep.max_concurrent_trials=0 (auto: "
            f"{auto_concurrency(cfg, view, wanted)}) or lower train.cpus_per_worker"
        )


def _concurrency(s: SweepSettings, cfg, trials: int) -> int:
    if s.max_concurrent_trials:
        check_concurrency(cfg, s.max_concurrent_trials)
        return s.max_concurrent_trials
    n = auto_concurrency(cfg, limit=max(1, trials))
    print(f"[sweep] {n} trial(s) at once (what the cluster fits; sweep.max_concurrent_trials=N sets it)", flush=True)
    return n


def _parent_params(spec: SweepSpec) -> dict[str, Any]:
    params = {f"sweep.{k}": v for k, v in asdict(spec.settings).items()}
    params.update({f"search.{k}": s.describe() for k, s in spec.search.items()})
    params.update(spec.base.flat())
    return params


@dataclass
class _Sweep:
    """A sweep resolved on the driver: its spec, checked store and shards, Tune directory and parent run."""

    spec: SweepSpec
    prep: Prepared
    root: str
    exp_dir: str
    experiment: str
    parent: RunLog
    base_raw: dict[str, Any]
    fixed: dict[str, Any]


def _open_sweep(spec: SweepSpec, prep: Prepared, root: str, resume: bool) -> _Sweep:
    """The parent run and the trials' shared overrides: created afresh, or read back for ``resume``."""
    from ray import tune

    s, cfg = spec.settings, spec.base
    exp_dir = f"{root.rstrip('/')}/{s.name}"
    experiment = s.experiment or cfg.tracking.experiment
    uri = prep.tracking_uri
    if resume:
        parent_id = (_read(f"{exp_dir}/{PARENT_FILE}") or "").strip()
        if not parent_id or not tune.Tuner.can_restore(exp_dir):
            raise ValueError(f"sweep.name: nothing to resume at {exp_dir} (run the sweep without --resume first)")
        parent, _ = open_run(uri, parent_id)
        # the sweep as it was started: the file may have changed since, Tune's search space cannot
        state = json.loads(_read(f"{exp_dir}/{STATE_FILE}") or "{}")
        spec = SweepSpec(
            spec.base, parse_search(state["search"]), settings_from(state["settings"]), spec.source, state["base_raw"]
        )
        parent.reopen()
        return _Sweep(spec, prep, root, exp_dir, experiment, parent, state["base_raw"], state["fixed"])
    if _read(f"{exp_dir}/{PARENT_FILE}") is not None or tune.Tuner.can_restore(exp_dir):
        raise ValueError(
            f"sweep.name: a sweep already exists at {exp_dir}; continue it with --resume, or set sweep.name=NEW"
        )
    fixed = {
        "tracking.tracking_uri": uri,
        "tracking.experiment": experiment,
        "train.storage_path": prep.storage_path,
        "data.shards": absolute(cfg.data.shards),
    }
    if cfg.data.source and Path(cfg.data.source).exists():
        fixed["data.source"] = absolute(cfg.data.source)
    tags = {**version_tags(), SWEEP_TAG: "true", SWEEP_NAME_TAG: s.name, "moco_ray.sweep_dir": exp_dir}
    parent = create_run(uri, experiment, s.name, _parent_params(spec), tags, cfg.to_yaml())
    parent.log_text(spec.to_yaml(), "sweep.yaml")
    state = {
        "base_raw": spec.base_raw,
        "fixed": fixed,
        "search": {k: {sp.kind: sp.values} for k, sp in spec.search.items()},
        "settings": asdict(s),
    }
    _write(f"{exp_dir}/{STATE_FILE}", json.dumps(state, indent=1, default=str))
    _write(f"{exp_dir}/{PARENT_FILE}", parent.run_id + "\n")
    return _Sweep(spec, prep, root, exp_dir, experiment, parent, spec.base_raw, fixed)


def _tuner(sw: _Sweep, resume: bool, concurrency: int, watch: TrackingWatch, hooks: FaultHooks | None = None):
    from ray import tune

    s, cfg = sw.spec.settings, sw.spec.base
    trainable = make_trainable(sw.base_raw, sw.fixed, sw.parent.run_id, s.name, sw.prep, hooks, watch.grace)
    trainable = tune.with_resources(trainable, {"CPU": TRIAL_CPU})
    if resume:
        return tune.Tuner.restore(sw.exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        trainable,
        param_space=sw.spec.param_space(),
        tune_config=tune.TuneConfig(
            metric=s.metric,
            mode=s.mode,
            scheduler=_scheduler(s, cfg.train.epochs),
            search_alg=_search_alg(s),
            num_samples=s.num_samples,
            max_concurrent_trials=concurrency,
        ),
        run_config=tune.RunConfig(
            name=s.name,
            storage_path=sw.root,
            # A trial is one whole TorchTrainer run; worker failures are retried inside it (train.max_failures).
            # No fail_fast: in Ray 2.60 it marks the trials it stops TERMINATED, so a resume would not rerun them.
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[_SweepCallback.make(s.metric, sw.spec.num_trials(), watch)],
            verbose=s.verbose,
        ),
    )


def run_sweep(
    config: str | os.PathLike | dict[str, Any],
    *,
    overrides: list[str] | dict[str, Any] | None = None,
    resume: bool = False,
    hooks: FaultHooks | None = None,
) -> SweepResult:
    """Run (or with ``resume=True`` continue) the sweep described by `config` (a sweep YAML path or dict).

    An MLflow server that stays unreachable (moco_ray.tuning.outage) stops it with ``TrackingOutage``, trials kept.

    ``hooks``: test-only fault injection for every trial (never set by the CLI).
    """
    spec = load_sweep(config, overrides)
    s, cfg = spec.settings, spec.base
    prep = prepare(with_absolute_paths(cfg))  # tracking store, storage, shards: one clear error before Ray starts
    root = absolute(s.storage_path) if s.storage_path else prep.storage_path
    init_ray()
    _quiet_tune_logs()
    check_resources(cfg, TRIAL_CPU, "a trial")  # one clear line before the parent run or any trial starts
    # checked before the parent run exists too (a resumed sweep keeps the concurrency it was started with)
    concurrency = 0 if resume else _concurrency(s, cfg, spec.num_trials())
    sw = _open_sweep(spec, prep, root, resume)
    print(f"[sweep] {sw.spec.settings.name}: parent MLflow run {sw.parent.run_id}; Tune experiment {sw.exp_dir}")
    watch = TrackingWatch(prep.tracking_uri)
    tuner = _tuner(sw, resume, concurrency, watch, hooks)
    interrupted = False
    # Tune's "Stop signal received (e.g. via SIGINT/Ctrl+C)" would misname the watch's stop as a Ctrl-C
    not_a_ctrl_c = DropMessage("Stop signal received", when=lambda: watch.down)
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addFilter(not_a_ctrl_c)
    try:
        with _tune_env(s.verbose), muted_on_sigint():
            tuner.fit()  # failed trials are in the results, not raised
    except KeyboardInterrupt:
        interrupted = True
    finally:
        tune_log.removeFilter(not_a_ctrl_c)
    remove_orphaned_placement_groups()  # the trials Tune stopped last
    if watch.down:  # nothing can be recorded now: the resume reconciles the parent and the children
        raise TrackingOutage(watch.message(resume_command(spec.source)))
    s = sw.spec.settings
    result = finalize(
        sw.parent, sw.exp_dir, sw.base_raw, sw.fixed, s, sw.experiment, sw.spec.search, sw.spec.num_trials()
    )
    if interrupted:
        raise KeyboardInterrupt(f"sweep interrupted; continue with: {resume_command(spec.source)}")
    return result


def resume_command(source: str) -> str:
    return f"moco-ray sweep -c {source} --resume"


def finalize(
    parent: RunLog,
    exp_dir: str,
    base_raw: dict[str, Any],
    fixed: dict[str, Any],
    s: SweepSettings,
    experiment: str,
    search: dict[str, Any],
    expected: int,
) -> SweepResult:
    """Reconcile child runs with the trials' end states, then log the table, plots and best trial to the parent."""
    from ray.tune import ExperimentAnalysis

    uri, parent_id = parent.uri, parent.run_id
    trials = sorted(
        ExperimentAnalysis(exp_dir, default_metric=s.metric, default_mode=s.mode).trials, key=lambda t: t.trial_id
    )
    children = _child_runs(uri, parent_id)
    rows = [_reconcile(uri, parent_id, t, children.get(t.trial_id, []), base_raw, fixed, experiment) for t in trials]
    hist = _histories(uri, rows, s.metric)
    table = _table(rows, list(search), s.metric, s.mode, hist)
    counts = {str(k): int(v) for k, v in table["state"].value_counts().items()} if not table.empty else {}
    if len(rows) < expected:
        counts["not_started"] = expected - len(rows)
    # trials are generated lazily: a sweep stopped early (Ctrl-C) may not have created them all
    complete = len(rows) >= expected and all(r["state"] in ("finished", "stopped_early", "failed") for r in rows)
    best = report.pick_best(table, s.metric, s.mode)
    _log_parent(parent, table, best, rows, hist, s, search)
    sweep_state = "finished" if complete else "interrupted"
    parent.set_tags(
        {"moco_ray.sweep_state": sweep_state, **{f"moco_ray.trials_{k}": counts.get(k, 0) for k in TRIAL_STATES}}
    )
    ok = counts.get("finished", 0) + counts.get("stopped_early", 0)
    parent.finish("KILLED" if not complete else ("FINISHED" if ok else "FAILED"))
    print(
        f"[sweep] {sweep_state}: "
        + ", ".join(f"{v} {k}" for k, v in counts.items())
        + (f"; best {s.metric} {best['value']:.4g} (trial {best['trial_id']})" if best else ""),
        flush=True,
    )
    return SweepResult(table, best, parent_id, exp_dir, complete, counts)


def _child_runs(uri: str, parent_id: str) -> dict[str, list]:
    """Child runs of the parent grouped by trial id, oldest first (a trial restarted on resume has several)."""
    from mlflow.entities import ViewType

    c = client(uri)
    exp_id = c.get_run(parent_id).info.experiment_id
    runs = c.search_runs(
        [exp_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", run_view_type=ViewType.ALL, max_results=50000
    )
    out: dict[str, list] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        out.setdefault(r.data.tags.get(TRIAL_TAG, ""), []).append(r)
    return out


def describe_error(err: BaseException | None) -> str:
    """``Type: first line`` of the root cause, unwrapping Ray's task/actor errors and Train's worker errors."""
    if err is None:
        return "unknown error"
    for _ in range(10):
        failures = getattr(err, "worker_failures", None)
        nxt = next(iter(failures.values()), None) if isinstance(failures, dict) and failures else None
        nxt = nxt or getattr(err, "cause", None) or err.__cause__
        if not isinstance(nxt, BaseException) or nxt is err:
            break
        err = nxt
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:500]


def _trial_error(trial) -> str:
    err = None
    with contextlib.suppress(Exception):
        err = trial.get_pickled_error()
    if err is None:
        with contextlib.suppress(Exception):
            err = trial.get_error()
    return describe_error(err)


def _reconcile(uri, parent_id, trial, runs, base_raw, fixed, experiment) -> dict[str, Any]:
    """Set the MLflow end state of the trial's latest child run; older ones (restarted trials) become KILLED."""
    for old in runs[:-1]:
        if old.info.status == "RUNNING":
            _end(uri, old.info.run_id, "KILLED", {STATE_TAG: "interrupted"})
    run = runs[-1] if runs else None
    status = run.info.status if run else None
    error = ""
    if trial.status == "ERROR":
        state, error = "failed", _trial_error(trial)
        if run is None:  # failed before its run existed (e.g. a data check in the trial): record it anyway
            run = _create_failed_child(uri, parent_id, trial, base_raw, fixed, experiment)
        _end(uri, run.info.run_id, "FAILED", {STATE_TAG: state, ERROR_TAG: error})
    elif trial.status == "TERMINATED":
        # The trainable returns only after run_pretraining marked the run FINISHED; anything else was stopped.
        state = "finished" if status == "FINISHED" else "stopped_early"
        if run is not None:
            _end(uri, run.info.run_id, None if status == "FINISHED" else "KILLED", {STATE_TAG: state})
    else:  # PENDING / RUNNING / PAUSED: the sweep stopped before this trial ended
        state = "interrupted" if run is not None else "pending"
        if run is not None and status == "RUNNING":
            _end(uri, run.info.run_id, "KILLED", {STATE_TAG: state})
    return {
        "trial_id": trial.trial_id,
        "trial": trial,
        "run_id": run.info.run_id if run else "",
        "state": state,
        "error": error,
        "last_result": dict(trial.last_result or {}),
    }


def _end(uri: str, run_id: str, status: str | None, tags: dict[str, str]) -> None:
    """Tag a trial's child run with its end state and, unless ``status`` is None, terminate it so."""
    log = RunLog(uri, run_id)
    log.set_tags(tags)
    if status:
        log.finish(status)


def _create_failed_child(uri, parent_id, trial, base_raw, fixed, experiment):
    from moco_ray.config import load_config

    params = dict(trial.config)
    cfg = load_config(base_raw, {**fixed, **params, "tracking.run_name": run_name(params)})
    tags = {TRIAL_TAG: trial.trial_id, TRIAL_NAME_TAG: str(trial), **version_tags()}
    name = cfg.tracking.run_name
    return create_run(uri, experiment, name, cfg.flat(), tags, cfg.to_yaml(), parent_run_id=parent_id).get()


def _histories(uri, rows, metric: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per-trial ``{key: [(epoch, value)]}`` of loss and `metric`, read from the child runs' MLflow history."""
    c = client(uri)
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in rows:
        if not r["run_id"]:
            continue
        out[r["trial_id"]] = {
            k: [(m.step, m.value) for m in c.get_metric_history(r["run_id"], k)] for k in {"loss", metric}
        }
    return out


def _table(rows, keys: list[str], metric: str, mode: str, hist) -> pd.DataFrame:
    """One row per trial: ids, end state, searched values, final metrics (last report), best `metric` over epochs."""
    pick = max if mode == "max" else min
    recs = []
    for r in rows:
        res, cfg = r["last_result"], r["trial"].config
        last = res.get(metric)
        values = [v for _, v in hist.get(r["trial_id"], {}).get(metric, [])]
        values += [float(last)] if isinstance(last, int | float) else []
        rec = {
            "trial_id": r["trial_id"],
            "run_id": r["run_id"],
            "state": r["state"],
            **{f"param:{k}": cfg.get(k) for k in keys},
            "epochs_done": int(res["epoch"]) + 1 if "epoch" in res else 0,
        }
        for m in dict.fromkeys(("loss", "acc1", "knn_top1", metric)):
            v = res.get(m)
            rec[f"final_{m}"] = float(v) if isinstance(v, int | float) else float("nan")
        rec[f"best_{metric}"] = pick(values) if values else float("nan")
        rec["error"] = r["error"]
        recs.append(rec)
    return pd.DataFrame(recs)


def _log_parent(parent: RunLog, table, best, rows, hist, s: SweepSettings, search) -> None:
    c, parent_id = parent.client, parent.run_id
    with tempfile.TemporaryDirectory() as d:
        csv = Path(d) / RESULTS_CSV
        table.to_csv(csv, index=False)
        c.log_artifact(parent_id, str(csv))
        plots = Path(d) / "plots"
        plots.mkdir()
        made = [report.plot_metric_vs_param(table, k, s.metric, plots / f"{s.metric}_vs_{k}.png") for k in search]
        grid = [k for k, sp in search.items() if sp.kind == "grid"]
        if len(grid) == 2:
            made.append(report.plot_heatmap(table, grid[0], grid[1], s.metric, plots / f"{s.metric}_heatmap.png"))
        curves = {
            f"{r['trial_id']} {run_name(r['trial'].config)}": hist[r["trial_id"]] for r in rows if r["trial_id"] in hist
        }
        made.append(report.plot_learning_curves(curves, s.metric, plots / "learning_curves.png"))
        for p in made:
            if p is not None:
                c.log_artifact(parent_id, str(p), "plots")
    if best:
        parent.set_tags({"best_trial_id": best["trial_id"], "best_run_id": best["run_id"]})
        c.log_metric(parent_id, f"best_{s.metric}", best["value"])
