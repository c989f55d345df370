"""SIGTERM and SIGHUP take Ctrl-C's path inside ``stop_signals_as_ctrl_c`` (the CLI wraps every command in it): the
plumbing, with real signals sent to this process. The whole commands, cut by real signals, are in
tests/cli/test_pretrain_interrupt.py (slow) and tests/cli/test_main_interrupts.py.
"""

from __future__ import annotations

import signal

import pytest

from moco_ray.jobs.local_ray import interruption, stop_signal, stop_signals_as_ctrl_c


class _NotRouted(Exception):
    """Raised by the stand-in handlers below: a signal reached them instead of Ctrl-C's path."""


def _refuse(signum: int, frame: object) -> None:
    raise _NotRouted(signal.Signals(signum).name)


@pytest.fixture
def handlers():
    """SIGINT, SIGTERM, SIGHUP: stand-ins that fail the test (not this process's end) while it runs, and the
    handlers before put back after it."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {s: signal.getsignal(s) for s in sigs}
    for s in sigs:
        signal.signal(s, _refuse)
    yield
    for s, h in before.items():
        signal.signal(s, signal.SIG_DFL if h is None else h)


def _send(sig: int) -> None:
    """``sig`` to this thread (``raise``); its Python handler runs before the next line."""
    signal.raise_signal(sig)


def test_sighup_runs_the_sigint_handler_once_even_where_sigint_is_ignored(handlers):
    """SIGHUP calls whatever handles SIGINT (Ray Train's and Tune's graceful stops are SIGINT handlers), once for
    the two SIGHUPs of one closed terminal (the kernel's and the shell's); with SIGINT ignored, as in a job a script
    started with ``&``, it is a KeyboardInterrupt all the same. After it, SIGHUP stays ignored: a late one must not
    cut Ray's shutdown at exit.

    Mutations (each failed here): SIGINT raised (``signal.raise_signal``) instead of its handler called (nothing
    happens where SIGINT is ignored); the second SIGHUP not dropped (the graceful stop called twice).
    """
    calls: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    with stop_signals_as_ctrl_c():
        _send(signal.SIGHUP)
        _send(signal.SIGHUP)
        assert calls == [signal.SIGINT]
        assert (stop_signal(), interruption()) == (signal.SIGHUP, "stopped by SIGHUP")
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN

    signal.signal(signal.SIGHUP, _refuse)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with pytest.raises(KeyboardInterrupt), stop_signals_as_ctrl_c():
        _send(signal.SIGHUP)


def test_sigterm_is_a_keyboard_interrupt_past_the_sigint_handler_and_the_handlers_come_back(handlers):
    """SIGTERM raises KeyboardInterrupt at once, without Ray's graceful stop (a scheduler's deadline; under Slurm
    the local Ray is going down with the driver); afterwards the handlers before are back, and the next command
    starts with no signal on record.

    Mutation (failed here): the SIGTERM handed to the SIGINT handler like SIGHUP (the stand-in ran instead).
    """
    signal.signal(signal.SIGINT, _refuse)
    with pytest.raises(KeyboardInterrupt), stop_signals_as_ctrl_c():
        _send(signal.SIGTERM)
    assert (stop_signal(), interruption()) == (signal.SIGTERM, "stopped by SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is _refuse and signal.getsignal(signal.SIGHUP) is _refuse
    with stop_signals_as_ctrl_c():
        assert (stop_signal(), interruption()) == (signal.SIGINT, "interrupted")


def test_a_sighup_ignored_by_nohup_stays_ignored(handlers):
    """``nohup moco-ray ...`` asks to outlive the terminal: SIGHUP is not routed."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with stop_signals_as_ctrl_c():
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        _send(signal.SIGHUP)
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
