"""The Python API: pretrain, load_encoder, sweep; evaluation, export and checkpoint import re-exported from jobs
(child runs in MLflow, features through Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moco_ray.config import Config, parse_overrides
from moco_ray.config_files import QUICKSTART, experiment_file
from moco_ray.core.backbone_io import load_torchvision_backbone, load_torchvision_backbone_from_state
from moco_ray.core.backbone_spec import BackboneSpec
from moco_ray.jobs.evaluate import evaluate_knn, evaluate_linear
from moco_ray.jobs.export import export_run
from moco_ray.jobs.import_checkpoint import import_checkpoint  # official MoCo files -> MLflow runs
from moco_ray.jobs.pretrain import PretrainResult, run_pretraining
from moco_ray.jobs.runs import resolve_resume
from moco_ray.tracking.run_log import ENCODER_FILE, ENCODER_INFO, open_run
from moco_ray.tracking.store import open_store
from moco_ray.tuning.sweep import run_sweep

__all__ = ["pretrain", "load_encoder", "sweep", "evaluate_knn", "evaluate_linear", "export_run", "import_checkpoint"]


def _kw_overrides(kw: dict[str, Any]) -> dict[str, Any]:
    """``moco__queue_size=1024`` -> ``{"moco.queue_size": 1024}`` (dotted keys cannot be Python keywords)."""
    return {k.replace("__", "."): v for k, v in kw.items()}


def pretrain(
    config: str | Path | dict | Config | None = QUICKSTART,
    *,
    resume: str | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    **kw: Any,
) -> PretrainResult:
    """Pretrain an encoder on the local or connected Ray cluster and record it in MLflow.

    ``config``: a YAML path, a shipped experiment's name (``"quickstart"``, ``"imagenet_mocov2_r50"``: ``moco-ray
    experiments`` lists them), a dict or a Config; overrides as ``overrides={"moco.queue_size": 1024}`` or keywords
    ``moco__queue_size=1024``. ``resume=RUN_ID`` continues an interrupted run from its last checkpoint;
    ``resume="last"`` the newest unfinished run (with a checkpoint) of the experiment ``config`` names.
    Returns the run id, the final metrics, the encoder URI and the checkpoint path.
    """
    over: dict[str, Any] = {}
    if isinstance(overrides, list):
        for sec, fields in parse_overrides(overrides).items():
            over.update({f"{sec}.{k}": v for k, v in fields.items()})
    elif overrides:
        over.update(overrides)
    over.update(_kw_overrides(kw))
    if resume:  # the run's own config is used; `config` only names the experiment of resume="last"
        resume, over = resolve_resume(resume, config, over)
        config = None
    elif isinstance(config, str | Path):
        config = experiment_file(config)  # a path, or a shipped experiment's name
    return run_pretraining(config, over or None, resume=resume)


def load_encoder(run_or_uri: str, tracking_uri: str = "", device: str = "cpu"):
    """The pretrained backbone as a plain module (torchvision with fc = Identity, or timm's ViT), loaded strictly.

    ``run_or_uri``: an MLflow run id, ``runs:/<id>/encoder``, or a local directory with encoder.pt + encoder.json.
    """
    local = Path(run_or_uri)
    if local.is_dir():
        return _load_dir(local, device)
    run_id = run_or_uri.split("/")[1] if run_or_uri.startswith("runs:/") else run_or_uri
    log, _ = open_run(open_store(tracking_uri), run_id)  # clear error for an unknown run
    enc = log.encoder()
    return load_torchvision_backbone_from_state(enc.state, enc.backbone).to(device).eval()


def _load_dir(path: Path, device: str):
    if not (path / ENCODER_INFO).is_file():
        raise ValueError(f"{path}: no {ENCODER_INFO}; not a moco-ray encoder directory")
    info = json.loads((path / ENCODER_INFO).read_text())
    return load_torchvision_backbone(path / ENCODER_FILE, BackboneSpec.from_info(info)).to(device).eval()


def sweep(config: str | Path | dict, *, resume: bool = False, overrides: dict | list | None = None, **kw: Any):
    """Run a Ray Tune sweep (see moco_ray.tuning.sweep.run_sweep): ``config`` is a sweep file's path or a shipped
    sweep's name (``"sweep_queue_momentum"``), or a dict.

    Raises ``KeyboardInterrupt`` on Ctrl-C and ``moco_ray.tuning.outage.TrackingOutage`` when its MLflow server
    stayed unreachable; both messages name the ``--resume`` command (``resume=True`` here) that continues it.
    """
    over: dict | list = dict(overrides or {}) if not isinstance(overrides, list) else list(overrides)
    if kw:  # keyword overrides (moco__queue_size=...) go after the others, whichever form those take
        extra = _kw_overrides(kw)
        over = [*over, *(f"{k}={v}" for k, v in extra.items())] if isinstance(over, list) else {**over, **extra}
    source = experiment_file(config, "sweep") if isinstance(config, str | Path) else config  # a path or a name
    return run_sweep(source, overrides=over or None, resume=resume)
