"""The driver's handler of the workers' output (``ConsoleLines``, in place of Ray's ``ray_print_logs``), fed
batches as Ray's log thread feeds them, with Ray's own printer behind it: moco-ray's lines without Ray's
"(RayTrainWorker pid=...)" prefix, Ray-internal tracebacks held back (one note), everything else as Ray prints it.
The whole path through a real run: tests/cli/test_pretrain_console.py."""

from __future__ import annotations

import functools
import io

import pytest
from ray._private import worker as ray_worker

from moco_ray.jobs.local_ray import RAY_NOISE_NOTE, ConsoleLines, split_ray_noise

# Ray Train's autoscaling client on a loaded machine (logger.warning(..., exc_info=True)), as the worker wrote it
RAY_WARNING = [
    "Failed to send resource request for abc. If this only happens transiently during network partition or CPU "
    "being overloaded, it's safe to ignore this error. If this error persists, file a GitHub issue.",
    "Traceback (most recent call last):",
    '  File "/x/ray/train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py", line 58, in send',
    "    ray.get(",
    '  File "/x/ray/_private/worker.py", line 2961, in get',
    "    raise GetTimeoutError(",
    "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
]
OURS = ["Traceback (most recent call last):", '  File "/x/moco_ray/train/loop.py", line 1, in f', "ValueError: bad"]


def _batch(lines: list[str], is_err: bool = True) -> dict:
    return {"ip": "127.0.0.1", "localhost": "127.0.0.1", "pid": 4242, "actor_name": "RayTrainWorker",
            "is_err": is_err, "lines": lines}  # fmt: skip


@pytest.fixture
def console(monkeypatch, capsys):
    """A ConsoleLines with Ray's real printer (prefix, dedup; it writes to sys.stderr, read with capsys) and its
    own lines in a buffer."""
    out = io.StringIO()
    monkeypatch.setenv("RAY_COLOR_PREFIX", "0")
    printer = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=False)
    return ConsoleLines(printer, out=out), out, lambda: capsys.readouterr().err


def test_own_lines_bare_others_with_ray_prefix(console):
    """Mutations checked by hand: ``own`` matched against nothing (every line to Ray's printer) gave
    "(RayTrainWorker pid=4242) epoch 1/4 ..." and failed the first assertion; blank lines kept in ``rest`` printed
    two bare "(RayTrainWorker pid=4242) " lines."""
    c, out, ray_err = console
    c(_batch(["epoch 1/4  loss 5.1000  top1 0.100", "[k=1024] epoch 1/4  step 3/22 (14%)", "moco-ray: first step"]))
    c(_batch(["some other worker line", "", "  "]))
    c(_batch(["features train: rows 512/1797 (28%)  ETA 12s", ""]))
    assert out.getvalue().splitlines() == [
        "epoch 1/4  loss 5.1000  top1 0.100", "[k=1024] epoch 1/4  step 3/22 (14%)", "moco-ray: first step",
        "features train: rows 512/1797 (28%)  ETA 12s",
    ]  # fmt: skip
    # the other line keeps Ray's prefix; the blank ones are not printed as a bare "(RayTrainWorker pid=4242) "
    assert [ln for ln in ray_err().splitlines() if "4242" in ln] == ["(RayTrainWorker pid=4242) some other worker line"]


def test_ray_internal_traceback_becomes_one_note(console):
    """Mutation checked by hand: ``split_ray_noise`` returning its input unchanged printed the 7-line traceback
    with Ray's prefix between the epoch lines."""
    c, out, ray_err = console
    c(_batch(["epoch 1/4  loss 5.1000", *RAY_WARNING, "epoch 2/4  loss 5.0000"]))
    c(_batch(RAY_WARNING))
    assert out.getvalue().splitlines() == [RAY_NOISE_NOTE, "epoch 1/4  loss 5.1000", "epoch 2/4  loss 5.0000"]
    err = ray_err()
    assert "GetTimeoutError" not in err and "Failed to send" not in err


def test_split_keeps_tracebacks_through_moco_ray_and_unknown_ones():
    unknown = ["Traceback (most recent call last):", '  File "/x/ray/a.py", line 1, in f', "KeyError: 'x'"]
    lines = [*OURS, *unknown, "after"]
    assert split_ray_noise(lines) == (lines, 0)
    assert split_ray_noise(["before", *RAY_WARNING, "after"]) == (["before", "after"], 1)
