"""Ray Tune sweeps over config keys (K, m, T, augmentation strength, ...): the Tune driver.

``run_sweep(FILE)`` validates the sweep (see moco_ray.tuning.space for the YAML format) before Ray starts, opens
the parent MLflow run (moco_ray.tuning.parent), and runs one trial per search point: each a full TorchTrainer
pretraining (moco_ray.tuning.trial) whose child run carries ``mlflow.parentRunId`` and ``moco_ray.trial_id``.
Worker reports reach Tune through TuneReportCallback, so ASHA can stop poor trials early. Afterwards the results
(moco_ray.tuning.results) reconcile every trial's child run with how the trial ended and log the results table,
plots and the best trial to the parent.

``resume=True`` restores the Tune experiment (``<storage_path>/<name>``): finished and failed trials are not
run again, unfinished ones start over, and the same parent run is reused (its id is kept in the experiment dir).
"""

from __future__ import annotations

import os
import signal
from typing import Any

from moco_ray.config import absolute
from moco_ray.jobs.local_ray import init_ray, interruption, muted_on_sigint, stop_signal
from moco_ray.jobs.resolve import check_resources, ingest_missing_shards, prepare, with_absolute_paths
from moco_ray.jobs.resources import TRIAL_CPU, trial_concurrency
from moco_ray.train.hooks import FaultHooks
from moco_ray.tuning.cleanup import remove_orphaned_placement_groups
from moco_ray.tuning.console import outage_is_not_a_ctrl_c, quiet_tune_logs, sweep_callback, tune_env
from moco_ray.tuning.outage import TrackingOutage, TrackingWatch
from moco_ray.tuning.parent import OpenSweep, open_sweep
from moco_ray.tuning.results import SweepResult, finalize
from moco_ray.tuning.space import SweepSettings, asha_horizon, load_sweep
from moco_ray.tuning.trial import make_trainable


def _scheduler(s: SweepSettings, epochs: int):
    if s.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler  # lazy: ray.tune takes seconds; a bad sweep file is refused first

    max_t, stop_last = asha_horizon(s, epochs)
    # One report per epoch, so training_iteration counts epochs (as the reported epoch, its number).
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_t,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
        stop_last_trials=stop_last,
    )


def _search_alg(s: SweepSettings):
    if s.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # lazy: optuna is optional

        return OptunaSearch(seed=s.seed)
    if s.seed is not None:
        from ray.tune.search import BasicVariantGenerator  # lazy: ray.tune takes seconds; as above

        return BasicVariantGenerator(random_state=s.seed)
    return None


def _tuner(sw: OpenSweep, resume: bool, concurrency: int, watch: TrackingWatch, hooks: FaultHooks | None = None):
    from ray import tune  # lazy: ray.tune takes seconds to import; a bad sweep file is refused before it

    s, cfg = sw.spec.settings, sw.spec.base
    trainable = make_trainable(sw.spec.base_raw, sw.fixed, sw.parent.run_id, s.name, sw.prep, hooks, watch.grace)
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
            callbacks=[sweep_callback(s.metric, sw.spec.num_trials(), watch)],
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
    ingest_missing_shards(with_absolute_paths(cfg))  # data.source -> data.shards when missing, announced
    prep = prepare(with_absolute_paths(cfg))  # tracking store, storage, shards: one clear error before Ray starts
    root = absolute(s.storage_path) if s.storage_path else prep.storage_path
    init_ray()
    quiet_tune_logs()
    check_resources(cfg, TRIAL_CPU, "a trial")  # one clear line before the parent run or any trial starts
    # checked before the parent run exists too (a resumed sweep keeps the concurrency it was started with)
    concurrency = 0 if resume else trial_concurrency(cfg, s.max_concurrent_trials, spec.num_trials())
    sw = open_sweep(spec, prep, root, resume)
    print(f"[sweep] {sw.spec.settings.name}: parent MLflow run {sw.parent.run_id}; Tune experiment {sw.exp_dir}")
    watch = TrackingWatch(prep.tracking_uri)
    tuner = _tuner(sw, resume, concurrency, watch, hooks)
    interrupted = False
    try:
        with outage_is_not_a_ctrl_c(watch), tune_env(s.verbose), muted_on_sigint():
            tuner.fit()  # failed trials are in the results, not raised
    except KeyboardInterrupt:  # Ctrl-C or SIGHUP past Tune's own handling, or the CLI's SIGTERM (straight here)
        interrupted = True
    if not (interrupted and stop_signal() == signal.SIGTERM):  # SIGTERM: the process ends now, Ray with it
        remove_orphaned_placement_groups()  # the trials Tune stopped last
    if watch.down:  # nothing can be recorded now: the resume reconciles the parent and the children
        raise TrackingOutage(watch.message(resume_command(spec.source)))
    result = finalize(sw)
    if interrupted:
        raise KeyboardInterrupt(f"sweep {interruption()}; continue with: {resume_command(spec.source)}")
    return result


def resume_command(source: str) -> str:
    return f"moco-ray sweep -c {source} --resume"
