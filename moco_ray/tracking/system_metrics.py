"""MLflow's system-metrics sampler (``system/*``: CPU, memory, disk, network; GPU with nvidia-ml-py) for a run.

Rank 0 samples its node while it trains; the sampler is MLflow's own ``SystemMetricsMonitor`` (a thread that logs
every ``interval`` seconds until stopped or until the run leaves RUNNING). It needs psutil (a dependency); GPU
figures need ``pynvml`` (the ``nvidia-ml-py`` package, extra ``gpu``) and are skipped without it.
"""

from __future__ import annotations

import logging

_log = logging.getLogger(__name__)


def start_system_metrics(uri: str, run_id: str, interval: float):
    """A started monitor for ``run_id``, or None when ``interval`` is 0 or psutil is missing (a warning says so).

    ``resume_logging``: a resumed or restarted run continues the ``system/*`` steps instead of restarting at 0.
    """
    if interval <= 0:
        return None
    try:
        import psutil  # noqa: F401  # lazy: probes an optional dependency; a missing one turns the sampler off
    except ImportError:
        _log.warning("system metrics off: psutil is not installed (pip install psutil)")
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # lazy: imports psutil (above)

    # its start/stop INFO lines and "Skip logging GPU metrics" would land between the epoch lines
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval, samples_before_logging=1, resume_logging=True, tracking_uri=uri
    )
    monitor.start()
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop the sampler and flush what it holds (no-op for None)."""
    if monitor is not None:
        monitor.finish()
