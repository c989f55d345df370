"""The deployment files: cluster.yaml passes Ray's own cluster-launcher checks and says what it should about the
head, the workers and MLflow; the KubeRay RayJob is well formed; config keys in the files and the docs
(docs/cluster.md, the README) exist in moco_ray.config. Offline and fast: no cloud API, no Ray instance, no server."""

from __future__ import annotations

import copy
import fnmatch
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import ray
import yaml

from moco_ray.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster.yaml"
RAYJOB = REPO / "deploy" / "kuberay-rayjob.yaml"
DOCS = (REPO / "docs" / "cluster.md", REPO / "README.md")  # the cluster walkthrough; the README's short section
IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
SWEEP = "experiments/sweep_queue_momentum.yaml"

# AWS instance types the files may name: (vCPUs, GPUs), from the EC2 instance-type specifications.
AWS_INSTANCES = {
    "m5.2xlarge": (8, 0),
    "m5.4xlarge": (16, 0),
    "g5.xlarge": (4, 1),
    "g5.12xlarge": (48, 4),
    "p4d.24xlarge": (96, 8),
}
# Things that must never appear in a deployment file: access keys, secret-key settings, private keys.
CREDENTIAL_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"aws_secret_access_key|aws_session_token", re.IGNORECASE),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def prepared(cluster) -> dict[str, Any]:
    """The config as `ray up` sees it after filling in the provider's defaults (offline part of `ray up`)."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(cluster))


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    by_kind: dict[str, dict[str, Any]] = {}
    for d in docs:
        assert d["kind"] not in by_kind, f"two {d['kind']} documents"
        by_kind[d["kind"]] = d
    return by_kind


def _port(cmd: str) -> int:
    m = re.search(r"--port[ =](\d+)", cmd)
    assert m, f"no --port in {cmd!r}"
    return int(m.group(1))


def _one(items: list[str], needle: str) -> str:
    hits = [c for c in items if needle in c]
    assert len(hits) == 1, f"expected one command with {needle!r}, got {hits}"
    return hits[0]


def _host_allowed(allowed: list[str], host: str) -> bool:
    """MLflow 3's `--allowed-hosts` rule (mlflow.server.security_utils, whose import loads the whole server):
    an entry with `*` is an fnmatch pattern, any other must equal the Host header."""
    return any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)


def _overrides(text: str) -> list[str]:
    """Every SECTION.FIELD=VALUE written in a text, with the value cut at whitespace or closing markup."""
    sections = "|".join(Config().to_dict())
    return [f"{k}={v.rstrip('.,)')}" for k, v in re.findall(rf"\b((?:{sections})\.[a-z_]+)=([^\s`]+)", text)]


def test_cluster_yaml_passes_ray_validation(cluster, prepared):
    from ray.autoscaler._private.util import validate_config

    validate_config(copy.deepcopy(cluster))
    validate_config(prepared)


def test_ray_defaults_do_not_replace_our_settings(cluster, prepared):
    # `ray up` merges the AWS defaults under the top-level keys; a key left out would bring e.g. the default
    # setup command that pip-installs a nightly Ray wheel over the image's Ray.
    for key in ("setup_commands", "initialization_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert prepared[key] == cluster[key], key
    assert prepared["head_setup_commands"] == cluster["setup_commands"] + cluster["head_setup_commands"]
    assert "ray-wheels" not in json.dumps(prepared)
    assert prepared["docker"]["image"] == IMAGE


def test_node_types_match_their_instances(cluster, prepared):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    # No Ray work on the head: it hosts the GCS, autoscaler, job drivers and MLflow.
    assert head["resources"] == {"CPU": 0}
    assert prepared["available_node_types"][cluster["head_node_type"]]["max_workers"] == 0
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    gpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker type"
    images = {t["node_config"]["ImageId"] for t in types.values()}
    assert len(images) == 1, f"node types use different AMIs: {images}"
    for name, t in workers.items():
        vcpus, gpus = AWS_INSTANCES[t["node_config"]["InstanceType"]]
        assert t["resources"] == ({"CPU": vcpus, "GPU": gpus} if gpus else {"CPU": vcpus}), name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster["max_workers"], name
        # S3 access comes from an instance profile named without an account id.
        assert set(t["node_config"]["IamInstanceProfile"]) == {"Name"}, name


def test_docker_image_is_the_installed_ray(cluster, k8s):
    assert cluster["docker"]["image"] == IMAGE
    spec = k8s["RayJob"]["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert {c["image"] for g in groups for c in g["template"]["spec"]["containers"]} == {IMAGE}


def test_head_serves_mlflow_to_the_workers(cluster):
    head_cmds, worker_cmds = cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]
    server = _one(head_cmds, "mlflow server")
    port = _port(server)
    assert "--host 0.0.0.0" in server  # workers on other nodes connect to it
    # The store is under the directory mounted from the head's disk, so it outlives the container.
    mount_src, mount_dst = cluster["docker"]["head_run_options"][0].removeprefix("-v ").split(":")
    store = re.search(r"--backend-store-uri sqlite:///(\S+)", server).group(1)
    assert store.startswith(mount_dst + "/")
    assert f"mkdir -p {mount_src}" in cluster["initialization_commands"]
    head_start = _one(head_cmds, "ray start --head")
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    # The head's own URI names its private IP (the driver hands it to Train workers on other nodes).
    host_expr, uri_port = re.search(r"export MLFLOW_TRACKING_URI=http://(\S.*?):(\d+);", head_start).groups()
    assert int(uri_port) == port
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    assert "127.0.0.1" not in host_expr and "localhost" not in host_expr
    # The expression runs with the installed Ray and yields an address (which one depends on this machine).
    ip = subprocess.run(["bash", "-c", f"echo {host_expr}"], capture_output=True, text=True, env=env).stdout.strip()
    ipaddress.ip_address(ip)
    worker_start = _one(worker_cmds, "ray start --address=$RAY_HEAD_IP:6379")
    assert f"export MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:{port};" in worker_start
    # GPU workers start at 0; the trainer refuses a GPU run on a GPU-less cluster unless this is set.
    trainer_src = (REPO / "moco_ray" / "jobs" / "resolve.py").read_text()
    assert "MOCO_RAY_ALLOW_PENDING_GPUS" in trainer_src
    assert "export MOCO_RAY_ALLOW_PENDING_GPUS=1;" in head_start
    health = _one(head_cmds, "/health")
    assert f"127.0.0.1:{port}/health" in health


def test_repository_is_mounted_and_installed(cluster):
    (remote, local), *rest = cluster["file_mounts"].items()
    assert not rest
    assert (REPO / local).resolve() == REPO  # `ray up` runs from the repository root
    assert f"pip install --no-cache-dir -e {remote}" in cluster["setup_commands"]
    assert ".gitignore" in cluster["rsync_filter"]  # keeps .venv, data and mlflow.db off the nodes


def test_commands_are_valid_bash(cluster, k8s):
    cmds = [c for key in COMMAND_LISTS for c in cluster[key]]
    cmds.append(k8s["RayJob"]["spec"]["entrypoint"])
    cmds += k8s["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    for cmd in cmds:
        res = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert res.returncode == 0, f"{cmd!r}: {res.stderr}"
    broken = subprocess.run(["bash", "-n", "-c", "if true; then echo"], capture_output=True)
    assert broken.returncode != 0  # the check itself can fail


def test_no_credentials_in_deployment_files(cluster):
    assert set(cluster["auth"]) == {"ssh_user"}
    for path in (CLUSTER, RAYJOB, *DOCS):
        text = path.read_text()
        for pattern in CREDENTIAL_PATTERNS:
            assert not pattern.search(text), f"{path.name}: matches {pattern.pattern}"
    fake = "key " + "AKIA" + "Q" * 16 + " here"
    assert CREDENTIAL_PATTERNS[0].search(fake)  # the pattern does catch a key


def test_cluster_yaml_works_without_edits(cluster):
    # Placeholders belong in comments only: every value `ray up` reads is usable as written.
    values = json.dumps(cluster)
    for placeholder in ("YOUR_", "<bucket>", "CHANGE_ME"):
        assert placeholder not in values


def test_rayjob_runs_the_sweep_on_gpus(k8s):
    from moco_ray.cli.main import build_parser

    job = k8s["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "moco-ray"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.config) == ("sweep", SWEEP)
    load_config(None, args.overrides)  # every override names a real field with a valid value
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    spec = job["spec"]["rayClusterSpec"]
    head_params = spec["headGroupSpec"]["rayStartParams"]
    assert head_params["num-cpus"] == "0"
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay wants strings
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in group["template"]["spec"]["containers"]:
            res = c["resources"]
            assert int(res["limits"]["nvidia.com/gpu"]) >= 1
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]


def test_rayjob_runtime_env_reaches_code_and_mlflow(k8s):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(k8s["RayJob"]["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray's own checks of the runtime_env fields
    # The installed package and the working_dir (experiments/) come from the same revision.
    assert f"moco-ray @ {env['working_dir']}" in env["pip"]
    assert env["env_vars"]["MOCO_RAY_ALLOW_PENDING_GPUS"] == "1"
    uri = urlparse(env["env_vars"]["MLFLOW_TRACKING_URI"])
    service = k8s["Service"]
    assert uri.hostname == service["metadata"]["name"]
    assert uri.port in {p["port"] for p in service["spec"]["ports"]}
    server = " ".join(k8s["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"])
    allowed = re.search(r'--allowed-hosts "([^"]+)"', server).group(1).split(",")
    assert _host_allowed(allowed, uri.netloc)  # MLflow 3's host check lets the pods in
    assert _host_allowed(allowed, "localhost:5000")  # kubectl port-forward
    assert not _host_allowed(allowed, "attacker.example:5000")


def test_config_keys_in_docs_and_files_are_real():
    texts = ["\n".join(p.read_text() for p in DOCS), CLUSTER.read_text(), RAYJOB.read_text()]
    overrides = [o for t in texts for o in _overrides(t)]
    keys = {o.split("=", 1)[0] for o in overrides}
    assert {"data.shards", "train.storage_path", "train.use_gpu"} <= keys
    # Each value on its own: the docs show alternatives (e.g. two placement strategies) side by side.
    for o in overrides:
        load_config(None, [o])
    flat = Config().flat()
    sections = "|".join(Config().to_dict())
    mentioned = set(re.findall(rf"`((?:{sections})\.[a-z_]+)`", texts[0]))
    assert {"tracking.tracking_uri", "train.storage_path", "data.shards"} <= mentioned
    assert mentioned <= set(flat), mentioned - set(flat)
