"""Export a pretraining run's encoder as a directory that describes itself (torchvision, TorchScript, detectron2,
the official MoCo checkpoint of the run's method, DeiT) and to the Model Registry."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from moco_ray.core.backbone_io import load_torchvision_backbone_from_state
from moco_ray.core.backbone_spec import as_spec
from moco_ray.evaluation.export import FORMATS, INFO_FILE, WEIGHTS_FILE, ExportInfo, check_export_dir, save_export_dir
from moco_ray.jobs.evaluate import DEFAULT_IMAGE_SIZE
from moco_ray.tracking.run_log import ENCODER_MODEL_URI_TAG, RunEncoder, RunLog, epochs_done, open_run
from moco_ray.tracking.store import open_store

DEFAULT_METHOD = "moco_v2"  # a run that recorded no moco.method predates the other methods


@dataclass
class ExportResult:
    """The export directory ``export_run`` wrote, its weights file and, with ``register``, the Model Registry
    version it created."""

    path: Path  # the directory: weights, encoder.json, README.md
    format: str
    registered_name: str | None = None
    version: str | None = None

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE[self.format]

    @property
    def info(self) -> Path:
        return self.path / INFO_FILE

    def __fspath__(self) -> str:  # usable wherever a path is expected
        return str(self.path)


def export_run(
    run_id: str,
    fmt: str,
    out: str | os.PathLike,
    *,
    register: str | None = None,
    tracking_uri: str = "",
    image_size: int | None = None,
) -> ExportResult:
    """Write the run's encoder as the export directory ``out`` in ``fmt`` (torchvision | torchscript | detectron2 |
    moco | deit): the weights, ``encoder.json`` (arch, stem, mean/std, method, source run) and a README.md.

    ``out`` is the directory: missing (made), empty, or an earlier export of the same run (replaced whole);
    anything else is refused. It is written beside ``out`` and renamed onto it, so it is never half written; a
    torchvision export is what ``moco_ray.load_encoder(out)`` loads. ``moco`` is the layout of the run's method
    (v1/v2 ``module.encoder_q.*``, v3 ``module.base_encoder.*``); ``deit`` (ViTs only) is moco-v3
    convert_to_deit.py's. ``register=NAME`` also registers the encoder (the run's mlflow.pytorch model, with a
    signature) as a new version of NAME. ``image_size`` only sets TorchScript's example input (default: the run's
    ``aug.image_size``). Refused in one line before the encoder is downloaded: an unwritable or foreign ``out``,
    ``deit`` for a run whose ``model.arch`` is not a ViT.
    """
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    if register is not None and not register.strip():
        raise ValueError("register: the registered model name must not be empty")
    path = Path(out)
    check_export_dir(path, run_id)
    log, run = open_run(open_store(tracking_uri), run_id)
    arch = run.data.params.get("model.arch")
    if fmt == "deit" and arch and not as_spec(arch).is_vit:
        raise ValueError(f"export format deit is for Vision Transformers; run {run_id} is a {arch}")
    trained_size = run.data.params.get("aug.image_size")
    if image_size and arch and as_spec(arch).is_vit and trained_size and image_size != int(trained_size):
        raise ValueError(f"image size {image_size}: a ViT runs at its own image size ({trained_size} px for {run_id})")
    enc = log.encoder()
    cfg = log.config()
    size = image_size or (cfg.aug.image_size if cfg else DEFAULT_IMAGE_SIZE)
    method = cfg.moco.method if cfg else run.data.params.get("moco.method", DEFAULT_METHOD)
    net = load_torchvision_backbone_from_state(enc.state, enc.backbone)
    info = ExportInfo(
        backbone=enc.backbone.to_info(),  # arch, small_stem, feature_dim (+ timm_kwargs for a ViT)
        mean=tuple(enc.mean),
        std=tuple(enc.std),
        method=method,
        epochs=epochs_done(run),  # the official checkpoints' ``epoch``: epochs finished
        image_size=cfg.aug.image_size if cfg else 0,
        source={"run_id": run_id, "run_name": run.info.run_name or "", "experiment_id": run.info.experiment_id},
    )
    written = save_export_dir(net, info, fmt, path, image_size=size)
    res = ExportResult(written, fmt)
    if register:
        res.registered_name, res.version = register, _register(log, run, net, enc, register, size)
    return res


def _register(log: RunLog, run, net, enc: RunEncoder, name: str, image_size: int) -> str:
    """A new version of ``name`` from the run's mlflow.pytorch model, through the run's own store (RunLog). A run
    whose model has no signature (logged before models carried one) or no model gets a new model logged with one,
    so every registered version shows its input and output schema."""
    model_uri = run.data.tags.get(ENCODER_MODEL_URI_TAG)
    if not model_uri or not log.model_has_signature(model_uri):
        model_uri = log.log_pytorch_model(net, image_size)
        log.set_tags({ENCODER_MODEL_URI_TAG: model_uri})
    tags = {"moco_ray.run_id": run.info.run_id, "arch": enc.arch, "small_stem": str(enc.small_stem)}
    return log.register_model(model_uri, name, tags)
