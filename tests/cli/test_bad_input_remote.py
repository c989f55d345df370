"""Remote locations that do not answer, through the real CLI: a bucket that does not exist (on a real S3 API, moto's
server on loopback), an endpoint that refuses connections, one that accepts and never answers, for ``data.shards``,
``train.storage_path`` and ``--resume``'s checkpoint lookup: each one line ``moco-ray: error: ...``, exit 2, no
traceback, no Ray started, within ``MOCO_RAY_REMOTE_TIMEOUT_S``; and Ctrl-C during such a check ends the command
at once. Before: ``data.shards=gs://nonexistent-bucket/x`` printed nothing for ~17 minutes (pyarrow's retries) and a
Ctrl-C at 60 s took effect at ~1000 s.

The refusals run in ONE fresh interpreter, each through ``moco_ray.cli.main.main`` with its own environment (the
endpoint), as tests/cli/test_bad_input.py does; the Ctrl-C goes to the installed console script.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from moco_helpers import REPO, cli_env, free_port

# Each case: main(argv) with the case's environment on top of the session's; rc, stderr, Ray started, seconds.
_RUNNER = r"""
import contextlib, io, json, os, sys, time, traceback
import ray
from moco_ray.cli.main import main
import mlflow, moco_ray.jobs.pretrain  # imported before the clock starts

cases = json.loads(open(sys.argv[1]).read())
out, base = {}, dict(os.environ)
for name, case in cases.items():
    os.environ.clear()
    os.environ.update({**base, **case["env"]})
    err = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(case["argv"])
        except SystemExit as e:
            rc = e.code
        except BaseException:
            rc = None
            traceback.print_exc()
    out[name] = {"rc": rc, "stderr": err.getvalue(), "ray_started": ray.is_initialized(),
                 "seconds": time.monotonic() - t0}
    if ray.is_initialized():
        ray.shutdown()
open(sys.argv[2], "w").write(json.dumps(out))
"""
DEADLINE_S = 2  # MOCO_RAY_REMOTE_TIMEOUT_S of the silent-endpoint cases
WITHIN_S = 30  # "within seconds, not 17 minutes": the deadline plus a loaded 2-CPU machine's process starts


@contextlib.contextmanager
def _silent_listener() -> Iterator[socket.socket]:
    """A loopback socket that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield s


def _endpoint(s: socket.socket) -> str:
    return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def silent_endpoint() -> Iterator[str]:
    with _silent_listener() as s:
        yield _endpoint(s)


def _resume_case(uri: str, run_dir: str, env: dict | None = None, expect: str = "") -> dict:
    """``--resume`` of a KILLED pretraining run as the trainer leaves it, its checkpoints said to be under
    ``run_dir``."""
    from moco_ray.config import load_config
    from moco_ray.jobs.resume import RUN_DIR_TAG
    from moco_ray.tracking.run_log import create_run, version_tags

    cfg = load_config(REPO / "experiments" / "quickstart.yaml", {"data.source": "", "tracking.experiment": "remote"})
    log = create_run(uri, "remote", "stopped", cfg.flat(), version_tags(), cfg.to_yaml())
    log.set_tags({RUN_DIR_TAG: run_dir})
    log.finish("KILLED")
    argv = ["pretrain", "--resume", log.run_id, f"tracking.tracking_uri={uri}"]
    return {"argv": argv, "env": env or {}, "expect": expect, "clean": []}


def _pretrain_case(d: Path, shards: str, storage: str = "", env: dict | None = None, expect: str = "") -> dict:
    """A pretraining with its own MLflow store and storage path under ``d``, which a refusal must not create."""
    d.mkdir()
    where = [f"tracking.tracking_uri=sqlite:///{d / 'mlflow.db'}", f"data.shards={shards}"]
    where.append(f"train.storage_path={storage or d / 'runs'}")
    argv = ["pretrain", "-c", "experiments/quickstart.yaml", "data.source=", *where]
    return {"argv": argv, "env": env or {}, "expect": expect, "clean": [str(d / "mlflow.db"), str(d / "runs")]}


@pytest.fixture(scope="module")
def cases(s3, silent_endpoint, _empty_store, tmp_path_factory) -> dict[str, dict]:
    t = tmp_path_factory.mktemp("bad_input_remote")
    shutil.copyfile(_empty_store, t / "resume.db")
    resume_uri = f"sqlite:///{t / 'resume.db'}"
    s3.bucket("remote-runs")
    silent = {"AWS_ENDPOINT_URL": silent_endpoint, "MOCO_RAY_REMOTE_TIMEOUT_S": str(DEADLINE_S)}
    refused = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # bound, then released: nobody listens
    within = rf"did not answer within {DEADLINE_S} s \(check the endpoint, the network and the credentials; "
    no_bucket = r"bucket 'no-such-bucket' does not exist \(or these credentials cannot see it\)"
    nowhere = str(t / "no-shards")  # checked after the storage: a storage left unchecked fails on these instead

    def pretrain(name: str, *args: str, **kwargs) -> dict:
        return _pretrain_case(t / name, *args, **kwargs)

    def resume(run_dir: str, **kwargs) -> dict:
        return _resume_case(resume_uri, run_dir, **kwargs)

    return {
        "shards_no_bucket": pretrain(
            "shards_no_bucket", "s3://no-such-bucket/x", expect=rf"^data\.shards: s3://no-such-bucket/x: {no_bucket}"
        ),
        "shards_refused": pretrain(
            "shards_refused", "s3://remote-shards/x", env=refused,
            expect=r"^data\.shards: cannot reach s3://remote-shards/x \(.*(connect|Connect)",
        ),
        "shards_silent": pretrain(
            "shards_silent", "s3://remote-shards/x", env=silent, expect=rf"^data\.shards: s3://remote-shards/x {within}"
        ),
        "storage_no_bucket": pretrain(
            "storage_no_bucket", nowhere, "s3://no-such-bucket/runs",
            expect=rf"^train\.storage_path: s3://no-such-bucket/runs: {no_bucket}",
        ),
        "storage_refused": pretrain(
            "storage_refused", nowhere, "s3://remote-runs/runs", env=refused,
            expect=r"^train\.storage_path: cannot reach s3://remote-runs/runs \(.*(connect|Connect)",
        ),
        "storage_silent": pretrain(
            "storage_silent", nowhere, "s3://remote-runs/runs", env=silent,
            expect=rf"^train\.storage_path: s3://remote-runs/runs {within}",
        ),
        "timeout_not_a_number": pretrain(
            "timeout_not_a_number", "s3://remote-shards/x", env={"MOCO_RAY_REMOTE_TIMEOUT_S": "soon"},
            expect=r"^MOCO_RAY_REMOTE_TIMEOUT_S: 'soon' is not a number of seconds > 0",
        ),
        "resume_no_bucket": resume(
            "s3://no-such-bucket/runs/moco-x",
            expect=rf"^train\.storage_path: s3://no-such-bucket/runs/moco-x: {no_bucket}",
        ),
        "resume_silent": resume(
            "s3://remote-runs/runs/moco-x", env=silent,
            expect=rf"^train\.storage_path: s3://remote-runs/runs/moco-x {within}",
        ),
    }  # fmt: skip


@pytest.fixture(scope="module")
def results(cases, tmp_path_factory) -> dict[str, dict]:
    t = tmp_path_factory.mktemp("bad_input_remote_run")
    (t / "cases.json").write_text(json.dumps({k: {"argv": c["argv"], "env": c["env"]} for k, c in cases.items()}))
    argv = [sys.executable, "-c", _RUNNER, str(t / "cases.json"), str(t / "out.json")]
    p = subprocess.run(argv, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads((t / "out.json").read_text())


NAMES = [
    "shards_no_bucket",
    "shards_refused",
    "shards_silent",
    "storage_no_bucket",
    "storage_refused",
    "storage_silent",
    "timeout_not_a_number",
    "resume_no_bucket",
    "resume_silent",
]


def test_every_case_is_listed(cases):
    assert sorted(cases) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_unreachable_remote_location_is_one_line_in_seconds(name, cases, results):
    """Mutations caught (each failed here): no ``data.shards`` probe in ``check_targets`` (the missing bucket read
    as "no manifest.json", the silent endpoint past the bound: pyarrow's retries); ``check_writable`` returning at
    once for a URI, as before (storage cases: the shards' error instead); ``latest_checkpoint`` returning None for
    URIs, as before (resume cases: "no checkpoint found"); the probe called in the CLI's own process without a
    deadline (silent cases: pyarrow's own timeout line instead of the deadline's)."""
    case, r = cases[name], results[name]
    err = r["stderr"]
    assert r["rc"] == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moco-ray: error: "), err
    assert re.search(case["expect"], lines[0].removeprefix("moco-ray: error: ")), lines[0]
    assert r["ray_started"] is False
    assert r["seconds"] < WITHIN_S, r
    for p in case["clean"]:
        assert not Path(p).exists(), f"{name} left {p} behind"


def test_ctrl_c_during_a_remote_check_ends_the_command_at_once(tmp_path):
    """SIGINT while ``data.shards`` waits on an endpoint that never answers (deadline 600 s): exit 130 within
    seconds, one line, no traceback. The test's listening socket tells when the check is under way.

    Mutations caught (each failed here, past the bound): the probe called in the CLI's own process (the blocked
    pyarrow call holds the Ctrl-C); the probe in a daemon thread of that process joined in slices (the Ctrl-C
    lands, but pyarrow's S3 shutdown at exit waits for the request in flight).
    """
    script = Path(sys.executable).with_name("moco-ray")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "moco_ray.cli.main"]
    where = [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"train.storage_path={tmp_path / 'runs'}"]
    argv = [*cmd, "pretrain", "-c", "experiments/quickstart.yaml", "data.source=", "data.shards=s3://remote/x", *where]
    with _silent_listener() as listener:
        env = cli_env(AWS_ENDPOINT_URL=_endpoint(listener), MOCO_RAY_REMOTE_TIMEOUT_S="600")
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            listener.settimeout(WITHIN_S * 4)  # the CLI's imports first: ~10 s on a loaded 2-CPU machine
            listener.accept()[0].close()  # the check is now waiting for an answer
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=WITHIN_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert re.fullmatch(r"moco-ray: [^\n]*interrupted[^\n]*\n", err), err
