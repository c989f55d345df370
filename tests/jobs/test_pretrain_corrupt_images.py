"""Shards whose images are all corrupt (valid schema and checksums, undecodable bytes): the run fails on
``data.max_corrupt_fraction`` with an error naming the count, ends FAILED, and logs no encoder (before the fix it
FINISHED, trained on grey stand-ins)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moco_helpers import TINY_MODEL, cli_env

pytestmark = pytest.mark.ray


def _all_corrupt(shards: Path, dst: Path) -> Path:
    """A copy of ``shards`` whose train images are garbage; the manifest's sizes and sha256 agree with the files."""
    shutil.copytree(shards, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for s in m["shards"]:
        if s["split"] != "train":
            continue
        path = dst / s["path"]
        table = pq.read_table(path)
        junk = pa.array([b"\xff\xd8\xff" + bytes(range(64)) for _ in range(table.num_rows)], pa.binary())
        pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", junk), path)
        data = path.read_bytes()
        s.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_all_corrupt_images_fail_the_run(small_shards, tmp_path, mlflow_uri):
    """Through the console script: exit 2 and the error as moco-ray's one line (before: Ray's worker traceback)."""
    from mlflow.tracking import MlflowClient

    over = {
        "data.shards": str(_all_corrupt(small_shards, tmp_path / "bad")),
        "data.limit": 64,
        "data.map_batch_size": 32,
        **TINY_MODEL,
        "moco.queue_size": 64,
        "train.epochs": 2,
        "train.batch_size": 32,
        "train.max_steps_per_epoch": 1,
        "train.max_failures": 0,  # a data error is not transient: no restart
        "train.storage_path": str(tmp_path / "runs"),
        "eval.knn_every": 0,
        "tracking.tracking_uri": mlflow_uri,
        "tracking.experiment": "test-corrupt",
    }
    p = subprocess.run(
        [sys.executable, "-m", "moco_ray.cli.main", "pretrain", "-c", "experiments/quickstart.yaml",
         *[f"{k}={v}" for k, v in over.items()]],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], env=cli_env(),
        timeout=600,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr[-3000:]
    assert not any(ln.startswith("Traceback") for ln in p.stderr.splitlines()), p.stderr[-3000:]
    c = MlflowClient(mlflow_uri)
    (run,) = c.search_runs([c.get_experiment_by_name("test-corrupt").experiment_id])
    count = (
        f"moco-ray: error: run {run.info.run_id} FAILED: data: 32 of 32 images in epoch 1 were corrupt (100.0%; "
        "decoded as grey), above data.max_corrupt_fraction = 0.01; re-ingest the shards"
    )
    assert p.stderr.strip().splitlines()[-1].startswith(count), p.stderr[-3000:]
    assert run.info.status == "FAILED"
    assert "moco_ray.encoder_model_uri" not in run.data.tags
    assert not [a for a in c.list_artifacts(run.info.run_id) if a.path.startswith("encoder")]
