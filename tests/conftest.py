"""Shared fixtures: real data (cifar10-mini when present, else scikit-learn digits), real Ray, real MLflow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from s3_server import S3Server, point_aws_at_loopback, start_server, stop_server

REPO = Path(__file__).resolve().parents[1]
CIFAR_MINI = Path(os.environ.get("MOCO_RAY_TEST_DATA", REPO.parent / "shared" / "data" / "cifar10-mini"))

# Ray Train V2's controller polls its workers every 2 s and only notices that a run ended at the next poll: on a
# test run of a few seconds that is ~4 s of waiting per TorchTrainer.fit() (21.5 -> 17.2 s measured for a 2-epoch
# tiny run on 2 CPUs). Set before any Ray instance starts, so the session's Ray, the CLI subprocesses and their
# workers all inherit it; a missed poll is only counted against Ray's 10-minute worker health timeout.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# Every s3:// of the session goes to a real S3 API on loopback (moto's server, started by the `s3` fixture), never
# to AWS; set here, before any Ray or CLI subprocess starts, so they all inherit it.
point_aws_at_loopback()


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    """An ImageFolder tree (train/<class>/*, test/<class>/*) of real images.

    Real CIFAR-10 JPEGs from ../shared/data/cifar10-mini when present; otherwise scikit-learn's bundled digits
    written as PNGs, so a fresh clone without shared/ passes too.
    """
    if (CIFAR_MINI / "train").is_dir():
        return CIFAR_MINI
    from moco_ray.data.digits import write_digits_imagefolder

    return write_digits_imagefolder(tmp_path_factory.mktemp("digits"), size=32)


@pytest.fixture(scope="session")
def natural_image_root() -> Path:
    """cifar10-mini (or ``$MOCO_RAY_TEST_DATA``); skips the test when absent.

    For the tests that compare a trained encoder with a random one: that needs natural images. On the digits
    fallback random conv features already score 0.97 kNN / linear at 16 px, and the generated sets tried instead
    (digits at random scale and position, or in random colours) leave MoCo below its random start for the few
    hundred steps a test can afford (measured; see tests/jobs/test_trained_beats_random.py).
    """
    if not (CIFAR_MINI / "train").is_dir():
        pytest.skip(f"needs natural images: {CIFAR_MINI} not found (set MOCO_RAY_TEST_DATA to an ImageFolder tree)")
    return CIFAR_MINI


@pytest.fixture(scope="session")
def small_image_root(image_root, tmp_path_factory) -> Path:
    """A copy of a small, class-balanced part of `image_root` (40 train + 20 test images per class)."""
    from moco_helpers import copy_balanced_subset

    out = tmp_path_factory.mktemp("small_images")
    copy_balanced_subset(image_root, out, {"train": 40, "test": 20})
    return out


@pytest.fixture
def restore_threads():
    """Put torch's intra-op thread count back after a test that changes it (benchmarks set their own)."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread(restore_threads):
    """One intra-op thread: tiny tensors gain nothing from more, and on a loaded 2-core box their sync costs 10x
    the work. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with 2 CPUs, shared by the session's Ray tests (started once: its task workers stay
    warm across tests, so Ray Data's map tasks and the kNN/feature tasks do not import torch again per test).

    The tests that start a Ray of their own do so because the behaviour they check belongs to a fresh CLI process:
    Ctrl-C to the process group and the exit code (tests/cli/test_pretrain_interrupt.py, test_sweep_interrupt.py),
    a driver watching a dying MLflow server (test_sweep_tracking_outage.py), what reaches the console from the Ray
    workers (tests/jobs/test_pretrain.py, test_pretrain_corrupt_images.py: this instance drops worker logs), "no Ray
    started" before a refusal (tests/cli/test_bad_input*.py), and a two-node cluster (test_pretrain_multinode.py).
    Their resumes, where the behaviour allows, run through the CLI's ``main`` on this instance."""
    import ray

    from moco_ray.jobs.local_ray import local_init_kwargs

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            **local_init_kwargs(2),
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3() -> S3Server:
    """A real S3 API (moto's server) on loopback for the session; ``s3.bucket(name)`` makes a bucket and returns
    ``s3://name``. Every process of the session reaches it through ``AWS_ENDPOINT_URL``."""
    server = start_server()
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store with every migration applied and nothing in it, made once per session."""
    from moco_ray.tracking.store import ensure_store

    path = tmp_path_factory.mktemp("empty_store") / "mlflow.db"
    ensure_store(f"sqlite:///{path}")
    return path


@pytest.fixture
def mlflow_uri(_empty_store, tmp_path) -> str:
    """A fresh MLflow sqlite store for one test: a copy of the migrated empty one (creating a store runs MLflow's
    ~50 schema migrations, 1-6 s each time on 2 busy CPUs; tests of store creation itself use their own paths)."""
    import shutil

    shutil.copyfile(_empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def small_shards(small_image_root, tmp_path_factory) -> Path:
    """`small_image_root` ingested once into Parquet shards (read-only for the tests that share it)."""
    from moco_ray.data.ingest import ingest

    out = tmp_path_factory.mktemp("small_shards")
    ingest(str(small_image_root), str(out), progress=False)
    return out
