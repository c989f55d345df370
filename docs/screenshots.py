"""Retake the pictures of docs/mlflow-ui.md from a real store: the run page the console's URL opens, its "Model
metrics" tab, and the runs table with a sweep's parent row expanded.

Needs: chromium (Debian: ``apt-get install -y chromium``; google-chrome works too) and the project's venv (mlflow,
and aiohttp, which mlflow requires, for the browser's DevTools protocol). No Playwright, no new dependency.

Make the runs first, in a scratch directory (the quickstart writes ./mlflow.db, ./data and ./moco-ray-runs there;
about 3 + 4 minutes on 2 CPUs)::

    mkdir -p /tmp/shots && cd /tmp/shots
    moco-ray experiments quickstart > quickstart.yaml
    moco-ray pretrain                                  # the README's quickstart (experiment moco-ray-quickstart)
    moco-ray sweep -c sweep_tiny.yaml                  # 2 trials into the same experiment, one after the other

with this sweep_tiny.yaml (the pictures of 2026-12-05)::

    base: quickstart.yaml
    train: {epochs: 3, cpus_per_worker: 0.49}          # 0.5 leaves no room for a trial's own 0.01 CPU on 2 CPUs
    eval: {knn_every: 1}
    search: {moco.momentum: {grid: [0.99, 0.999]}}
    sweep: {metric: knn_top1, mode: max, scheduler: fifo, name: sweep_tiny}

then, from the repository root (about 20 s)::

    .venv/bin/python docs/screenshots.py --tracking-uri sqlite:////tmp/shots/mlflow.db

It serves the store with ``mlflow ui`` on a free port, opens the URLs moco-ray prints (`run_page`) in headless
chromium with a fresh profile (a first-time browser: GenAI / Model training switch at its default) and writes
docs/img/mlflow_run_page.png, mlflow_run_metrics.png and mlflow_runs_table.png (1400 px wide). The run is the newest
finished top-level run named ``--run-name``; the sweep parent the newest top-level run that has child runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

IMG = Path(__file__).resolve().parent / "img"
WIDTH = 1400
# Runs-table columns toggled: the metrics to rank by in, two default attributes that push them off-screen out.
TOGGLED_COLUMNS = ("Source", "Models", "knn_top1", "loss")
CHARTS = "knn_top1|loss|step_"  # the run's "Model metrics" charts shown
# Without the networking flags chromium hangs on a machine with no way out (update checks, sync, QUIC probes).
FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking"
    " --disable-component-update --disable-sync --hide-scrollbars"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"{what} did not answer at {url}")
            time.sleep(0.25)


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, with its children (uvicorn's worker, chromium's helpers)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Tab:
    """One browser tab driven over the DevTools protocol (a websocket): just what the three pictures need."""

    def __init__(self, ws) -> None:
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def js(self, expr: str):
        res = await self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return res["result"].get("value")

    async def until(self, expr: str, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not await self.js(expr):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never showed {what}")
            await asyncio.sleep(0.5)

    async def open(self, url: str, height: int) -> None:
        await self.call(
            "Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1, mobile=False
        )
        await self.call("Page.navigate", url=url)

    async def shot(self, path: Path) -> None:
        # The "MLflow Assistant" side panel opens on every first visit and takes a third of the width: close it.
        await self.js("document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')?.click()")
        await asyncio.sleep(2)  # charts animate in, the page reflows
        png = base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])
        path.write_bytes(png)
        print(f"{path} ({len(png) // 1024} KB)")


def text_has(*words: str) -> str:
    return " && ".join(f"document.body.innerText.includes({json.dumps(w)})" for w in words)


async def take(debug_port: int, ui: str, exp_id: str, run, parent, out: Path) -> None:
    import aiohttp  # lazy: only this script needs it

    from moco_ray.tracking.store import run_page

    async with aiohttp.ClientSession() as s:
        async with s.put(f"http://127.0.0.1:{debug_port}/json/new?about:blank") as r:
            target = await r.json()
        async with s.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            tab = Tab(ws)
            page = run_page(ui, exp_id, run.info.run_id)
            await tab.open(page, 900)
            await tab.until(text_has(run.info.run_name, "About this run", "knn_top1"), "the run page")
            await tab.shot(out / "mlflow_run_page.png")

            await tab.open(page.replace("?", "/model-metrics?", 1), 1340)
            await tab.until("document.querySelectorAll('svg.main-svg').length >= 4", "the metric charts")
            # The charts' search box takes a regex: the two curves to read first, and the in-epoch step_* ones.
            await tab.js("document.querySelector('input[placeholder=\"Search metric charts\"]').focus()")
            await tab.call("Input.insertText", text=CHARTS)
            await tab.js("document.activeElement.blur()")
            await tab.shot(out / "mlflow_run_metrics.png")

            table = f"{ui}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
            await tab.open(table, 560)
            await tab.until(text_has(parent.info.run_name), "the sweep parent row")
            # "Columns" -> (un)tick entries of its tree -> close it.
            await tab.js("[...document.querySelectorAll('button')].find(b => b.innerText.trim() == 'Columns').click()")
            await tab.until("!!document.querySelector('.du-bois-light-tree-title')", "the column selector")
            for column in TOGGLED_COLUMNS:
                await tab.js(f"""[...document.querySelectorAll('.du-bois-light-tree-treenode')]
                    .find(n => n.querySelector('.du-bois-light-tree-title')?.innerText.trim() == {json.dumps(column)})
                    ?.querySelector('.du-bois-light-tree-checkbox')?.click()""")
            await tab.js("[...document.querySelectorAll('button')].find(b => b.innerText.trim() == 'Columns').click()")
            await asyncio.sleep(1)
            rows = await tab.js("document.querySelectorAll('[role=row]').length")
            # The parent row's expander is the button in the row that names it; its children follow once clicked.
            clicked = await tab.js(f"""(() => {{
                const name = {json.dumps(parent.info.run_name)};
                const row = [...document.querySelectorAll('[role=row]')].find(r => r.innerText.includes(name));
                const btn = row && row.querySelector('button');
                if (btn) btn.click();
                return !!btn;
            }})()""")
            if not clicked:
                raise RuntimeError("no expander on the sweep parent's row")
            await tab.until(f"document.querySelectorAll('[role=row]').length > {rows}", "the trials under the parent")
            await tab.shot(out / "mlflow_runs_table.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", required=True, help="the store, e.g. sqlite:////tmp/shots/mlflow.db")
    ap.add_argument("--experiment", default="moco-ray-quickstart")
    ap.add_argument("--run-name", default="quickstart")
    ap.add_argument("--out", type=Path, default=IMG, help="where the PNGs go (default: docs/img)")
    args = ap.parse_args()

    from mlflow.tracking import MlflowClient

    c = MlflowClient(args.tracking_uri)
    exp = c.get_experiment_by_name(args.experiment)
    if exp is None:
        sys.exit(f"no experiment {args.experiment!r} in {args.tracking_uri}")
    runs = c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=500)
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    run = next((r for r in top if r.info.run_name == args.run_name and r.info.status == "FINISHED"), None)
    parent = next((r for r in top if r.info.run_id in parents), None)
    if run is None or parent is None:
        sys.exit(f"need a finished run named {args.run_name!r} and a sweep parent in {args.experiment!r}")

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        sys.exit("no chromium on PATH (Debian: apt-get install -y chromium)")
    port, debug_port = free_port(), free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = subprocess.Popen(
        # moco-ray's printed `mlflow ui` command; one worker and no job runner: the same UI, started faster.
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            args.tracking_uri,
            *f"--host 127.0.0.1 --port {port} --workers 1".split(),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen(
            [
                chromium,
                *FLAGS.split(),
                f"--user-data-dir={profile}",
                f"--remote-debugging-port={debug_port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            ui = f"http://127.0.0.1:{port}"
            wait_http(f"{ui}/health", server, "mlflow ui")
            wait_http(f"http://127.0.0.1:{debug_port}/json/version", browser, "chromium")
            asyncio.run(take(debug_port, ui, exp.experiment_id, run, parent, args.out))
        finally:
            stop(browser)
            stop(server)


if __name__ == "__main__":
    main()
