"""One MLflow run, written by one process at a time (driver or rank 0), through a small handle.

``RunLog(uri, run_id)`` owns the store's client and knows the run; everything moco-ray writes to or reads back
from a run (params, tags, per-epoch metrics, config, encoder, end state) goes through it.
"""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moco_ray.core.defaults import IMAGENET_MEAN, IMAGENET_STD, feature_dim
from moco_ray.envvars import scoped_env
from moco_ray.tracking.store import client
from moco_ray.version import __version__

if TYPE_CHECKING:
    import torch

    from moco_ray.config import Config

ENCODER_DIR = "encoder"
ENCODER_FILE = "encoder.pt"
ENCODER_INFO = "encoder.json"
CONFIG_FILE = "config.yaml"
ENCODER_MODEL_URI_TAG = "moco_ray.encoder_model_uri"  # run tag: the mlflow.pytorch model of the encoder
# MLflow 3's experiment kind (an experiment tag; the UI's own values): "custom_model_development" ("Machine
# learning") opens the experiment on its runs table instead of the GenAI overview (traces, latency)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"


@dataclass
class RunEncoder:
    """A run's encoder weights (torchvision layout) and how to build the module they load into."""

    state: dict[str, torch.Tensor]
    arch: str
    small_stem: bool
    feature_dim: int
    # the channel statistics its inputs were normalised with in training (ImageNet's for runs that predate them)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _installed(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def version_tags() -> dict[str, str]:
    """Versions of what ran (read from the installed packages: tracking imports neither Ray nor torch)."""
    tags = {
        "moco_ray.version": __version__,
        "ray.version": _installed("ray"),
        "torch.version": _installed("torch"),
        "torchvision.version": _installed("torchvision"),
        "python.version": platform.python_version(),
    }
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


class RunLog:
    """Handle on one existing MLflow run of the store at ``uri``."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self.client = client(uri)

    # --- reading ---------------------------------------------------------------------------------------------

    def get(self):
        """The MLflow ``Run``; ValueError naming the run when the store does not have it."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(self.run_id)
        except MlflowException:
            raise ValueError(f"MLflow run {self.run_id!r} not found in {self.uri}") from None

    def download(self, path: str, dst: str | Path) -> Path:
        import mlflow.artifacts

        with _no_artifact_bar():
            return Path(
                mlflow.artifacts.download_artifacts(
                    run_id=self.run_id, artifact_path=path, dst_path=str(dst), tracking_uri=self.uri
                )
            )

    def config(self) -> Config | None:
        """The run's resolved config (its ``config.yaml`` artifact), or None when it has none."""
        from moco_ray.config import load_config

        with tempfile.TemporaryDirectory() as d:
            try:
                path = self.download(CONFIG_FILE, d)
            except Exception:  # MLflow raises several types for a missing artifact
                return None
            return load_config(path)

    def encoder(self) -> RunEncoder:
        """The run's ``encoder/`` artifact (encoder.pt + encoder.json); ValueError when the run has none."""
        import torch

        with tempfile.TemporaryDirectory() as d:
            try:
                path = self.download(ENCODER_DIR, d)
                info = json.loads((path / ENCODER_INFO).read_text())
                state = torch.load(path / ENCODER_FILE, map_location="cpu", weights_only=True)
            except Exception:
                raise ValueError(
                    f"run {self.run_id} has no encoder artifact ({ENCODER_DIR}/{ENCODER_FILE} + {ENCODER_INFO}); "
                    "did its pretraining finish?"
                ) from None
        arch = info["arch"]
        dim = int(info.get("feature_dim") or feature_dim(arch))
        mean, std = tuple(info.get("mean") or IMAGENET_MEAN), tuple(info.get("std") or IMAGENET_STD)
        return RunEncoder(state, arch, bool(info["small_stem"]), dim, mean, std)

    def logged_steps(self, key: str = "loss") -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    # --- writing ---------------------------------------------------------------------------------------------

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        plist = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(plist), 100):
            self.client.log_batch(self.run_id, params=plist[i : i + 100])

    def log_text(self, text: str, name: str, artifact_path: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(text)
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_epochs(self, history: list[dict[str, float]]) -> int:
        """Log each epoch's metrics (step = epoch) not logged yet; returns how many epochs were written.

        Idempotent by design: after a worker restart the same epochs come again from the checkpoint's history and
        are skipped, so per-epoch metrics are neither lost nor duplicated.
        """
        from mlflow.entities import Metric

        done = self.logged_steps("epoch")
        new = [h for h in history if int(h["epoch"]) not in done]
        now = int(time.time() * 1000)
        for h in new:
            step = int(h["epoch"])
            metrics = [Metric(k, float(v), now, step) for k, v in h.items() if isinstance(v, int | float)]
            self.client.log_batch(self.run_id, metrics=metrics)
        return len(new)

    def log_step_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Step-level metrics at MLflow step ``step`` (the global step, comparable across runs)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_dataset_inputs(self, manifest, contexts: dict[str, str]) -> None:
        """The shard splits ``{split: "training" | "evaluation"}`` as the run's MLflow dataset inputs."""
        from moco_ray.tracking.datasets import log_split_inputs

        log_split_inputs(self.client, self.run_id, manifest, contexts)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def reopen(self) -> None:
        self.client.update_run(self.run_id, status="RUNNING")

    def log_encoder(
        self, backbone, arch: str, small_stem: bool, mean: list[float] | None = None, std: list[float] | None = None
    ) -> str:
        """The backbone's torchvision state dict + how to build its module and normalise its inputs (``mean`` /
        ``std``, 0-1 scale; default: the run's ``data.mean`` / ``data.std``, else ImageNet's); returns the
        ``encoder/`` URI."""
        import torch

        from moco_ray.core.backbone_io import torchvision_state_dict

        if mean is None or std is None:
            cfg = self.config()
            mean = mean or (list(cfg.data.mean) if cfg else list(IMAGENET_MEAN))
            std = std or (list(cfg.data.std) if cfg else list(IMAGENET_STD))
        info = {"arch": arch, "small_stem": small_stem, "feature_dim": feature_dim(arch)}
        info.update({"mean": [float(v) for v in mean], "std": [float(v) for v in std]})
        info["format"] = "torchvision-state-dict"
        with tempfile.TemporaryDirectory() as d:
            torch.save(torchvision_state_dict(backbone), Path(d) / ENCODER_FILE)
            (Path(d) / ENCODER_INFO).write_text(json.dumps(info, indent=2))
            self.log_artifact(Path(d) / ENCODER_FILE, ENCODER_DIR)
            self.log_artifact(Path(d) / ENCODER_INFO, ENCODER_DIR)
        return f"runs:/{self.run_id}/{ENCODER_DIR}"

    def log_pytorch_model(self, module) -> str:
        """The plain torchvision module through mlflow.pytorch (loads with ``mlflow.pytorch.load_model``)."""
        import mlflow
        import torch
        import torchvision

        mlflow.set_tracking_uri(self.uri)
        reqs = [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"]
        with mlflow.start_run(run_id=self.run_id, log_system_metrics=False), _quiet_model_logging():
            info = mlflow.pytorch.log_model(
                module.cpu().eval(), name="encoder_model", pip_requirements=reqs, serialization_format="pickle"
            )
        return info.model_uri

    def log_trained_encoder(
        self, backbone, arch: str, small_stem: bool, mean: list[float] | None = None, std: list[float] | None = None
    ) -> str:
        """Everything a finished run logs of its encoder: ``encoder/`` (state dict + info), the mlflow.pytorch
        model of the plain torchvision module, and the tag pointing at that model (what export --register uses).

        Returns the ``encoder/`` artifact URI. One function, so the trainer and hand-made runs log alike.
        """
        from moco_ray.core.backbone_io import load_torchvision_backbone_from_state, torchvision_state_dict

        encoder_uri = self.log_encoder(backbone, arch, small_stem, mean, std)
        plain = load_torchvision_backbone_from_state(torchvision_state_dict(backbone), arch, small_stem)
        self.set_tags({ENCODER_MODEL_URI_TAG: self.log_pytorch_model(plain)})
        return encoder_uri


def _no_artifact_bar() -> contextlib.AbstractContextManager[None]:
    """No "Downloading artifacts" progress bar: moco-ray's downloads are a config, an encoder or a model's
    metadata, and the bar (one per call, several per run) would sit between the epoch and result lines."""
    return scoped_env({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})


@contextlib.contextmanager
def _quiet_model_logging() -> Iterator[None]:
    """``mlflow.pytorch.log_model`` without its progress bar and its warning about the pickle format. Pickle is
    moco-ray's choice for this copy (a plain torchvision module, which ``mlflow.pytorch.load_model`` then loads on
    any torch); the safe path is the ``encoder/`` state dict, which ``load_encoder`` and ``export`` read."""
    import logging

    log = logging.getLogger("mlflow.pytorch")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with _no_artifact_bar():
            yield
    finally:
        log.setLevel(level)


def training_experiment(c, name: str) -> str:
    """The id of experiment ``name``, created if missing, marked as a model-training experiment.

    An experiment made before the tag existed (or by hand) gets it too, unless it already has a kind: a kind a
    user chose in the UI is kept.
    """
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND})
        except MlflowException:  # another process created it at the same moment: use theirs
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)
    return exp.experiment_id


def create_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    config_yaml: str | None,
    parent_run_id: str | None = None,
) -> RunLog:
    """Create the run, log params (the flattened config), tags and the resolved config YAML (None: a run that has
    no moco-ray config, e.g. an imported checkpoint)."""
    from mlflow.entities import RunTag

    c = client(uri)
    exp_id = training_experiment(c, experiment)
    all_tags = dict(tags)
    if run_name:
        all_tags["mlflow.runName"] = run_name
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, tags=all_tags, run_name=run_name or None)
    log = RunLog(uri, run.info.run_id)
    log.log_params(params)
    c.log_batch(log.run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
    if config_yaml is not None:
        log.log_text(config_yaml, CONFIG_FILE)
    return log


def open_run(uri: str, run_id: str) -> tuple[RunLog, Any]:
    """(handle, MLflow Run) of an existing run; ValueError naming it when it does not exist."""
    log = RunLog(uri, run_id)
    return log, log.get()
