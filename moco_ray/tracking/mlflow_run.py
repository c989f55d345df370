"""One MLflow run per pretraining, written by one process at a time (driver or rank 0), never by every worker."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

ENCODER_DIR = "encoder"
ENCODER_FILE = "encoder.pt"
ENCODER_INFO = "encoder.json"
CONFIG_FILE = "config.yaml"
ENCODER_MODEL_URI_TAG = "moco_ray.encoder_model_uri"  # run tag: the mlflow.pytorch model of the encoder


def resolve_tracking_uri(uri: str = "") -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else MLflow's default store (sqlite:///mlflow.db in the cwd).

    Relative sqlite paths are made absolute so Ray workers, whose cwd differs, write to the same file.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    elif "://" not in uri:  # a plain directory: MLflow's file store
        uri = str(Path(uri).resolve())
    return uri


def check_tracking_uri(uri: str) -> None:
    """Fail fast, before Ray starts, when the tracking store cannot be used."""
    if uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///") :]).parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ValueError(f"tracking.tracking_uri: cannot write the sqlite store in {parent}")
        return
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:  # one cheap request with a short timeout rather than MLflow's long retry loop
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise ValueError(f"tracking.tracking_uri: MLflow server {uri} is unreachable ({reason})") from None


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def version_tags() -> dict[str, str]:
    import ray
    import torch
    import torchvision

    from moco_ray.version import __version__

    tags = {
        "moco_ray.version": __version__,
        "ray.version": ray.__version__,
        "torch.version": torch.__version__,
        "torchvision.version": torchvision.__version__,
        "python.version": platform.python_version(),
    }
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def create_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    config_yaml: str,
    parent_run_id: str | None = None,
) -> str:
    """Create the run, log params (the flattened config), tags and the resolved config YAML; return its id."""
    from mlflow.entities import Param, RunTag

    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(experiment)
    all_tags = dict(tags)
    if run_name:
        all_tags["mlflow.runName"] = run_name
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, tags=all_tags, run_name=run_name or None)
    rid = run.info.run_id
    plist = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(plist), 100):
        c.log_batch(rid, params=plist[i : i + 100])
    c.log_batch(rid, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
    log_text(uri, rid, config_yaml, CONFIG_FILE)
    return rid


def log_text(uri: str, run_id: str, text: str, name: str, artifact_path: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_text(text)
        client(uri).log_artifact(run_id, str(p), artifact_path)


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def logged_steps(uri: str, run_id: str, key: str = "loss") -> set[int]:
    return {m.step for m in client(uri).get_metric_history(run_id, key)}


def log_epochs(uri: str, run_id: str, history: list[dict[str, float]]) -> int:
    """Log each epoch's metrics (step = epoch) not logged yet; returns how many epochs were written.

    Idempotent by design: after a worker restart the same epochs come again from the checkpoint's history and
    are skipped, so per-epoch metrics are neither lost nor duplicated.
    """
    import time

    from mlflow.entities import Metric

    done = logged_steps(uri, run_id, "epoch")
    new = [h for h in history if int(h["epoch"]) not in done]
    now = int(time.time() * 1000)
    for h in new:
        step = int(h["epoch"])
        metrics = [Metric(k, float(v), now, step) for k, v in h.items() if isinstance(v, int | float)]
        client(uri).log_batch(run_id, metrics=metrics)
    return len(new)


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status)


def get_run(uri: str, run_id: str):
    """The run, or a clear ValueError when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client(uri).get_run(run_id)
    except MlflowException:
        raise ValueError(f"MLflow run {run_id!r} not found in {uri}") from None


def log_encoder(uri: str, run_id: str, backbone, arch: str, small_stem: bool, feat_dim: int) -> str:
    """Log the backbone's torchvision state dict (+ how to build its module) and an mlflow.pytorch model.

    Returns the artifact URI of the state dict directory.
    """
    import torch

    from moco_ray.evaluation.export import torchvision_state_dict

    info = {"arch": arch, "small_stem": small_stem, "feature_dim": feat_dim, "format": "torchvision-state-dict"}
    with tempfile.TemporaryDirectory() as d:
        torch.save(torchvision_state_dict(backbone), Path(d) / ENCODER_FILE)
        (Path(d) / ENCODER_INFO).write_text(json.dumps(info, indent=2))
        c = client(uri)
        c.log_artifact(run_id, str(Path(d) / ENCODER_FILE), ENCODER_DIR)
        c.log_artifact(run_id, str(Path(d) / ENCODER_INFO), ENCODER_DIR)
    return f"runs:/{run_id}/{ENCODER_DIR}"


def log_pytorch_model(uri: str, run_id: str, module) -> str | None:
    """The plain torchvision module through mlflow.pytorch (loads with ``mlflow.pytorch.load_model``)."""
    import mlflow
    import torch
    import torchvision

    mlflow.set_tracking_uri(uri)
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"]
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pytorch.log_model(
            module.cpu().eval(), name="encoder_model", pip_requirements=reqs, serialization_format="pickle"
        )
    return info.model_uri


def log_trained_encoder(uri: str, run_id: str, backbone, arch: str, small_stem: bool) -> str:
    """Everything a finished run logs of its encoder: ``encoder/`` (state dict + info), the mlflow.pytorch model of
    the plain torchvision module, and the tag pointing at that model (what export --register registers).

    Returns the ``encoder/`` artifact URI. One function, so the trainer and the tests' hand-made runs log alike.
    """
    from moco_ray.core.encoders import build_backbone
    from moco_ray.evaluation.export import load_torchvision_backbone_from_state, torchvision_state_dict

    _, feat = build_backbone(arch, small_stem)
    encoder_uri = log_encoder(uri, run_id, backbone, arch, small_stem, feat)
    plain = load_torchvision_backbone_from_state(torchvision_state_dict(backbone), arch, small_stem)
    set_tags(uri, run_id, {ENCODER_MODEL_URI_TAG: log_pytorch_model(uri, run_id, plain)})
    return encoder_uri


def download_artifact(uri: str, run_id: str, path: str, dst: str | Path) -> Path:
    import mlflow.artifacts

    return Path(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=uri)
    )
