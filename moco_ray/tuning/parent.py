"""A sweep's parent MLflow run: created with the sweep's Tune experiment directory, or read back for ``--resume``.

The parent holds the sweep's settings and search as params (with the base config), ``sweep.yaml`` and the base
``config.yaml``; every trial's child run points at it (``mlflow.parentRunId``). Its id and the sweep as started
are kept in the experiment directory (moco_ray.tuning.state), so a resumed sweep reuses both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moco_ray.config import absolute
from moco_ray.jobs.resolve import Prepared
from moco_ray.tracking.run_log import RunLog, create_run, open_run, version_tags
from moco_ray.tuning import state
from moco_ray.tuning.space import SweepSpec
from moco_ray.tuning.state import SweepState
from moco_ray.tuning.trial import SWEEP_NAME_TAG, SWEEP_TAG


@dataclass
class OpenSweep:
    """A sweep resolved on the driver: its spec (as started, when resumed), checked store and shards, Tune
    directory, MLflow experiment and parent run, and the overrides every trial shares (``fixed``)."""

    spec: SweepSpec
    prep: Prepared
    root: str
    exp_dir: str
    experiment: str
    parent: RunLog
    fixed: dict[str, Any]


def open_sweep(spec: SweepSpec, prep: Prepared, root: str, resume: bool) -> OpenSweep:
    """The parent run and the trials' shared overrides: created afresh, or read back for ``resume``."""
    from ray import tune  # lazy: ray.tune takes seconds to import; a bad sweep file is refused before it

    exp_dir = f"{root.rstrip('/')}/{spec.settings.name}"
    experiment = spec.settings.experiment or spec.base.tracking.experiment
    parent_id = state.parent_run_id(exp_dir)
    if resume:
        if not parent_id or not tune.Tuner.can_restore(exp_dir):
            raise ValueError(f"sweep.name: nothing to resume at {exp_dir} (run the sweep without --resume first)")
        return _resume(spec, prep, root, exp_dir, experiment, parent_id)
    if parent_id is not None or tune.Tuner.can_restore(exp_dir):
        raise ValueError(
            f"sweep.name: a sweep already exists at {exp_dir}; continue it with --resume, or set sweep.name=NEW"
        )
    return _start(spec, prep, root, exp_dir, experiment)


def _resume(spec: SweepSpec, prep: Prepared, root: str, exp_dir: str, experiment: str, parent_id: str) -> OpenSweep:
    parent, _ = open_run(prep.tracking_uri, parent_id)
    # the sweep as it was started: the file may have changed since, Tune's search space cannot
    was = state.load(exp_dir)
    spec = SweepSpec(spec.base, was.search, was.settings, spec.source, was.base_raw)
    parent.reopen()
    return OpenSweep(spec, prep, root, exp_dir, experiment, parent, was.fixed)


def _start(spec: SweepSpec, prep: Prepared, root: str, exp_dir: str, experiment: str) -> OpenSweep:
    s, cfg = spec.settings, spec.base
    fixed = _fixed_overrides(spec, prep, experiment)
    tags = {**version_tags(), SWEEP_TAG: "true", SWEEP_NAME_TAG: s.name, "moco_ray.sweep_dir": exp_dir}
    parent = create_run(prep.tracking_uri, experiment, s.name, _parent_params(spec), tags, cfg.to_yaml())
    parent.log_text(spec.to_yaml(), "sweep.yaml")
    state.save(exp_dir, SweepState(spec.base_raw, fixed, spec.search, s), parent.run_id)
    return OpenSweep(spec, prep, root, exp_dir, experiment, parent, fixed)


def _fixed_overrides(spec: SweepSpec, prep: Prepared, experiment: str) -> dict[str, Any]:
    """What the sweep sets on every trial: the checked store, its experiment, absolute storage and data paths."""
    cfg = spec.base
    fixed = {
        "tracking.tracking_uri": prep.tracking_uri,
        "tracking.experiment": experiment,
        "train.storage_path": prep.storage_path,
        "data.shards": absolute(cfg.data.shards),
    }
    if cfg.data.source and Path(cfg.data.source).exists():
        fixed["data.source"] = absolute(cfg.data.source)
    return fixed


def _parent_params(spec: SweepSpec) -> dict[str, Any]:
    params = {f"sweep.{k}": v for k, v in asdict(spec.settings).items()}
    params.update({f"search.{k}": s.describe() for k, s in spec.search.items()})
    params.update(spec.base.flat())
    return params
