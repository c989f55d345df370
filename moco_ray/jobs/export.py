"""Export a pretraining run's encoder to a file (torchvision, TorchScript, detectron2, the official MoCo layout) or
the Model Registry."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from moco_ray.core.backbone_io import load_torchvision_backbone_from_state
from moco_ray.data.writable import check_writable_dir, write_error
from moco_ray.evaluation.export import FORMATS, check_export_target, save_export
from moco_ray.jobs.evaluate import DEFAULT_IMAGE_SIZE
from moco_ray.tracking.run_log import ENCODER_MODEL_URI_TAG, RunEncoder, RunLog, open_run
from moco_ray.tracking.store import open_store


@dataclass
class ExportResult:
    """Where ``export_run`` wrote the file and, with ``register``, the Model Registry version it created."""

    path: Path
    format: str
    registered_name: str | None = None
    version: str | None = None

    def __fspath__(self) -> str:  # usable wherever a path is expected
        return str(self.path)


_SUFFIX = {"torchvision": ".pt", "torchscript": ".pt", "detectron2": ".pkl", "moco": ".pth.tar"}


def export_run(
    run_id: str,
    fmt: str,
    out: str | os.PathLike,
    *,
    register: str | None = None,
    tracking_uri: str = "",
    image_size: int | None = None,
) -> ExportResult:
    """Write the run's encoder to ``out`` as ``fmt`` (torchvision | torchscript | detectron2 | moco).

    ``out`` may be a directory, existing or (with a trailing separator) made here; the file is then
    ``<run id>-<fmt><suffix>`` in it. ``register=NAME``
    also registers the encoder (the run's mlflow.pytorch model, logged now if the run has none) as a new version
    of NAME in the MLflow Model Registry. ``image_size`` only sets TorchScript's example input (default: the
    run's ``aug.image_size``; the traced module accepts any size). An unwritable ``out`` (read-only, a file in the
    way) is refused before the encoder is downloaded; a failed write (disk full) leaves no partial file.
    """
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    if register is not None and not register.strip():
        raise ValueError("register: the registered model name must not be empty")
    path = Path(out)
    is_dir = path.is_dir() or os.fspath(out).endswith(("/", os.sep))  # "OUT_DIR/" is a directory, made if missing
    if is_dir:
        check_writable_dir(path, "export")
    else:
        check_export_target(path)
    log, run = open_run(open_store(tracking_uri), run_id)
    enc = log.encoder()
    cfg = log.config()
    size = image_size or (cfg.aug.image_size if cfg else DEFAULT_IMAGE_SIZE)
    net = load_torchvision_backbone_from_state(enc.state, enc.arch, enc.small_stem)
    if is_dir:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error("export", path, e) from None
        path = path / f"{run_id}-{fmt}{_SUFFIX[fmt]}"
    written = save_export(net, enc.arch, enc.small_stem, fmt, path, image_size=size, epoch=_epochs_done(run))
    res = ExportResult(written, fmt)
    if register:
        res.registered_name, res.version = register, _register(log, run, net, enc, register)
    return res


def _epochs_done(run) -> int:
    """Epochs the run finished (its last 0-based ``epoch`` metric + 1; 0 without one): the official ``epoch``."""
    last = run.data.metrics.get("epoch")
    return int(last) + 1 if last is not None else 0


def _register(log: RunLog, run, net, enc: RunEncoder, name: str) -> str:
    """A new version of ``name`` from the run's mlflow.pytorch model, through the run's own store (RunLog)."""
    model_uri = run.data.tags.get(ENCODER_MODEL_URI_TAG)
    if not model_uri:  # e.g. a run logged before the trainer logged mlflow.pytorch models
        model_uri = log.log_pytorch_model(net)
        log.set_tags({ENCODER_MODEL_URI_TAG: model_uri})
    tags = {"moco_ray.run_id": run.info.run_id, "arch": enc.arch, "small_stem": str(enc.small_stem)}
    return log.register_model(model_uri, name, tags)
