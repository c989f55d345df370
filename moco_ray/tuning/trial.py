"""The Ray Tune trainable: one trial = one full pretraining (TorchTrainer) and one child MLflow run."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from moco_ray.jobs.local_ray import exit_on_swallowed_sigterm
from moco_ray.tuning.outage import DEFAULT_GRACE_S, wait_while_down

if TYPE_CHECKING:
    from moco_ray.jobs.resolve import Prepared
    from moco_ray.train.hooks import FaultHooks

TRIAL_TAG = "moco_ray.trial_id"
TRIAL_NAME_TAG = "moco_ray.trial_name"
SWEEP_TAG = "moco_ray.sweep"
SWEEP_NAME_TAG = "moco_ray.sweep_name"
STATE_TAG = "moco_ray.trial_state"
ERROR_TAG = "moco_ray.error"


def run_name(params: dict[str, Any]) -> str:
    """``{"moco.queue_size": 1024, "moco.momentum": 0.99}`` -> ``queue_size=1024,momentum=0.99``."""
    return ",".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in params.items())[:250] or "trial"


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def make_trainable(
    base_raw: dict[str, Any],
    fixed: dict[str, Any],
    parent_run_id: str,
    sweep_name: str,
    prepared: Prepared,
    hooks: FaultHooks | None = None,
    outage_grace_s: float = DEFAULT_GRACE_S,
) -> Callable:
    """A function trainable closing over the base config layers and the overrides every trial shares.

    ``fixed``: dotted overrides set by the sweep (tracking store and experiment, absolute paths). The trial's
    search values come on top. ``prepared``: the store and shards the sweep checked once, reused by every trial
    whose overrides keep them. ``hooks``: test-only faults, handed to every trial's run. ``outage_grace_s``: how long
    the driver lets its tracking server be down before it stops the sweep (moco_ray.tuning.outage). Worker reports
    reach Tune through TuneReportCallback on the TorchTrainer.
    """

    def moco_trial(params: dict[str, Any]) -> None:
        # lazy (the three): only the trial actor runs a trial; the sweep driver imports this module for its tag
        # names before Ray starts, and must not wait seconds for ray.tune, Ray Train and torch to refuse a bad file
        from ray import tune  # lazy: see above
        from ray.tune.integration.ray_train import TuneReportCallback  # lazy: see above

        from moco_ray.jobs.pretrain import run_pretraining  # lazy: see above

        exit_on_swallowed_sigterm()  # a joined cluster's trial actors lack the local instance's worker hook
        ctx = tune.get_context()
        overrides = {**fixed, **params, "tracking.run_name": run_name(params)}
        tags = {
            TRIAL_TAG: ctx.get_trial_id(),
            TRIAL_NAME_TAG: ctx.get_trial_name(),
            SWEEP_NAME_TAG: sweep_name,
        }
        try:
            run_pretraining(
                base_raw,
                overrides,
                parent_run_id=parent_run_id,
                extra_tags=tags,
                callbacks=[TuneReportCallback()],
                prepared=prepared,
                hooks=copy.deepcopy(hooks),
            )
        except Exception:
            # the tracking server died under the run: not the trial's failure. Wait for the driver's stop (it
            # leaves the trial unfinished, for --resume); fail as usual if the server answers again first.
            wait_while_down(prepared.tracking_uri, outage_grace_s + 120.0)
            raise

    return moco_trial
