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
    (both labelled splits exist); ``hooks`` the test-only fault injection (inactive by default); ``label`` what
    rank 0's console lines start with (a sweep trial's name, so trials running at once can be told apart).
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
    label: str = ""

    @property
    def epochs(self) -> int:
        return self.config.train.epochs

    def console(self, line: str) -> str:
        """A console line of this run: ``[label] line`` in a sweep, the line itself otherwise."""
        return f"[{self.label}] {line}" if self.label else line
