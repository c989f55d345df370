"""Ray Tune sweeps (parent/child MLflow runs): ``run_sweep`` and the sweep YAML format (``space``)."""

from moco_ray.tuning.results import SweepResult
from moco_ray.tuning.space import SearchSpec, SweepSettings, SweepSpec, load_sweep
from moco_ray.tuning.sweep import run_sweep

__all__ = ["SearchSpec", "SweepResult", "SweepSettings", "SweepSpec", "load_sweep", "run_sweep"]
