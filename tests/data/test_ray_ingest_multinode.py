"""The Ray Data ingest on a real two-node Ray cluster on loopback (head + one more raylet, 1 CPU each), from and to
a real S3 API (moto's server): both nodes write shards, and the rows are the local ingest's.

The cluster lives in a subprocess (`_SCENARIO`) with a Ray temp dir of its own, as in
tests/jobs/test_pretrain_multinode.py, so it never meets the session's local Ray; both nodes are stopped in
``finally``. Mutation checked by hand: the shard tasks always pinned to the driver's node (`_Job.pinned` True):
every shard came from the head.
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

import pyarrow.parquet as pq
import pytest
from s3_trees import image_tree, upload

from moco_ray.data.ingest import ingest
from moco_ray.data.manifest import read_manifest, resolve_fs

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

_SCENARIO = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster

src, out, result = sys.argv[1:4]
node_args = {"num_cpus": 1, "num_gpus": 0, "object_store_memory": 150 * 1024 * 1024}
cluster = None
try:
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    cluster.add_node(**node_args)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    from moco_ray.data.ray_ingest import ray_ingest

    r = ray_ingest(src, out, shard_size_mb=0.0001, progress=False)  # a shard per image: 12 tasks
    open(result, "w").write(json.dumps({"nodes": nodes, "shard_nodes": r.nodes}))
finally:
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
"""


def _rows(root: str | Path) -> list[tuple[str, int, bytes]]:
    m = read_manifest(root)
    fs, base = resolve_fs(root)
    return [
        (r["id"], r["label"], r["image"])
        for s in m.shards
        for r in pq.read_table(f"{base}/{s.path}", filesystem=fs, columns=["id", "label", "image"]).to_pylist()
    ]


def test_two_raylets_share_the_shards(s3, tmp_path):
    local = image_tree(tmp_path / "src", per_class=6)
    src = upload(local, f"{s3.bucket('ray-ingest-2nodes')}/src")
    out = f"{s3.bucket('ray-ingest-2nodes')}/out"
    ray_tmp = tempfile.mkdtemp(prefix="mr")  # short: Ray's unix socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = tmp_path / "result.json"
    p = subprocess.Popen(
        [sys.executable, "-c", _SCENARIO, src, out, str(result)],
        cwd=REPO,
        env={**env, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # on a hang the timeout kills the scenario and its Ray processes, nothing else
    )
    try:
        _, stderr = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, stderr = p.communicate()
        pytest.fail(f"the two-node ingest hung; its stderr ends: {stderr[-3000:]}")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 0, stderr[-6000:]
    res = json.loads(result.read_text())
    assert len(res["nodes"]) == 2 and len(res["shard_nodes"]) == 12
    assert set(res["shard_nodes"]) == set(res["nodes"])  # both raylets ran shard tasks
    ingest(local, tmp_path / "local", progress=False)
    assert _rows(out) == _rows(tmp_path / "local")
