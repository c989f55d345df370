"""Register an official MoCo checkpoint (v1/v2/v3 ``*.pth.tar``) as an MLflow run holding its encoder.

The run is logged as a trained run's encoder is (``RunLog.log_trained_encoder``: ``encoder/`` state dict +
info, the mlflow.pytorch model and its tag), so ``moco-ray eval knn|linear --run ID --data SHARDS`` and
``moco-ray export`` work on it, and the runs table shows the official weights next to moco-ray's own runs (same
``model.arch`` / ``moco.method`` / ``train.epochs`` params, tag ``moco_ray.imported = true``). It has no
``config.yaml``: evaluations need ``--data`` and default to 224 px, the official weights' resolution. Everything
is read and checked before the run is created, so a file that does not fit leaves nothing in the store.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moco_ray.config import TrackingConfig, check_experiment_name
from moco_ray.core.backbone_io import load_torchvision_backbone_from_state
from moco_ray.core.backbone_spec import as_spec
from moco_ray.core.defaults import ARCHS
from moco_ray.core.official_io import OfficialBackbone, from_official
from moco_ray.tracking.run_log import create_run, version_tags
from moco_ray.tracking.store import open_store

IMPORTED_TAG = "moco_ray.imported"


@dataclass
class ImportResult:
    """The MLflow run the checkpoint became, and what was read from the file."""

    run_id: str
    tracking_uri: str
    experiment: str
    arch: str
    method: str
    epoch: int
    sha256: str
    encoder_uri: str


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(path: Path, trust_pickle: bool = False) -> Any:
    """``torch.load`` on the CPU, weights-only unless the caller trusts the file (pickle can run code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # UnpicklingError for a non-weights object, RuntimeError for a non-torch file, ...
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if trust_pickle:
            raise ValueError(f"{path}: torch.load cannot read it ({type(e).__name__}: {why})") from None
        raise ValueError(
            f"{path}: torch.load(weights_only=True) cannot read it ({type(e).__name__}: {why}); "
            "if you trust the file, --trust-pickle loads it with full unpickling"
        ) from None


def _arch(ckpt: Any, arch: str | None, path: Path) -> str:
    if arch:
        if arch not in ARCHS:
            raise ValueError(f"--arch: unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
        return arch
    found = ckpt.get("arch") if isinstance(ckpt, dict) else None
    if isinstance(found, str) and found in ARCHS:
        return found
    raise ValueError(f"{path}: the file names no known arch ({found!r}); pass --arch (one of {', '.join(ARCHS)})")


def _epoch(ckpt: Any) -> int:
    e = ckpt.get("epoch") if isinstance(ckpt, dict) else None
    return int(e) if isinstance(e, int) and e >= 0 else 0


def read_official(path: str | os.PathLike, arch: str | None = None, trust_pickle: bool = False):
    """(checked backbone, arch, epoch, sha256) of an official checkpoint file; ValueError naming the file."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = load_checkpoint(p, trust_pickle)
    a = _arch(ckpt, arch, p)
    try:
        backbone: OfficialBackbone = from_official(ckpt, a)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    return backbone, a, _epoch(ckpt), _sha256(p)


def import_checkpoint(
    path: str | os.PathLike,
    arch: str | None = None,
    *,
    name: str = "",
    experiment: str = "",
    tracking_uri: str = "",
    trust_pickle: bool = False,
) -> ImportResult:
    """Read, check and register the checkpoint at ``path`` as a FINISHED MLflow run; returns its id and facts.

    ``arch``: the torchvision architecture or ``vit_small`` / ``vit_base`` (moco-v3's ViTs, 224 px; default: the
    file's ``arch`` field); ``name``: the run name (default:
    the file name without ``.pth.tar``); ``experiment``: default ``tracking.experiment``'s default (moco-ray).
    """
    exp = experiment or TrackingConfig().experiment
    check_experiment_name(exp, "--experiment")  # MLflow's refusal would come after the file was read, as a traceback
    backbone, arch, epoch, sha = read_official(path, arch, trust_pickle)
    uri = open_store(tracking_uri)
    src = Path(path).expanduser().resolve()
    run_name = name or src.name.removesuffix(".tar").removesuffix(".pth")
    params = {
        "model.arch": arch,
        "model.small_stem": backbone.small_stem,
        "moco.method": backbone.method,
        "train.epochs": epoch,
        "import.source": str(src),
        "import.sha256": sha,
        "import.epoch": epoch,
        "import.prefix": backbone.prefix,
        "import.head_keys_skipped": len(backbone.head_keys),
    }
    tags = {IMPORTED_TAG: "true", **version_tags()}
    log = create_run(uri, exp, run_name, params, tags, None)
    status = "FAILED"
    try:
        log.log_epochs_done(epoch)
        spec = backbone.backbone or as_spec(arch, backbone.small_stem)
        net = load_torchvision_backbone_from_state(backbone.state, spec)
        encoder_uri = log.log_trained_encoder(net, spec)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        log.finish(status)
    return ImportResult(log.run_id, uri, exp, arch, backbone.method, epoch, sha, encoder_uri)
