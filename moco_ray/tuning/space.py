"""Sweep files: parsing, validation and the Ray Tune search space.

A sweep YAML holds three kinds of top-level keys::

    base: cifar10_mocov2_r18.yaml     # experiment YAML, relative to this file (else to the cwd); optional
    train: {epochs: 50}               # inline config sections (model, moco, aug, data, optim, train, eval,
                                      #   tracking), merged over `base`
    search:                           # dotted config key -> one spec
      moco.queue_size: {grid: [256, 1024, 4096, 16384]}   # every value (Tune grid_search)
      moco.momentum: {choice: [0.9, 0.99, 0.999]}         # one value drawn per sample
      moco.temperature: {uniform: [0.05, 0.5]}            # float in [lo, hi]
      optim.lr: {loguniform: [0.01, 0.3]}                 # float, log-uniform in [lo, hi]
      model.dim: {randint: [64, 257]}                     # int in [lo, hi) (hi excluded)
    sweep:                            # see SweepSettings for every field and its default
      metric: knn_top1
      mode: max
      scheduler: asha                 # asha | fifo
      grace_period: 5                 # epochs (one Tune report per epoch) before ASHA may stop a trial
      reduction_factor: 2
      max_concurrent_trials: 2

Grid specs multiply (every combination runs); ``num_samples`` repeats the grid and draws the other specs anew.
Overrides (CLI ``KEY=VALUE`` or the API's dict) apply on top: ``sweep.KEY`` sets a sweep field, any other dotted
key a base config field. Resources per trial come from the base config (train.num_workers, use_gpu,
cpus_per_worker). Everything here is checked before Ray starts: unknown keys, bad specs, and every grid (and
choice) combination is built into a validated Config, so a bad value is a one-line ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from moco_ray.config import Config, deep_merge, load_config, parse_overrides, read_yaml

SPEC_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# Metrics each epoch's report can carry (moco_ray.train.loop); knn_top1 only every eval.knn_every epochs.
METRICS = ("knn_top1", "loss", "acc1", "lr", "epoch_seconds", "images_per_s", "corrupt_images")
# Keys the sweep itself sets on every trial: searching over them would break the parent/child layout.
RESERVED = ("tracking.", "train.name", "train.storage_path")
MAX_COMBINATIONS_CHECKED = 4096


@dataclass
class SweepSettings:
    """The ``sweep:`` section."""

    num_samples: int = 1  # repeats of the grid (random specs are drawn anew each time)
    metric: str = "knn_top1"  # reported metric to rank trials and drive ASHA
    mode: str = "max"  # max | min
    scheduler: str = "asha"  # asha | fifo
    grace_period: int = 1  # ASHA: epochs every trial runs before it may be stopped
    reduction_factor: float = 2.0  # ASHA: keep the best 1/reduction_factor at each rung
    max_t: int = 0  # ASHA: epochs the rungs are laid out over; 0 = train.epochs
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's resources allow
    searcher: str = "random"  # random (grid + random sampling) | optuna (when installed; no grid specs)
    seed: int | None = None  # random searcher's seed
    name: str = ""  # Tune experiment name; "" = the sweep file's stem
    storage_path: str = ""  # Tune experiment root; "" = train.storage_path or ./moco-ray-runs
    experiment: str = ""  # MLflow experiment of the parent and child runs; "" = the base tracking.experiment
    verbose: int = 1  # Tune's console output: 0 silent, 1 status updates, 2 + trial results


@dataclass
class SearchSpec:
    kind: str
    values: list[Any]

    @property
    def discrete(self) -> bool:
        return self.kind in ("grid", "choice")

    def describe(self) -> str:
        return f"{self.kind}{self.values}"

    def candidates(self) -> list[Any]:
        """Values to validate: each discrete value, or the ends of a range."""
        if self.discrete:
            return list(self.values)
        lo, hi = self.values
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]

    def to_tune(self) -> Any:
        from ray import tune  # lazy: ray.tune takes seconds; sweeps are validated without it, before Ray

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        lo, hi = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](lo, hi)


@dataclass
class SweepSpec:
    """A parsed, validated sweep: the resolved base config, the search space and the sweep settings."""

    base: Config  # resolved: defaults, method preset, base file, inline sections, overrides
    search: dict[str, SearchSpec]
    settings: SweepSettings
    source: str = ""  # the sweep file, when loaded from one
    # The layers before resolution, so a trial that searches moco.method still gets that method's preset.
    base_raw: dict[str, Any] = field(default_factory=dict)

    def param_space(self) -> dict[str, Any]:
        return {k: s.to_tune() for k, s in self.search.items()}

    def num_trials(self) -> int:
        grid = [len(s.values) for s in self.search.values() if s.kind == "grid"]
        return self.settings.num_samples * (math.prod(grid) if grid else 1)

    def to_yaml(self) -> str:
        doc = {
            "base": self.base_raw,
            "search": {k: {s.kind: s.values} for k, s in self.search.items()},
            "sweep": dataclasses.asdict(self.settings),
        }
        return yaml.safe_dump(doc, sort_keys=False)


def _split_overrides(overrides: list[str] | dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (base config overrides as {dotted: value}, sweep settings as {field: value})."""
    if not overrides:
        return {}, {}
    nested = parse_overrides(overrides)
    sweep = nested.pop("sweep", {})
    flat = {f"{sec}.{k}": v for sec, fields in nested.items() for k, v in fields.items()}
    return flat, sweep


def settings_from(values: dict[str, Any]) -> SweepSettings:
    hints = get_type_hints(SweepSettings)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            raise ValueError(f"unknown sweep setting sweep.{key}; known: {', '.join(hints)}")
        typ = hints[key]
        if typ is bool and not isinstance(value, bool):
            raise ValueError(f"sweep.{key}: expected true or false, got {value!r}")
        if value is None and key == "seed":
            kwargs[key] = None
            continue
        if typ is int or key == "seed":
            if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
                raise ValueError(f"sweep.{key}: expected an integer, got {value!r}")
            value = int(value)
        if typ is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"sweep.{key}: expected a number, got {value!r}")
            value = float(value)
        if typ is str and not isinstance(value, str):
            raise ValueError(f"sweep.{key}: expected a string, got {value!r}")
        kwargs[key] = value
    return SweepSettings(**kwargs)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"sweep.{name}: {value!r} is out of range; allowed: {allowed}")


def validate_settings(s: SweepSettings, base: Config) -> None:
    _check(s.num_samples >= 1, "num_samples", s.num_samples, ">= 1")
    _check(s.metric in METRICS, "metric", s.metric, ", ".join(METRICS))
    _check(s.mode in ("max", "min"), "mode", s.mode, "max, min")
    _check(s.scheduler in ("asha", "fifo"), "scheduler", s.scheduler, "asha, fifo")
    _check(s.searcher in ("random", "optuna"), "searcher", s.searcher, "random, optuna")
    _check(s.grace_period >= 1, "grace_period", s.grace_period, ">= 1")
    _check(s.reduction_factor > 1, "reduction_factor", s.reduction_factor, "> 1")
    _check(s.max_t >= 0, "max_t", s.max_t, ">= 0 (0 = train.epochs)")
    _check(s.max_concurrent_trials >= 0, "max_concurrent_trials", s.max_concurrent_trials, ">= 0 (0 = no limit)")
    _check(s.verbose in (0, 1, 2, 3), "verbose", s.verbose, "0, 1, 2, 3")
    if base.train.name:  # every trial would train in (and lock) the same run directory
        raise ValueError(
            f"train.name: {base.train.name!r} would give every trial one run directory; leave it empty in a sweep "
            "(each trial's directory is named after its run id)"
        )
    if s.metric == "knn_top1":
        _check(base.eval.knn_every > 0, "metric", s.metric, "another metric, or eval.knn_every > 0 (kNN is off)")
    if s.scheduler == "asha":
        max_t, _ = asha_horizon(s, base.train.epochs)
        if max_t < 1:  # no grace_period can be valid: say what can change instead
            raise ValueError(
                f"sweep.scheduler: asha cannot stop a trial of train.epochs = {base.train.epochs} before its last "
                "epoch; use sweep.scheduler=fifo, or train.epochs >= 2"
            )
        why = f"ASHA must be able to stop a trial before its last epoch; train.epochs = {base.train.epochs}"
        _check(s.grace_period <= max_t, "grace_period", s.grace_period, f"<= {max_t} ({why}), or sweep.scheduler=fifo")
    if s.searcher == "optuna":
        try:
            import optuna  # noqa: F401  # lazy: optional; only checked when the sweep asks for it
        except ImportError:
            raise ValueError("sweep.searcher: optuna is not installed; use searcher: random") from None


def asha_horizon(s: SweepSettings, epochs: int) -> tuple[int, bool]:
    """ASHA's ``(max_t, stop_last_trials)``, in epochs (one Tune report per epoch).

    A trial that reaches train.epochs ends by itself: the rungs stop one epoch short of it and ASHA never stops
    a trial at its last report (which would kill it while the driver logs its encoder). A ``max_t`` below
    train.epochs caps every trial at max_t epochs.
    """
    if s.max_t and s.max_t < epochs:
        return s.max_t, True
    return epochs - 1, False


def parse_search(search: Any) -> dict[str, SearchSpec]:
    """``{dotted key: {kind: values}}`` -> SearchSpecs; keys checked against the Config dataclasses."""
    if search is None:
        return {}
    if not isinstance(search, dict):
        raise ValueError("search: expected a mapping of dotted config keys to specs, e.g. moco.momentum: {grid: [...]}")
    sections = get_type_hints(Config)
    out: dict[str, SearchSpec] = {}
    for key, spec in search.items():
        parts = str(key).split(".")
        if len(parts) != 2 or parts[0] not in sections:
            raise ValueError(f"search {key}: expected SECTION.FIELD with SECTION one of {', '.join(sections)}")
        fields = get_type_hints(sections[parts[0]])
        if parts[1] not in fields:
            raise ValueError(f"search {key}: unknown config field; known in {parts[0]}: {', '.join(fields)}")
        if any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESERVED):
            raise ValueError(f"search {key}: set by the sweep itself, cannot be searched")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPEC_KINDS:
            raise ValueError(f"search {key}: expected one of {{{': [...]}, {'.join(SPEC_KINDS)}: [...]}}, got {spec!r}")
        kind, values = next(iter(spec.items()))
        out[key] = _spec(key, kind, values)
    return out


def _spec(key: str, kind: str, values: Any) -> SearchSpec:
    if not isinstance(values, list) or not values:
        raise ValueError(f"search {key}: {kind} expects a non-empty list, got {values!r}")
    if kind in ("grid", "choice"):
        return SearchSpec(kind, values)
    if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ValueError(f"search {key}: {kind} expects [lo, hi] numbers, got {values!r}")
    lo, hi = values
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"search {key}: {kind} expects lo < hi, got {values!r}")
    if kind == "loguniform" and lo <= 0:
        raise ValueError(f"search {key}: loguniform expects lo > 0, got {values!r}")
    if kind == "randint" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise ValueError(f"search {key}: randint expects integers [lo, hi), got {values!r}")
    if kind == "randint":
        values = [int(lo), int(hi)]
    return SearchSpec(kind, values)


def check_combinations(base: dict[str, Any], search: dict[str, SearchSpec]) -> int:
    """Build a validated Config for every combination of discrete values (and each range end); return the count.

    Values interact (``moco.queue_size >= train.batch_size``), so combinations are checked, not single values;
    past MAX_COMBINATIONS_CHECKED each value is checked alone with the others at their first value.
    """
    discrete = {k: s.candidates() for k, s in search.items() if s.discrete}
    ranges = {k: s.candidates() for k, s in search.items() if not s.discrete}
    n = math.prod(len(v) for v in discrete.values()) if discrete else 1
    first = {k: v[0] for k, v in discrete.items()}
    if n <= MAX_COMBINATIONS_CHECKED:
        combos = [dict(zip(discrete, vals)) for vals in itertools.product(*discrete.values())]
    else:
        combos = [{**first, k: v} for k, vals in discrete.items() for v in vals]
    combos += [{**first, k: v} for k, vals in ranges.items() for v in vals]
    for combo in combos or [{}]:
        try:
            load_config(base, combo)
        except ValueError as e:
            what = ", ".join(f"{k}={v!r}" for k, v in combo.items())
            raise ValueError(f"search: {what}: {e}") from None
    return n


def load_sweep(source: str | Path | dict[str, Any], overrides: list[str] | dict[str, Any] | None = None) -> SweepSpec:
    """Parse and validate a sweep YAML (or dict) plus overrides; raises ValueError/FileNotFoundError."""
    path: Path | None = None
    if isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"sweep file not found: {path}")
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping with base/search/sweep sections")
    base_ref = raw.pop("base", None)
    search = parse_search(raw.pop("search", None))
    settings_raw = raw.pop("sweep", None) or {}
    if not isinstance(settings_raw, dict):
        raise ValueError("sweep: expected a mapping of sweep settings")
    cfg_over, sweep_over = _split_overrides(overrides)
    inline = raw  # what is left: config sections
    base_dict: dict[str, Any] = {}
    if base_ref:
        base_path = _resolve_base(str(base_ref), path)
        base_dict = read_yaml(base_path) or {}
        if not isinstance(base_dict, dict):
            raise ValueError(f"{base_path}: expected a mapping of config sections")
    merged = deep_merge(deep_merge(base_dict, inline), parse_overrides(cfg_over))
    base = load_config(merged)
    settings = settings_from({**settings_raw, **sweep_over})
    if not settings.name:
        settings.name = path.stem if path else "sweep"
    validate_settings(settings, base)
    if settings.searcher == "optuna" and any(s.kind == "grid" for s in search.values()):
        raise ValueError("sweep.searcher: optuna cannot run grid specs; use choice, or searcher: random")
    check_combinations(merged, search)
    return SweepSpec(base, search, settings, str(path) if path else "", merged)


def _resolve_base(ref: str, sweep_file: Path | None) -> Path:
    cands = ([sweep_file.parent / ref] if sweep_file else []) + [Path(ref)]
    for c in cands:
        if c.is_file():
            return c
    raise FileNotFoundError(f"base: config file {ref} not found (looked in {', '.join(str(c) for c in cands)})")
