"""The sweep driver's console and its hook into Tune's loop.

moco-ray prints one ``[sweep i/n]`` line per trial that ends and replaces a few of Tune's own lines (a failed
trial's traceback, the Ctrl-C summary and its advice to call ``Tuner.restore``) with its own. The same Tune
callback that prints those lines frees the placement groups of stopped trials (moco_ray.tuning.cleanup) and stops
the sweep as Ctrl-C does when the tracking server stays down (moco_ray.tuning.outage).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from typing import Any

from moco_ray.envvars import scoped_env
from moco_ray.jobs.local_ray import DropMessage, drop_messages
from moco_ray.tuning.cleanup import remove_orphaned_placement_groups
from moco_ray.tuning.errors import trial_error
from moco_ray.tuning.outage import TrackingWatch
from moco_ray.tuning.trial import run_name

# Ray Tune's driver-side lines that moco-ray's own replace: a failed trial's traceback (the sweep prints the trial's
# error in one line; the child run keeps it as a tag), and on Ctrl-C Tune's summary and its advice to call
# Tuner.restore (moco-ray prints the `moco-ray sweep ... --resume` that does that). Tune's other lines still show.
TUNE_LINES_REPLACED = {
    "ray.tune.execution.tune_controller": ("Trial task failed for trial",),
    "ray.tune.tune": ("Trials did not complete", "Experiment has been interrupted"),
}


def quiet_tune_logs() -> None:
    for name, prefixes in TUNE_LINES_REPLACED.items():
        drop_messages(name, *prefixes)


def tune_env(verbose: int) -> contextlib.AbstractContextManager[None]:
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


@contextlib.contextmanager
def outage_is_not_a_ctrl_c(watch: TrackingWatch) -> Iterator[None]:
    """Tune's "Stop signal received (e.g. via SIGINT/Ctrl+C)" would misname the watch's stop as a Ctrl-C."""
    not_a_ctrl_c = DropMessage("Stop signal received", when=lambda: watch.down)
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addFilter(not_a_ctrl_c)
    try:
        yield
    finally:
        tune_log.removeFilter(not_a_ctrl_c)


def sweep_callback(metric: str, total: int, watch: TrackingWatch) -> Any:
    """The Tune callback (driver side): one line per trial that ends, stopped trials' placement groups freed, and
    a SIGINT (Tune's own Ctrl-C handling) once ``watch`` says the tracking server is gone."""
    from ray.tune import Callback  # lazy: ray.tune takes seconds to import; a bad sweep file is refused before it

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
            epochs = f" after {int(res['epoch'])} epoch(s)" if "epoch" in res else ""
            print(
                f"[sweep {self.ended}/{self.total}] trial {trial.trial_id} ({run_name(trial.config)}) "
                f"{what}{epochs}{shown}{why}",
                flush=True,
            )

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._line(trial, "ended")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._line(trial, "FAILED", f": {trial_error(trial)}")

    return SweepCallback()
