"""A real two-node Ray cluster on loopback: head + one more raylet, each with its own CPUs; DDP over gloo.

The cluster lives in a subprocess (`_SCENARIO`) so it never meets the session's shared local Ray, and with its own
RAY_TMPDIR so its address file (`ray_current_cluster`, which ``ray.init()`` without an address reads) is invisible
to anybody else on the machine. Both nodes are stopped in ``finally``, also when the run fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from moco_helpers import TINY_MODEL

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

_SCENARIO = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster

overrides, out = json.loads(sys.argv[1]), sys.argv[2]
node_args = {"num_cpus": 2, "num_gpus": 0, "object_store_memory": 200 * 1024 * 1024}
cluster = None
try:
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    cluster.add_node(**node_args)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)  # init_ray() then does nothing
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    from moco_ray.jobs.pretrain import run_pretraining

    res = run_pretraining(None, overrides)
    open(out, "w").write(json.dumps({"run_id": res.run_id, "nodes": nodes}))
finally:
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
"""


@pytest.fixture(scope="module")
def shards(image_root, tmp_path_factory) -> Path:
    """64 real training images (2 classes x 32)."""
    from moco_ray.data.ingest import ingest

    src = tmp_path_factory.mktemp("multinode_src")
    for cls_dir in sorted((image_root / "train").iterdir())[:2]:
        (src / "train" / cls_dir.name).mkdir(parents=True)
        for f in sorted(cls_dir.iterdir())[:32]:
            shutil.copyfile(f, src / "train" / cls_dir.name / f.name)
    out = tmp_path_factory.mktemp("multinode_shards") / "s"
    ingest(src, out, progress=False)
    return out


def test_two_nodes_one_worker_each(shards, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    overrides = {
        "data.shards": str(shards),
        "data.limit": 64,
        "data.map_batch_size": 32,
        **TINY_MODEL,
        "moco.queue_size": 64,
        "train.epochs": 1,
        "train.batch_size": 32,  # 2 steps: the point is where the workers run, not how long
        "train.num_workers": 2,
        "train.cpus_per_worker": 1,  # of 2 CPUs per node: SPREAD puts one worker on each, Ray Data keeps 1 CPU
        "train.placement_strategy": "SPREAD",
        "train.storage_path": str(tmp_path / "runs"),  # one filesystem: both nodes reach it, as shared storage
        "eval.knn_every": 0,
        "tracking.tracking_uri": mlflow_uri,
        "tracking.experiment": "test-multinode",
    }
    ray_tmp = tempfile.mkdtemp(prefix="mr")  # short: Ray's unix socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["RAY_TMPDIR"] = ray_tmp
    out = tmp_path / "result.json"
    # its own session: on a hang, the timeout (only there to turn a hang into a failure) kills the scenario and
    # every Ray process it started, by their process group, and nothing else
    p = subprocess.Popen(
        [sys.executable, "-c", _SCENARIO, json.dumps(overrides), str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        pytest.fail(f"the two-node run hung; its stderr ends: {stderr[-3000:]}")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 0, (stdout[-3000:], stderr[-6000:])
    res = json.loads(out.read_text())
    assert len(res["nodes"]) == 2

    run = MlflowClient(mlflow_uri).get_run(res["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.placement_strategy"] == "SPREAD"
    workers = run.data.tags["moco_ray.worker_nodes"].split(",")
    assert len(workers) == 2 and set(workers) == set(res["nodes"])  # one worker on each node
    assert MlflowClient(mlflow_uri).get_metric_history(res["run_id"], "loss")  # it trained
