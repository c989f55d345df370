"""How moco-ray starts or joins Ray: a local worker pool that survives between epochs, and a quiet log hook.

Imports nothing but the standard library: ``quiet_worker_logs`` runs in every Ray worker process at start-up (an
earlier version lived in the trainer module, and importing torch in every worker slowed start-up until Ray Data
starved).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
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
PROGRESS_LINES = r"^(\[[^\]]*\] )?(epoch \d+/\d+  |moco-ray: |features \w+: rows \d)"
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
    pin_ray_address()


def pin_ray_address() -> None:
    """Point this worker's Ray look-ups (``RAY_ADDRESS``) at the instance it belongs to.

    Ray Train V2's PlacementGroupCleaner asks the State API for the controller every second; with no address that
    finds *every* GCS process on the machine, and when another Ray instance runs there (a second user, a
    ``ray start``) it raises "Found multiple active Ray instances": a 30-line traceback on the driver's console
    from each run, and a cleaner that has stopped watching. Runs in each worker of a local instance (its hook).
    """
    with contextlib.suppress(Exception):
        import ray  # lazy: standard library only at import (this module runs in every worker's start-up)

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


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


# Ray-internal warnings whose traceback reached the driver's console between epoch lines on a loaded machine: Ray
# Train's autoscaling client ("Failed to send resource request ... it's safe to ignore", GetTimeoutError) and the
# PlacementGroupCleaner. They stay in the worker's log file (where the driver's copy is read from); the console gets
# one moco-ray line, once.
RAY_INTERNAL_NOISE = re.compile(r"Failed to send resource request|GetTimeoutError|[Pp]lacement_?[Gg]roup_?[Cc]leaner")
RAY_NOISE_NOTE = (
    "moco-ray: Ray reported an internal warning with a traceback (a slow or loaded machine; the run goes on); "
    "it is in Ray's worker logs under the session's logs/ folder (e.g. /tmp/ray/session_latest/logs)"
)
_TRACEBACK = "Traceback (most recent call last):"
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


def _traceback_end(lines: list[str], start: int) -> int:
    """The index after the traceback starting at ``lines[start]`` (its exception line included; chained ones too)."""
    i = start + 1
    while i < len(lines):
        line = lines[i]
        if line.startswith((" ", "\t", _TRACEBACK)) or not line.strip() or line.startswith(_CHAINED):
            i += 1
            continue
        i += 1  # the exception line ("ray.exceptions.GetTimeoutError: ...")
        if i < len(lines) and (not lines[i].strip() or lines[i].startswith(_CHAINED)):
            continue  # a chained traceback follows
        return i
    return i


def split_ray_noise(lines: list[str]) -> tuple[list[str], int]:
    """``lines`` without Ray-internal warnings that carry a traceback (the warning line and its traceback), and how
    many were taken out. A traceback through moco-ray's own code, or one that matches no known Ray-internal
    message, is kept."""
    kept: list[str] = []
    dropped, i = 0, 0
    while i < len(lines):
        if lines[i].startswith(_TRACEBACK):
            end = _traceback_end(lines, i)
            block = lines[i:end]
            head = kept[-1] if kept else ""
            text = "\n".join([head, *block])
            if RAY_INTERNAL_NOISE.search(text) and "moco_ray" not in text:
                if head and RAY_INTERNAL_NOISE.search(head):
                    kept.pop()
                dropped += 1
                i = end
                continue
        kept.append(lines[i])
        i += 1
    return kept, dropped


class ConsoleLines:
    """The driver's handler of the workers' output (in place of Ray's ``ray_print_logs``): moco-ray's own lines
    (rank 0's epoch / progress / phase lines, feature extraction's progress: ``PROGRESS_LINES``) go to stdout
    without Ray's "(RayTrainWorker pid=...)" prefix, Ray-internal warnings with a traceback become one note
    (``split_ray_noise``), blank lines go, and everything else goes through Ray's own printer (prefix,
    deduplication) as before."""

    def __init__(self, ray_print: Callable[[dict[str, Any]], None], out: Any = None) -> None:
        self.ray_print, self.out, self.noted = ray_print, out, False
        self.own = re.compile(PROGRESS_LINES)

    def __call__(self, data: dict[str, Any]) -> None:
        lines = list(data.get("lines") or [])
        if data.get("pid") in ("autoscaler", "raylet") or not lines:
            self.ray_print(data)
            return
        lines, dropped = split_ray_noise(lines)
        own = [ln for ln in lines if self.own.match(ln)]
        # blank lines a worker writes (feature extraction's stream, tqdm's clean-ups) printed as "(pid=...) " alone
        rest = [ln for ln in lines if ln.strip() and not self.own.match(ln)]
        out = self.out or sys.stdout
        if dropped and not self.noted:
            self.noted = True
            own.insert(0, RAY_NOISE_NOTE)
        if own:
            print("\n".join(own), file=out, flush=True)
        if rest:
            self.ray_print({**data, "lines": rest})


def own_console_lines() -> None:
    """Put :class:`ConsoleLines` in place of Ray's handler of the workers' output on this driver (after
    ``ray.init(log_to_driver=True)``). Ray 2.60 has no switch for the prefix of some lines only
    (``RAY_DISABLE_WORKER_LOG_PREFIX`` drops it from every worker's lines, Ray's own included); this uses Ray's
    private dispatcher, and on a Ray without it the console keeps Ray's format."""
    with contextlib.suppress(Exception):
        from ray._private import worker as ray_worker  # lazy: private Ray API, optional

        ignore = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        printer = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=ignore)
        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", ConsoleLines(printer))


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
    if "ray._private.worker" not in sys.modules:  # no Ray in this process (yet): nothing to mute, nothing to import
        return
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


# The signals a scheduler or a closing terminal sends to end a command: `kill`, `ray job stop`, Slurm and Kubernetes
# send SIGTERM, a closed terminal SIGHUP. The CLI gives them Ctrl-C's path (stop_signals_as_ctrl_c).
_routing = {"on": False, "hangup": False}  # within stop_signals_as_ctrl_c; SIGHUP routed (not nohup's)
_received: list[int] = []  # the stop signals routed so far, first first


def stop_signal() -> int:
    """The signal that is ending this process: the first SIGTERM / SIGHUP routed as Ctrl-C, else SIGINT."""
    return _received[0] if _received else signal.SIGINT


def interruption() -> str:
    """How to say what stopped the command: "interrupted" (Ctrl-C) or "stopped by SIGTERM" / "... SIGHUP"."""
    sig = stop_signal()
    return "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"


def _as_ctrl_c(signum: int, frame: Any) -> None:
    """SIGHUP: whatever handles SIGINT now handles it (Python's KeyboardInterrupt, Ray Train's or Tune's graceful
    stop). SIGTERM: KeyboardInterrupt at once, past Ray's graceful stops.

    A SIGTERM's sender allows little time before SIGKILL (``ray job stop`` 3 s, Slurm and Kubernetes 30 s), and a
    Slurm job's end (or ``timeout``) signals every process of the job: the local Ray's GCS and raylet shut down with
    the driver, and the graceful stops waited a minute for them until Ray ended the driver, exit 1, runs RUNNING.
    Without them the run is recorded KILLED within a second; the local Ray stops at exit, and on a cluster the
    run's actors end with the driver that owns them. The SIGINT handler is called, not SIGINT raised: a command
    started in the background by a script (``cmd &``) has SIGINT ignored, and Python then installs no handler.
    """
    if signum == signal.SIGHUP and signum in _received:  # the shell's and the kernel's of one closed terminal
        return
    _received.append(signum)
    handler = signal.getsignal(signal.SIGINT)
    if signum == signal.SIGTERM or not callable(handler):
        mute_worker_logs()  # the teardown's tracebacks would bury the one line that says what to do
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


@contextlib.contextmanager
def stop_signals_as_ctrl_c() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP end the command the way Ctrl-C does (a run ends KILLED with the command that
    continues it, Ray shuts down at exit); the handlers before are put back after. The CLI's choice for each command
    (main thread only), not the library's.

    Without it, SIGTERM hit the C++ failure handler Ray installs in the driver (a ``*** SIGTERM received ... PC:``
    dump, exit 134, the run FAILED) and SIGHUP ended the driver at once (exit 129, the run left RUNNING). A SIGHUP
    already ignored (``nohup``) stays ignored. ``init_ray`` installs the handlers again after Ray's own.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    _received.clear()  # a new command: an earlier one's signal (in the same process) is not this one's
    _routing.update(on=True, hangup=previous[signal.SIGHUP] != signal.SIG_IGN)
    _install_stop_handlers()
    try:
        yield
    finally:
        _routing.update(on=False, hangup=False)
        if signal.SIGHUP in _received:  # the terminal is gone: a late SIGHUP must not cut Ray's shutdown at exit
            previous[signal.SIGHUP] = signal.SIG_IGN
        for sig, handler in previous.items():  # None: one installed outside Python (Ray's), not restorable
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _install_stop_handlers() -> None:
    if not _routing["on"] or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _as_ctrl_c)
    if _routing["hangup"]:
        signal.signal(signal.SIGHUP, _as_ctrl_c)


@contextlib.contextmanager
def _daemons_keep_stop_signals_for_the_driver() -> Iterator[None]:
    """While Ray starts its processes: SIGTERM and SIGHUP blocked, a mask they inherit (and the driver's Ray threads
    too). The driver stops them when it is done (:func:`_stop_daemons_without_grace`).

    A local Ray's GCS, raylet and agents are in the driver's process group and its job: a shell sends a closed
    terminal's SIGHUP to the whole group, ``timeout`` its SIGTERM, and Slurm (``scancel``, the time limit) signals
    every process of the job. They died at once, under a driver that still had to stop the run and record it: the
    driver's core worker, seeing its raylet gone, ended the driver (exit 1, the run RUNNING), and a sweep waited
    ~60 s in Tune's exit for the dead GCS. Ray keeps SIGINT from them the same way. Blocked, not ignored: a signal
    that comes meanwhile reaches the driver once Ray has started.
    """
    if not _routing["on"] or threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {signal.SIGTERM, signal.SIGHUP} if _routing["hangup"] else {signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, kept)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, kept)
    _stop_daemons_without_grace()


def _stop_daemons_without_grace() -> None:
    """Ray's shutdown asks each of its processes to stop with SIGTERM and waits a second before SIGKILL; with SIGTERM
    blocked in them that is a second per process at every exit, and the raylet's agents (its children, with its
    mask) outlived it. So each one's stop is SIGKILL at once, for it and what it started (what Ray does after that
    second anyway); the workers would also exit on their own, seeing their raylet gone."""
    import ray  # lazy: as in init_ray

    node = getattr(ray._private.worker, "_global_node", None)
    for infos in (getattr(node, "all_processes", None) or {}).values():
        for info in infos:
            info.process.terminate = functools.partial(_kill_with_children, info.process)  # type: ignore[method-assign]


def _kill_with_children(process: subprocess.Popen) -> None:
    import psutil  # lazy: only at a local Ray's shutdown

    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        children = []
    process.kill()
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()


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
    t0 = time.monotonic()
    if address and address != "local":  # "local": a new local instance, as with no address at all
        say(f"moco-ray: connecting to the Ray cluster at {address} ...")
        steer_log_dedup(local=False)
        ray.init(address=address, **common)
    else:
        say("moco-ray: starting Ray on this machine ...")
        steer_log_dedup(local=True)
        _start_or_join_local(address, common)
    own_console_lines()
    _install_stop_handlers()
    say(f"moco-ray: Ray up in {time.monotonic() - t0:.1f}s")


def say(line: str) -> None:
    """A driver phase line on stdout, flushed at once: a slow phase (Ray's start, the workers') is announced before
    it runs, not found in a pipe's buffer after it."""
    print(line, flush=True)  # the driver's core worker has just put its C++ SIGTERM handler in place of ours


def _start_or_join_local(address: str | None, common: dict[str, Any]) -> None:
    import ray  # lazy: as in init_ray

    try:
        with _daemons_keep_stop_signals_for_the_driver():
            ray.init(address=address, **common, **local_init_kwargs())
    except ValueError as e:
        if "existing cluster" not in str(e):
            raise
        ray.init(**common)  # a cluster started with `ray start` on this machine: join it as it is
