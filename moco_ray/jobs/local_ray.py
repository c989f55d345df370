"""How moco-ray starts or joins Ray: a local worker pool that survives between epochs, and a quiet log hook.

Imports nothing but the standard library: ``quiet_worker_logs`` runs in every Ray worker process at start-up (an
earlier version lived in the trainer module, and importing torch in every worker slowed start-up until Ray Data
starved).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

HOOK = "moco_ray.jobs.local_ray.quiet_worker_logs"
# logger -> the lowest level still shown
NOISY_LOGGERS = {
    # warns once a second for the whole run without the dashboard (see quiet_worker_logs)
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    # "Dataset ... execution finished in N seconds" from the SplitCoordinator after every epoch; warnings stay
    "ray.data._internal.execution.streaming_executor": logging.WARNING,
    # "Progress bars disabled. To enable, ...": moco-ray turns them off on purpose (data.stream.quiet_progress)
    "ray.data._internal.progress": logging.ERROR,
    # "Estimated parquet encoding ratio ..." / "... reader batch size ..." each time a stream is built (the
    # file-list reader moco_ray.data.stream uses); its warnings stay
    "ray.data._internal.datasource.parquet_datasource": logging.WARNING,
}
# Environment of a new local instance's workers (Ray reads both where the message comes from, in its workers):
LOCAL_WORKER_ENV = {
    # Ray Train V2's PreemptionWatcher (polls for drained nodes) has nothing to watch on one machine, and its
    # creation logs a core_worker.cc error about constructor arguments in the object store; its documented switch
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Train itself passes the deprecated option to Ray Data (ray/train/_internal/data_config.py), so every
    # run warned "RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated"; that message only
    "PYTHONWARNINGS": "ignore:`ExecutionOptions.exclude_resources` is deprecated",
}
# the driver's "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
# (a notice that the safe default is on; the warning when auth is *disabled* is kept)
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"
# The driver's log deduplicator merges lines that differ only in numbers ("... [repeated 3x across cluster]"), and
# two sweep trials' epoch lines differ only there: rank 0's progress lines (moco_ray.train.loop / .progress, with a
# trial's "[name] " in front) always pass. Ray's knob for this is RAY_DEDUP_LOGS_ALLOW_REGEX, read once at import.
PROGRESS_LINES = r"^(\[[^\]]*\] )?(epoch \d+/\d+  |moco-ray: warning: )"
# The raylet's "N PYTHON worker processes have been started on node ... maximum expected startup concurrency": on a
# local instance moco-ray starts them on purpose (a run's controller, workers and Ray Data actors; two at once in a
# sweep); dropped on this driver's console (RAY_DEDUP_LOGS_SKIP_REGEX's knob), still in the raylet's log.
WORKER_POOL_NOTICE = r"worker processes have been started on node: .* maximum expected startup concurrency"


# Ray Train's worker logs "Error in training function:" + traceback for any exception. The errors moco-ray reports
# itself on the driver in one line (moco_ray.jobs.pretrain._user_error) need no traceback from every rank.
TRAIN_ERROR_LOGGER = "ray.train.v2._internal.util"
REPORTED_ON_DRIVER = ("moco_ray.data.decode.TooManyCorruptImages:",)


class _DropReportedErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("Error in training function") and any(e in text for e in REPORTED_ON_DRIVER))


def quiet_worker_logs() -> None:
    """``worker_process_setup_hook``: keep the epoch lines readable among the workers' log lines.

    Ray Train V2's cleaner polls the State API, which needs the dashboard (ray[default], not a dependency here).
    Without it, it warns once a second for the whole run ("Failed to query Ray Train Controller actor state"),
    drowning the epoch lines. The cleaner only matters when a driver dies; sweeps free the placement groups of
    stopped trials themselves (moco_ray.tuning.cleanup).
    """
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger(TRAIN_ERROR_LOGGER).addFilter(_DropReportedErrors())
    exit_on_swallowed_sigterm()


RESEND_SIGTERM_AFTER_S = 0.05


def _is_ray_sigterm_exit(unraisable: Any) -> bool:
    """The ``SystemExit`` that Ray's worker SIGTERM handler (``ray._private.worker``'s ``sigterm_handler``) raised."""
    if not issubclass(unraisable.exc_type, SystemExit):
        return False
    tb = unraisable.exc_traceback
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "sigterm_handler" and f"{os.sep}ray{os.sep}" in code.co_filename:
            return True
        tb = tb.tb_next
    return False


def exit_on_swallowed_sigterm() -> None:
    """Make a Ray worker's SIGTERM end the process even when it lands inside a garbage-collector callback.

    Ray's workers turn SIGTERM into ``SystemExit`` (its ``sigterm_handler``). When the signal arrives while the main
    thread runs a weakref or ``__del__`` callback, Python cannot propagate that exception: it prints
    "Exception ignored in: <function WeakSet...>" with a traceback ending in ``SystemExit: 1`` (echoed on the
    driver's console between a sweep's epoch lines; issue #21) and the worker *keeps running* until the raylet
    kills it harder. This unraisable hook drops that one case and sends the SIGTERM again, now outside the
    callback, so the exit Ray asked for happens; every other unraisable exception goes to the hook before it.
    Idempotent, process-wide, callable from any thread.
    """
    previous = sys.unraisablehook
    if getattr(previous, "moco_ray_sigterm", False):
        return

    def hook(unraisable: Any) -> None:
        if _is_ray_sigterm_exit(unraisable):
            # not from here: the main thread would run the handler at once, still inside the callback
            threading.Timer(RESEND_SIGTERM_AFTER_S, os.kill, (os.getpid(), signal.SIGTERM)).start()
            return
        previous(unraisable)

    hook.moco_ray_sigterm = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def worker_pool_size(num_cpus: int | None = None) -> int:
    """Idle Ray workers to keep alive: the CPUs plus room for a run's long-lived actors.

    Ray's default keeps as many worker processes as CPUs and kills idle ones after a second. A training run holds
    a controller, the Train workers, Ray Data's coordinator and dataset manager and the cleaner: on a small machine
    that is above the limit, so every epoch's Ray Data tasks started fresh processes and paid the torch and
    torchvision imports again (measured on 2 CPUs: 7.3 s -> 3.5 s per epoch's execution, 128 images).
    """
    cpus = num_cpus or os.cpu_count() or 1
    return max(2 * cpus, cpus + 8)


def local_init_kwargs(num_cpus: int | None = None) -> dict[str, Any]:
    """``ray.init`` keyword arguments for a new local instance (not valid when joining a running cluster)."""
    env = dict(LOCAL_WORKER_ENV)
    if os.environ.get("PYTHONWARNINGS"):  # the user's own filters still apply
        env["PYTHONWARNINGS"] = os.environ["PYTHONWARNINGS"] + "," + env["PYTHONWARNINGS"]
    return {
        # Not raised with it: worker_maximum_startup_concurrency (the yardstick of the raylet's "N PYTHON worker
        # processes have been started ... 4x the maximum expected startup concurrency" warning, which a 2-CPU run
        # can print once). Tried on 2 CPUs: at the pool's size the warning went, but a 4-trial sweep (2 at once)
        # then printed gcs_server's "Failed to kill actor NIL_ID" every epoch; at the default a 2-trial sweep
        # printed none (one run each, not a controlled comparison).
        "_system_config": {"num_workers_soft_limit": worker_pool_size(num_cpus)},
        "runtime_env": {"worker_process_setup_hook": HOOK, "env_vars": env},
    }


class DropMessage(logging.Filter):
    """Drops records whose message starts with one of ``prefixes`` (only while ``when()`` holds, if given);
    everything else the logger says still shows."""

    def __init__(self, *prefixes: str, when: Callable[[], bool] | None = None) -> None:
        super().__init__()
        self.prefixes, self.when = prefixes, when

    def filter(self, record: logging.LogRecord) -> bool:
        return not ((self.when is None or self.when()) and record.getMessage().startswith(self.prefixes))


def drop_messages(logger: str, *prefixes: str) -> None:
    """Keep ``logger``'s records that start with one of ``prefixes`` off the console (once per process)."""
    log = logging.getLogger(logger)
    if not any(isinstance(f, DropMessage) for f in log.filters):
        log.addFilter(DropMessage(*prefixes))


def _either(current: re.Pattern | None, pattern: str) -> re.Pattern:
    if current is None:
        return re.compile(pattern)
    if pattern in current.pattern:
        return current
    return re.compile(f"{current.pattern}|{pattern}")


def steer_log_dedup(*, local: bool) -> None:
    """Progress lines always reach the console; on a ``local`` instance, the raylet's worker-start notice does not.

    Sets what ``RAY_DEDUP_LOGS_ALLOW_REGEX`` / ``_SKIP_REGEX`` set (on Ray's driver-side deduplicators, which read
    those variables when ray is first imported), keeping the user's own patterns. Private objects: on a Ray
    without them the console just shows Ray's default.
    """
    with contextlib.suppress(Exception):
        from ray._private import ray_logging  # lazy: private Ray API, optional; standard library only at import

        for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
            dedup.allow_re = _either(dedup.allow_re, PROGRESS_LINES)
            if local:
                dedup.skip_re = _either(dedup.skip_re, WORKER_POOL_NOTICE)


def quiet_driver_logs() -> None:
    """The driver's share of the quiet console: Ray's token-auth notice and the noisy loggers' chatter."""
    drop_messages(TOKEN_NOTICE_LOGGER, TOKEN_NOTICE)
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def mute_worker_logs() -> None:
    """Stop echoing the Ray workers' output on this driver; what they write stays in Ray's log files.

    Called on Ctrl-C: tearing a run down makes every actor whose owner went away print a traceback (the Train
    controller's "worker actors failed to initialize", the trial actors' SystemExit), which says nothing to a user
    who asked for the stop and would bury the one line that says how to continue. Uses Ray's private log
    dispatcher; on a Ray without it, the output just keeps showing.
    """
    with contextlib.suppress(Exception):
        from ray._private.worker import global_worker_stdstream_dispatcher  # lazy: private Ray API, optional

        global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")


@contextlib.contextmanager
def muted_on_sigint() -> Iterator[None]:
    """Within: the first SIGINT mutes the workers' output (``mute_worker_logs``) before whatever handler is then in
    place runs (Python's KeyboardInterrupt, or the handler Ray Tune installs while a sweep runs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    real = signal.signal

    def muting(handler: object) -> object:
        if not callable(handler):
            return handler

        def on_sigint(signum: int, frame: object) -> None:
            mute_worker_logs()
            handler(signum, frame)

        return on_sigint

    def install(sig: int, handler: object) -> object:
        return real(sig, muting(handler) if sig == signal.SIGINT else handler)

    previous = real(signal.SIGINT, muting(signal.getsignal(signal.SIGINT)))
    signal.signal = install  # type: ignore[assignment]  # Tune installs its own handler inside fit()
    try:
        yield
    finally:
        signal.signal = real
        real(signal.SIGINT, previous)


def init_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (set by `ray job submit`), else to a running local one, else start one
    (``RAY_ADDRESS=local`` starts one).

    Only a new local instance gets moco-ray's worker-pool size and log hook; a running cluster keeps its own
    settings (and runs the dashboard, so the hook's warning does not occur there).
    """
    import ray  # lazy: standard library only at import (this module runs in every worker's start-up)

    if ray.is_initialized():
        return
    quiet_driver_logs()
    common = {"log_to_driver": True, "configure_logging": False}
    address = os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":  # "local": a new local instance, as with no address at all
        steer_log_dedup(local=False)
        ray.init(address=address, **common)
        return
    steer_log_dedup(local=True)
    try:
        ray.init(address=address, **common, **local_init_kwargs())
    except ValueError as e:
        if "existing cluster" not in str(e):
            raise
        ray.init(**common)  # a cluster started with `ray start` on this machine: join it as it is
