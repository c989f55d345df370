"""A real S3 API on loopback for the tests: moto's server in a process of its own.

`point_aws_at_loopback` runs when conftest is imported, before any Ray instance or CLI subprocess starts, so that
every process of the test session (the pytest process, Ray's workers, the `moco-ray` subprocesses) resolves
``s3://`` through the standard AWS variables to this server and never to AWS: pyarrow's S3FileSystem, s3fs and
boto3 all read ``AWS_ENDPOINT_URL``. The server itself starts only when a test asks for the ``s3`` fixture.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

S3_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def point_aws_at_loopback() -> None:
    """Set the AWS variables of this process (and so of everything it starts) to a loopback endpoint with
    throw-away credentials, unless a caller set an endpoint already. The port is chosen now, the server started
    later (`start_server`)."""
    if os.environ.get("MOCO_RAY_TEST_S3_PORT"):
        return
    port = _free_port()
    os.environ["MOCO_RAY_TEST_S3_PORT"] = str(port)
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    os.environ["AWS_ACCESS_KEY_ID"] = "moco-ray-test"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "moco-ray-test"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # no 1 s instance-metadata probe per client


@dataclass
class S3Server:
    """The running server: its endpoint, and buckets made on demand (names must be valid S3 bucket names)."""

    endpoint: str
    process: subprocess.Popen

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (if new) and return ``s3://name``."""
        import boto3  # lazy: only tests that use S3 pay for botocore

        client = boto3.client("s3")
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"


def start_server(timeout_s: float = 60.0) -> S3Server:
    """moco's server on the port `point_aws_at_loopback` chose; waits until it answers."""
    port = int(os.environ["MOCO_RAY_TEST_S3_PORT"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            return S3Server(endpoint, proc)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}") from None
            time.sleep(0.2)


def stop_server(server: S3Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()
