"""What a run asks of the cluster, checked against what the cluster has or may scale to, before anything starts.

A run needs ``train.num_workers`` Train worker bundles (``train.cpus_per_worker`` CPUs and, with ``train.use_gpu``,
``train.gpus_per_worker`` GPUs each; a bundle must fit on one node), whole CPUs for its Ray Data stream
(``data.cpus``: the read and map tasks take one CPU each, so a stream with less than one whole CPU free never
starts) and, for a sweep trial, the trainable's sliver of a CPU. The cluster is what ``ray.nodes()`` shows now
plus, on an autoscaling cluster, the nodes its node types may still add (read from the GCS, where the autoscaler
publishes them, or from a cluster-launcher YAML: ``$MOCO_RAY_CLUSTER_CONFIG`` or the head's
``~/ray_bootstrap_config.yaml``). Nothing found means a fixed cluster.

The same packing answers "does one run fit" (else a one-line ValueError naming the setting to change) and "how
many runs fit at once" (a sweep's concurrency). The stream's CPUs are then placed explicitly: Ray Data's budget
for the run is capped at ``data.cpus`` (:func:`data_execution_options`), so concurrent streams cannot take more
than the arithmetic set aside, and the trainers' bundles never leave them less.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from moco_ray.config import Config

EPS = 1e-9
KEYS = ("CPU", "GPU")
CLUSTER_CONFIG_ENV = "MOCO_RAY_CLUSTER_CONFIG"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the cluster's config on the head
UNBOUNDED_NODES = 256  # stands in for a node type without a limit
TRIAL_CPU = 0.01  # a sweep trial's trainable: it only drives a TorchTrainer, whose workers request their own


@dataclass(frozen=True)
class Needs:
    """One run's bundles: ``num_workers`` x ``worker``, ``data_cpus`` whole CPUs, the trainable's ``driver_cpu``."""

    num_workers: int
    worker: dict[str, float]
    data_cpus: int
    driver_cpu: float = 0.0
    strategy: str = "PACK"

    def describe(self) -> str:
        w = ", ".join(f"{v:g} {k}" for k, v in self.worker.items() if v)
        text = f"{counted(self.num_workers, 'worker')} x ({w}) + {self.data_cpus} CPU for the data stream (data.cpus)"
        return text + (f" + {self.driver_cpu:g} CPU for the trial" if self.driver_cpu else "")


def counted(n: int, noun: str) -> str:
    """``1 node``, ``2 nodes``: the messages read as sentences."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class NodeType:
    """An autoscaler node type: its resources and how many nodes of it may exist (-1 = no limit)."""

    name: str
    resources: dict[str, float]
    max_count: int


@dataclass(frozen=True)
class ClusterView:
    """Alive nodes now (``nodes``; ``heads`` of them head nodes) and, if autoscaling, the node types it may add."""

    nodes: tuple[dict[str, float], ...]
    types: tuple[NodeType, ...] = ()
    max_workers: int | None = None  # the autoscaler's cap on worker nodes of all types
    heads: int = 1
    source: str = "ray.nodes()"

    @property
    def autoscaling(self) -> bool:
        return any(t.max_count != 0 for t in self.types)

    def describe(self) -> str:
        def res(r: dict[str, float]) -> str:
            return ", ".join(f"{r.get(k, 0):g} {k}" for k in KEYS)

        if self.autoscaling:
            kinds = "; ".join(f"{t.name} ({res(t.resources)}) x{t.max_count}" for t in self.types if t.max_count)
            return f"the autoscaler's node types ({self.source}): {kinds}"
        shown = "; ".join(res(n) for n in self.nodes[:4]) + (" ..." if len(self.nodes) > 4 else "")
        return f"the cluster's {counted(len(self.nodes), 'node')} ({shown})"


def worker_resources(cfg: Config) -> dict[str, float]:
    """One Train worker's resource request (``ScalingConfig.resources_per_worker``)."""
    t = cfg.train
    return {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}


def needs_of(cfg: Config, driver_cpu: float = 0.0) -> Needs:
    t = cfg.train
    return Needs(t.num_workers, worker_resources(cfg), cfg.data.cpus, driver_cpu, t.placement_strategy)


def data_execution_options(cfg: Config) -> Any:
    """Ray Data's options for the run's stream: at most ``data.cpus`` CPUs.

    Passed to Train's ``DataConfig(execution_options=...)``: Ray Data's default budget is the whole cluster
    (Train's shards do not subtract the workers' CPUs), so two runs' streams could each plan on every CPU. Given
    explicitly, Train also skips its default options, which set the deprecated ``exclude_resources``.
    """
    from ray.data import DataContext, ExecutionOptions, ExecutionResources  # lazy: seconds; arithmetic needs no Ray

    ctx = DataContext.get_current().execution_options
    return ExecutionOptions(
        resource_limits=ExecutionResources(cpu=cfg.data.cpus),
        preserve_order=ctx.preserve_order,
        verbose_progress=ctx.verbose_progress,
    )


# -- packing -----------------------------------------------------------------------------------------------------


def _fits(free: dict[str, float], req: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + EPS >= v for k, v in req.items() if v > 0)


def _take(free: dict[str, float], req: dict[str, float]) -> None:
    for k, v in req.items():
        free[k] = free.get(k, 0.0) - v


def _first_fit(free: list[dict[str, float]], req: dict[str, float], skip: set[int] = frozenset()) -> int:
    for i, node in enumerate(free):
        if i not in skip and _fits(node, req):
            _take(node, req)
            return i
    return -1


def place_run(needs: Needs, free: list[dict[str, float]]) -> bool:
    """Place one run's bundles onto ``free`` (first fit); on success ``free`` is updated, else left as it was."""
    trial = [dict(n) for n in free]
    w, n = needs.worker, needs.num_workers
    if needs.strategy == "STRICT_PACK":
        ok = _first_fit(trial, {k: v * n for k, v in w.items()}) >= 0
    else:
        used: set[int] = set()
        ok = True
        for _ in range(n):
            i = _first_fit(trial, w, used if needs.strategy == "STRICT_SPREAD" else set())
            ok = ok and i >= 0
            used.add(i)
    ok = ok and (not needs.driver_cpu or _first_fit(trial, {"CPU": needs.driver_cpu}) >= 0)
    ok = ok and all(_first_fit(trial, {"CPU": 1.0}) >= 0 for _ in range(needs.data_cpus))
    if ok:
        free[:] = trial
    return ok


def _count(needs: Needs, free: list[dict[str, float]], limit: int) -> int:
    k = 0
    while k < limit and place_run(needs, free):
        k += 1
    return k


def _per_node(needs: Needs, t: NodeType) -> tuple[int, int]:
    """(runs, worker bundles) one empty node of type ``t`` holds: the order in which extra nodes are considered."""
    one = replace(needs, num_workers=1, driver_cpu=0.0, data_cpus=0, strategy="PACK")
    return _count(needs, [dict(t.resources)], 64), _count(one, [dict(t.resources)], 64)


def capacity(view: ClusterView, needs: Needs, limit: int = 1) -> list[dict[str, float]]:
    """Every node's CPUs and GPUs: the alive ones, then the ones the autoscaler may still add (the most useful
    types for ``needs`` first, within each type's and the cluster's node limits)."""
    nodes = [{k: n.get(k, 0.0) for k in KEYS} for n in view.nodes]
    if not view.autoscaling:
        return nodes
    room = UNBOUNDED_NODES if view.max_workers is None else max(0, view.max_workers - (len(nodes) - view.heads))
    ranked = sorted(view.types, key=lambda t: _per_node(needs, t), reverse=True)
    for t in ranked:
        present = sum(1 for n in nodes if all(abs(n[k] - t.resources.get(k, 0.0)) < EPS for k in KEYS))
        cap = UNBOUNDED_NODES if t.max_count < 0 else t.max_count
        useful = needs.num_workers * limit + needs.data_cpus * limit + 1  # more would not change the answer
        extra = min(max(0, cap - present), room, useful)
        nodes += [{k: t.resources.get(k, 0.0) for k in KEYS} for _ in range(extra)]
        room -= extra
    return nodes


def max_runs(needs: Needs, view: ClusterView, limit: int = 1024) -> int:
    """How many such runs the cluster can hold at once (up to ``limit``)."""
    return _count(needs, capacity(view, needs, limit), limit)


def fits(needs: Needs, view: ClusterView) -> bool:
    return max_runs(needs, view, 1) >= 1


# -- the one-line verdict ------------------------------------------------------------------------------------------


def _largest_fitting(ok, hi: float, step: float) -> float:
    """The largest multiple of ``step`` in (0, hi] with ``ok(value)`` (assumed monotone), or 0 when none."""
    lo_n, hi_n = 0, int(math.floor(hi / step + EPS))
    while lo_n < hi_n:  # invariant: ok(lo_n * step) or lo_n == 0; not ok above hi_n
        mid = (lo_n + hi_n + 1) // 2
        if ok(mid * step):
            lo_n = mid
        else:
            hi_n = mid - 1
    return lo_n * step


def why_not(needs: Needs, view: ClusterView, what: str = "the run") -> str:
    """One line: what does not fit and the setting to change (call when ``fits`` is False)."""
    where = view.describe()
    asked = f"{what} needs {needs.describe()}"
    gpu = needs.worker.get("GPU", 0.0)
    nodes = capacity(view, needs)
    if gpu and not any(n.get("GPU", 0) > 0 for n in nodes):
        return (
            f"train.use_gpu: {needs.num_workers} GPU worker(s) asked for but the Ray cluster has 0 GPU(s) "
            f"({where}); set train.use_gpu=false, or run on a cluster with GPUs"
        )
    hints = []
    cpu = needs.worker["CPU"]
    best = _largest_fitting(lambda c: fits(replace(needs, worker={**needs.worker, "CPU": c}), view), cpu, 0.01)
    if best > 0:
        hints.append(f"train.cpus_per_worker to {best:g}")
    workers = int(_largest_fitting(lambda n: fits(replace(needs, num_workers=int(n)), view), needs.num_workers, 1))
    if workers >= 1:
        hints.append(f"train.num_workers to {workers}")
    if needs.data_cpus > 1:
        d = int(_largest_fitting(lambda n: fits(replace(needs, data_cpus=int(n)), view), needs.data_cpus, 1))
        if d >= 1:
            hints.append(f"data.cpus to {d}")
    if needs.strategy in ("STRICT_PACK", "STRICT_SPREAD") and fits(replace(needs, strategy="PACK"), view):
        hints.append("train.placement_strategy to PACK")
    fix = ("; lower " + " or ".join(hints)) if hints else "; use a larger cluster"
    return f"train.cpus_per_worker: {asked}, which does not fit into {where}{fix}"


def check_fits(cfg: Config, view: ClusterView, driver_cpu: float = 0.0, what: str = "the run") -> Needs:
    """The run's needs, or ValueError (one line) when the cluster cannot hold it even once."""
    needs = needs_of(cfg, driver_cpu)
    if not fits(needs, view):
        raise ValueError(why_not(needs, view, what))
    return needs


# -- a sweep's concurrency ---------------------------------------------------------------------------------------


def auto_concurrency(cfg: Config, view: ClusterView | None = None, limit: int = 1024) -> int:
    """Trials the cluster can run at once when sweep.max_concurrent_trials is 0: as many as the packing above puts
    onto its nodes (or the nodes its autoscaler may add), each trial's Train workers, its data-stream CPUs
    (data.cpus) and its trainable's TRIAL_CPU included.

    The trainables request almost nothing, so Tune cannot limit them by resources: without a limit every trial
    would start and its TorchTrainer wait for workers. ``limit``: the sweep's trial count (no use counting past it).
    """
    return max(1, max_runs(needs_of(cfg, TRIAL_CPU), view or current_view(), limit))


def check_concurrency(cfg: Config, wanted: int, view: ClusterView | None = None) -> None:
    """An explicit sweep.max_concurrent_trials may exceed what fits (the extra trials wait for workers), but the
    trials that do start must leave a whole CPU for their streams, or none of them ever gets a batch."""
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


def trial_concurrency(cfg: Config, wanted: int, trials: int) -> int:
    """The sweep's ``max_concurrent_trials``: ``wanted`` once checked, or for 0 what the connected cluster fits
    (said on the console, with the setting that overrides it)."""
    if wanted:
        check_concurrency(cfg, wanted)
        return wanted
    n = auto_concurrency(cfg, limit=max(1, trials))
    print(f"[sweep] {n} trial(s) at once (what the cluster fits; sweep.max_concurrent_trials=N sets it)", flush=True)
    return n


# -- reading the cluster ---------------------------------------------------------------------------------------------


def types_from_launcher_yaml(conf: dict[str, Any]) -> tuple[tuple[NodeType, ...], int | None]:
    """Worker node types and the cluster-wide worker cap of a cluster-launcher config (``ray up`` YAML).

    The head type adds no nodes (the head is already among the alive ones); a type without explicit
    ``resources`` (the launcher detects them from the instance type at start) is left out.
    """
    head = conf.get("head_node_type")
    types = []
    for name, t in (conf.get("available_node_types") or {}).items():
        res = t.get("resources") or {}
        if name == head or not res:
            continue
        count = int(t.get("max_workers", conf.get("max_workers", 0)))
        types.append(NodeType(name, {k: float(res.get(k, 0)) for k in KEYS}, count))
    cap = conf.get("max_workers")
    return tuple(types), (int(cap) if cap is not None else None)


def _types_from_gcs() -> tuple[NodeType, ...]:
    """Node types the autoscaler published in the GCS (what Ray Data reads too); () when none (a fixed cluster)."""
    try:
        import ray._private.state  # lazy: only reading a live cluster needs Ray; the arithmetic is pure

        conf = ray._private.state.state.get_cluster_config()
    except Exception:  # an internal API: treat anything unexpected as "nothing published"
        return ()
    if conf is None:
        return ()
    return tuple(
        NodeType(g.name, {k: float(g.resources.get(k, 0)) for k in KEYS}, int(g.max_count))
        for g in conf.node_group_configs
        if g.resources
    )


def _launcher_yaml() -> tuple[dict[str, Any], str] | None:

    path = os.environ.get(CLUSTER_CONFIG_ENV)
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ValueError(f"{CLUSTER_CONFIG_ENV}: no such file: {p}")
        return yaml.safe_load(p.read_text()) or {}, str(p)
    p = Path(BOOTSTRAP_CONFIG).expanduser()
    if p.is_file():
        return yaml.safe_load(p.read_text()) or {}, str(p)
    return None


def current_view() -> ClusterView:
    """The connected cluster: alive nodes from ``ray.nodes()``, node types from a launcher YAML or the GCS."""
    import ray  # lazy: only reading a live cluster needs Ray; the arithmetic is pure

    alive = [n for n in ray.nodes() if n.get("Alive")]
    nodes = tuple({k: float(n["Resources"].get(k, 0)) for k in KEYS} for n in alive)
    heads = sum(1 for n in alive if "node:__internal_head__" in n["Resources"]) or 1
    found = _launcher_yaml()
    if found is not None:
        types, cap = types_from_launcher_yaml(found[0])
        return ClusterView(nodes, types, cap, heads, found[1])
    types = _types_from_gcs()
    return ClusterView(nodes, types, None, heads, "the GCS autoscaler config") if types else ClusterView(nodes)
