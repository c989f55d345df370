"""A pretraining run resolved once on the driver: what every Ray Train worker receives, typed."""

from __future__ import annotations

from dataclasses import dataclass, field

from moco_ray.config import Config
from moco_ray.data.manifest import Manifest
from moco_ray.train.hooks import FaultHooks


@dataclass
class RunSpec:
    """Everything a worker needs, normalised once: no worker re-parses the config or re-reads the manifest.

    ``config`` is the resolved, validated config (paths absolute); ``run_dir`` holds Ray Train's checkpoints;
    ``resume_from`` is a checkpoint directory to start from (``--resume``); ``knn`` whether the kNN monitor runs
    (both labelled splits exist); ``hooks`` the test-only fault injection (inactive by default).
    """

    config: Config
    run_id: str
    tracking_uri: str
    storage_path: str
    run_dir: str
    manifest: Manifest
    steps_per_epoch: int
    knn: bool
    resume_from: str | None = None
    hooks: FaultHooks = field(default_factory=FaultHooks)

    @property
    def epochs(self) -> int:
        return self.config.train.epochs
