"""`moco-ray ingest`'s driver (`moco_ray.jobs.ingest_job.run_ingest`): which ingest runs, refusals in one line before
Ray starts, a finished ingest starting no Ray, and a killed Ray ingest leaving no manifest. Real S3 API (moto's
server on loopback), real Ray (the session's, or a fresh one in a subprocess where "before Ray starts" or a kill is
the point).

Until `moco-ray ingest` calls `run_ingest` (cli/main.py), the subprocesses run it through `_CLI`, which prints a
refusal as the CLI prints one (``moco-ray: error: ...``, exit 2). Mutations checked by hand are in each docstring.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from s3_server import S3_ENV_KEYS
from s3_trees import image_tree, objects, upload

from moco_ray.data.ingest import ingest
from moco_ray.data.manifest import manifest_exists
from moco_ray.data.schema import validate_shards
from moco_ray.jobs.ingest_job import run_ingest

REPO = Path(__file__).resolve().parents[2]
BUCKET = "ingest-job"

# Each case (source, out, options) through run_ingest; the JSON line says what each did and whether Ray started.
_CLI = r"""
import json, sys
import ray
from moco_ray.jobs.ingest_job import run_ingest

results = []
for source, out, options in json.loads(sys.argv[1]):
    try:
        r = run_ingest(source, out, progress=False, **options)
        results.append({"engine": r.engine, "already_done": r.already_done, "counts": r.manifest.counts})
    except (ValueError, FileNotFoundError) as e:
        results.append({"error": f"moco-ray: error: {e}"})
print(json.dumps({"results": results, "ray_started": ray.is_initialized()}))
"""


def _run_cases(cases: list[tuple[str, str, dict]], env: dict[str, str] | None = None) -> dict:
    """`_CLI` in a fresh interpreter, with a Ray temp dir of its own (it would never join the session's Ray)."""
    ray_tmp = tempfile.mkdtemp(prefix="mr")
    env = {k: v for k, v in (env or os.environ).items() if k != "RAY_ADDRESS"}
    try:
        p = subprocess.run(
            [sys.executable, "-c", _CLI, json.dumps(cases)],
            cwd=REPO,
            env={**env, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _one_line(result: dict) -> str:
    line = result["error"]
    assert "\n" not in line and "Traceback" not in line
    return line


@pytest.mark.ray
def test_a_local_tree_into_s3_runs_the_ray_ingest(ray_local, s3, tmp_path):
    """The README's ``moco-ray ingest /data/imagenet s3://$BUCKET/...``: the Ray ingest, the local ingest's
    counts, shards checked over S3. Mutation: `uses_ray` looking at SOURCE only (the local ingest refused the URI)."""
    tree = image_tree(tmp_path / "src", per_class=4)
    out = f"{s3.bucket(BUCKET)}/from-local"
    r = run_ingest(str(tree), out, progress=False)
    expected = ingest(tree, tmp_path / "local", progress=False)
    assert r.engine == "ray" and r.nodes == 1 and r.manifest.counts == expected.counts == {"train": 8}
    assert validate_shards(out, checksums=True).fingerprint == r.manifest.fingerprint
    assert r.summary(str(tree), out).startswith(f"ingested {tree} -> {out} on 1 Ray node(s): {{'train': 8}}")


@pytest.mark.ray
def test_refusals_are_one_line_and_neither_they_nor_a_finished_ingest_start_ray(ray_local, s3, tmp_path):
    """A missing bucket (OUT, SOURCE), a prefix with nothing under it, OUT inside SOURCE: one line each; the same
    ingest into S3 again: nothing to do, objects untouched; local to local: the local ingest; none of them starts
    Ray. Mutations: ``start_ray`` called first in `ray_ingest` (Ray started); the bucket check of `open_location`
    dropped (other messages)."""
    bucket = s3.bucket(BUCKET)
    src = upload(image_tree(tmp_path / "src"), f"{bucket}/refusals-src")
    done = f"{bucket}/refusals-done"
    run_ingest(src, done, progress=False)  # on the session's Ray
    before = objects(done)
    res = _run_cases(
        [
            (src, "s3://no-such-bucket-here/out", {}),
            ("s3://no-such-bucket-here/src", str(tmp_path / "o1"), {}),
            (f"{bucket}/nothing-here", str(tmp_path / "o2"), {}),
            (src, f"{src}/shards", {}),
            (src, done, {}),
            (str(tmp_path / "src"), str(tmp_path / "local"), {}),
        ]
    )
    lines = [_one_line(r) for r in res["results"][:4]]
    assert lines[0] == (
        "moco-ray: error: s3://no-such-bucket-here/out: bucket 'no-such-bucket-here' does not exist "
        "(create it first; moco-ray creates no buckets)"
    )
    assert "bucket 'no-such-bucket-here' does not exist" in lines[1]
    assert lines[2].endswith("nothing-here: no such directory (expected an ImageFolder tree split/class/image)")
    assert "is inside the source tree" in lines[3]
    assert res["results"][4:] == [
        {"engine": "ray", "already_done": True, "counts": {"train": 6}},
        {"engine": "local", "already_done": False, "counts": {"train": 6}},
    ]
    assert res["ray_started"] is False and objects(done) == before
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_missing_credentials_are_one_line_before_ray(s3, tmp_path):
    """No AWS credentials anywhere (no keys, no profile; the instance-metadata lookup off): one line naming the
    URI and what to set, before Ray. Mutation: `check_credentials` dropped (the loopback S3 API accepts anonymous
    requests: the ingest went on as nobody and started Ray)."""
    src = upload(image_tree(tmp_path / "src"), f"{s3.bucket(BUCKET)}/creds-src")
    env = {k: v for k, v in os.environ.items() if k not in S3_ENV_KEYS or k == "AWS_ENDPOINT_URL"}
    env.update(HOME=str(tmp_path / "home"), AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    res = _run_cases([(src, str(tmp_path / "out"), {}), (str(tmp_path / "src"), f"{s3.bucket(BUCKET)}/x", {})], env)
    first, second = (_one_line(r) for r in res["results"])
    assert first == (
        f"moco-ray: error: {src}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(or AWS_PROFILE), or run where an instance role applies"
    )
    assert second.startswith("moco-ray: error: s3://ingest-job/x: no AWS credentials found")
    assert res["ray_started"] is False and not (tmp_path / "out").exists()


_KILLED = r"""
import sys
from moco_ray.jobs.ingest_job import run_ingest
run_ingest(sys.argv[1], sys.argv[2], shard_size_mb=0.001, progress=False)
"""


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_ray_ingest_leaves_no_manifest_and_a_rerun_finishes(ray_local, s3, tmp_path):
    """SIGKILL to the driver (and its Ray) once the first shard is in S3: no manifest, so no finished ingest; the
    same command again finishes, and the killed run's shards are gone. Mutation: a placeholder manifest written
    before the shard tasks (it survived the kill: a "finished" ingest without its shards)."""
    src = upload(image_tree(tmp_path / "src", per_class=40, big=2000), f"{s3.bucket(BUCKET)}/killed-src")
    out = f"{s3.bucket(BUCKET)}/killed-out"
    ray_tmp = tempfile.mkdtemp(prefix="mr")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(
        [sys.executable, "-c", _KILLED, src, out],
        cwd=REPO,
        env={**env, "RAY_TMPDIR": ray_tmp},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # the kill takes its local Ray along, and nothing else
    )
    try:
        deadline = time.monotonic() + 240
        while not any("/part-" in k for k in objects(out)):
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    left = objects(out)
    assert "manifest.json" not in left and not manifest_exists(out), left
    r = run_ingest(src, out, shard_size_mb=0.001, progress=False)
    assert r.manifest.counts == {"train": 80}
    assert {k for k in objects(out) if "/part-" in k} == {s.path for s in r.manifest.shards}
    assert validate_shards(out, checksums=True).counts == {"train": 80}
