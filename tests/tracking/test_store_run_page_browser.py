"""The run page moco-ray prints, opened the way a user opens it: the real ``mlflow ui`` command that `where_to_look`
prints (on a free port), and the printed URL in headless chromium with a fresh profile (a first-time browser, whose
GenAI / Model training switch is at MLflow's default, GenAI).

test_store_run_page.py pins the route and the parameter against the UI's JS bundle; this test checks what the
bundle does with them. Skipped where no chromium is installed (``apt-get install -y chromium``). Chromium's
``--dump-dom`` with a virtual-time budget prints the DOM once the single-page app has fetched the run and rendered.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
from moco_helpers import free_port

from moco_ray.tracking.run_log import create_run
from moco_ray.tracking.store import UI_PORT, where_to_look

RUN_NAME = "browser-run-k4096"
METRICS = ("loss", "knn_top1")


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        pytest.skip("no chromium / google-chrome on PATH (Debian: apt-get install -y chromium)")
    return found


class _Page(HTMLParser):
    """What a user sees in a dumped DOM: its text (not scripts/styles) and the sidebar entry marked current."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.words: list[str] = []
        self.links: list[str] = []  # every <a href>
        self.current: list[str] = []  # href of each <a aria-current="page">
        self._skip = 0
        self.feed(dom)
        self.text = " ".join(self.words)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "style"):
            self._skip += 1
        if tag == "a":
            self.links.append(a.get("href") or "")
        if tag == "a" and a.get("aria-current") == "page":
            self.current.append(a.get("href") or "")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.words.append(data.strip())


@pytest.fixture(scope="module")
def ui(chromium, _empty_store, tmp_path_factory):
    """(chromium, tmp dir, the printed run-page URL on the served port, experiment id, run id): a run logged
    through moco-ray's own code into a fresh sqlite store, served by the printed ``mlflow ui`` command (port swapped)
    for the module, killed with its children at the end."""
    tmp = tmp_path_factory.mktemp("ui")
    shutil.copyfile(_empty_store, tmp / "mlflow.db")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    log = create_run(uri, "moco-ray-browser", RUN_NAME, {"moco.queue_size": 4096, "moco.momentum": 0.99}, {}, "a: 1\n")
    log.log_metric_points([(m, v + s / 10, s) for s in (1, 2, 3) for m, v in (("loss", 6.0), ("knn_top1", 0.5))])
    log.finish("FINISHED")
    exp_id = log.get().info.experiment_id

    _, see_it, then_open = where_to_look(uri, log.run_id)
    cmd = see_it.removeprefix("see it: ").split()
    assert cmd[0] == "mlflow" and cmd[cmd.index("--port") + 1] == str(UI_PORT)
    port = free_port()
    cmd[cmd.index("--port") + 1] = str(port)
    url = then_open.removeprefix("  then open ")
    assert url.startswith(f"http://127.0.0.1:{UI_PORT}/#/")
    url = url.replace(f"http://127.0.0.1:{UI_PORT}/", f"http://127.0.0.1:{port}/", 1)

    # One worker and no job runner (7 huey consumers): the same UI, up in ~6 s instead of ~10 s on 2 busy CPUs.
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server_log = (tmp / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", *cmd, "--workers", "1"],
        stdout=server_log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: uvicorn's worker goes down with it
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow ui did not answer: {(tmp / 'server.log').read_text()[-2000:]}")
                time.sleep(0.25)
        yield chromium, tmp, url, exp_id, log.run_id
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        server_log.close()


def _open(chromium: str, tmp: Path, url: str) -> _Page:
    """The DOM of ``url`` after the app rendered, in a browser with a fresh profile (nothing remembered)."""
    profile = tmp / f"profile-{time.monotonic_ns()}"
    flags = "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking"
    flags += " --disable-component-update --disable-sync --virtual-time-budget=20000 --dump-dom"
    out = subprocess.run(
        [chromium, *flags.split(), f"--user-data-dir={profile}", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return _Page(out.stdout)


def test_printed_url_opens_the_run_in_the_training_view(ui):
    """The printed URL shows that run's page (name, id, its metrics and params) with the sidebar on "Model
    training" (its current entry is the experiment's "Runs"), not on GenAI.

    Mutation checked by hand: `run_page` returning the route without ``?{TRAINING_VIEW_QUERY}`` failed here (the
    current entry was GenAI's ``#/experiments/1/evaluation-runs``)."""
    chromium, tmp, url, exp_id, run_id = ui
    page = _open(chromium, tmp, url)
    for shown in (RUN_NAME, run_id, *METRICS, "moco.queue_size", "Model metrics"):
        assert shown in page.text, f"{shown!r} not on the page: {page.text[:1500]}"
    assert [h.split("?")[0] for h in page.current] == [f"#/experiments/{exp_id}/runs"], page.current
    assert not [h for h in page.links if "/overview" in h or "/evaluation-runs" in h], page.links  # GenAI's entries


def test_the_same_page_without_the_parameter_is_the_genai_view(ui):
    """Why the parameter is printed: without it a fresh browser shows the same run under GenAI's "Evaluations",
    with GenAI's sidebar (Overview, Observability, Traces, ...) instead of the runs table. When a new MLflow opens
    the training view here by itself, this fails: the parameter may then go."""
    chromium, tmp, url, exp_id, _ = ui
    page = _open(chromium, tmp, url.split("?")[0])
    assert RUN_NAME in page.text  # the same run ...
    assert page.current == [f"#/experiments/{exp_id}/evaluation-runs"], page.current  # ... in the GenAI view
    assert f"#/experiments/{exp_id}/overview/usage" in page.links  # GenAI's "Overview" entry
