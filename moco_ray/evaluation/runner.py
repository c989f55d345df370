"""Evaluate or export a pretraining run's encoder: MLflow run in, figures / files / registry version out.

Where the results go (the choice, and why): every evaluation creates a **child run** of the pretraining run
(tag ``mlflow.parentRunId``, tag ``moco_ray.eval = knn | linear``, params = the protocol settings and the data)
holding the full record: top-1 (and top-5, the per-epoch probe curve for the linear probe). The pretraining run
itself gets one **summary metric**, ``eval_knn_top1`` / ``eval_linear_top1``, so the runs table compares encoders
at a glance without opening children; re-evaluating appends a new point (the latest one is what the table shows)
and a new child run, so no earlier result is overwritten.

Features are extracted once per (run, shards, split, image size, row limit) and cached on disk
(``$MOCO_RAY_CACHE`` or ``~/.cache/moco-ray/features``). Extraction runs on Ray: the eval split is read with Ray
Data (``eval_dataset``: decode + resize + centre crop in ``map_batches`` tasks) and one Ray task holding the
backbone (``num_gpus=1`` when the cluster has a GPU) iterates it with ``iter_torch_batches``. The cache holds the
raw pooled features; kNN and the ``small`` probe use them L2-normalised, the ``paper`` probe raw (its lr 30 is
tuned for raw features).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moco_ray.config import Config

EVAL_TAG = "moco_ray.eval"
CACHE_ENV = "MOCO_RAY_CACHE"
DEFAULT_IMAGE_SIZE = 224  # when the run has no config.yaml to take aug.image_size from
SMALL_IMAGE_MAX = 96  # image_size up to this -> the `small` linear protocol by default
_CACHE_VERSION = "raw-v1"  # part of every cache key: bump when what is cached changes


@dataclass
class RunEncoder:
    """A run's encoder weights (torchvision layout) and how to build the module they load into."""

    state: dict[str, torch.Tensor]
    arch: str
    small_stem: bool
    feature_dim: int


@dataclass
class ExportResult:
    """Where ``export_run`` wrote the file and, with ``register``, the Model Registry version it created."""

    path: Path
    format: str
    registered_name: str | None = None
    version: str | None = None

    def __fspath__(self) -> str:  # usable wherever a path is expected
        return str(self.path)


# --- run, config, encoder ---------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moco-ray" / "features")


def run_config(uri: str, run_id: str) -> Config | None:
    """The run's resolved config (its ``config.yaml`` artifact), or None when it has none."""
    from moco_ray.config import load_config
    from moco_ray.tracking import mlflow_run as mt

    with tempfile.TemporaryDirectory() as d:
        try:
            path = mt.download_artifact(uri, run_id, mt.CONFIG_FILE, d)
        except Exception:  # MLflow raises several types for a missing artifact
            return None
        return load_config(path)


def run_encoder(uri: str, run_id: str) -> RunEncoder:
    """The run's ``encoder/`` artifact (encoder.pt + encoder.json); ValueError when the run has none."""
    from moco_ray.tracking import mlflow_run as mt

    with tempfile.TemporaryDirectory() as d:
        try:
            path = mt.download_artifact(uri, run_id, mt.ENCODER_DIR, d)
            info = json.loads((path / mt.ENCODER_INFO).read_text())
            state = torch.load(path / mt.ENCODER_FILE, map_location="cpu", weights_only=True)
        except Exception:
            raise ValueError(
                f"run {run_id} has no encoder artifact ({mt.ENCODER_DIR}/{mt.ENCODER_FILE} + {mt.ENCODER_INFO}); "
                "did its pretraining finish?"
            ) from None
    return RunEncoder(state, info["arch"], bool(info["small_stem"]), int(info.get("feature_dim", 0)))


def _resolve_data(uri: str, run_id: str, data: str | None, image_size: int | None) -> tuple[str, int, Config | None]:
    cfg = run_config(uri, run_id)
    shards = data or (cfg.data.shards if cfg else "")
    if not shards:
        raise ValueError(f"run {run_id}: no data given and the run records no data.shards; pass --data SHARDS")
    if "://" not in shards:
        shards = str(Path(shards).expanduser().resolve())
    size = image_size or (cfg.aug.image_size if cfg else DEFAULT_IMAGE_SIZE)
    if size < 8:
        raise ValueError(f"image_size {size} is too small; need >= 8")
    return shards, size, cfg


# --- features through Ray ---------------------------------------------------------------------------------------


def _extract_task(state, arch: str, small_stem: bool, datasets: dict, batch_size: int) -> dict:
    """Ray task body: run the backbone over each eval dataset -> {split: (raw features, labels)}."""
    from moco_ray.evaluation.export import load_torchvision_backbone_from_state
    from moco_ray.evaluation.features import extract_features

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = load_torchvision_backbone_from_state(state, arch, small_stem).to(device)

    def clean(ds):  # drop rows whose image failed to decode (replaced by a neighbour in the stream)
        for b in ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=2):
            keep = b["corrupt"] == 0
            if bool(keep.any()):
                yield {"img": b["img"][keep], "label": b["label"][keep]}

    cuda = device.type == "cuda"
    return {
        split: extract_features(net, clean(ds), device, normalize=False, channels_last=cuda)
        for split, ds in datasets.items()
    }


def _use_gpu(use_gpu: bool | None) -> bool:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if use_gpu and gpus < 1:
        raise ValueError("use_gpu=True but the Ray cluster has no GPU")
    return gpus >= 1 if use_gpu is None else bool(use_gpu)


def features(
    run_id: str,
    encoder: RunEncoder,
    shards: str,
    splits: list[str],
    image_size: int,
    *,
    limit: int = 0,
    use_gpu: bool | None = None,
    batch_size: int = 256,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Raw backbone features + labels of each split, from the cache or extracted in one Ray task."""
    from moco_ray.evaluation.features import cache_path, cached_features

    keys = {s: f"{_CACHE_VERSION}|{run_id}|{shards}|{s}|{image_size}|{limit}" for s in splits}
    missing = [s for s in splits if not cache_path(keys[s], cache_dir()).is_file()]
    computed: dict[str, Any] = {}
    if missing:
        import ray

        from moco_ray.data.stream import eval_dataset
        from moco_ray.train.trainer import init_ray

        init_ray()
        gpu = _use_gpu(use_gpu)
        datasets = {s: eval_dataset(shards, s, image_size, limit) for s in missing}
        task = ray.remote(_extract_task).options(num_cpus=1, num_gpus=1 if gpu else 0)
        state_ref = ray.put(encoder.state)
        computed = ray.get(task.remote(state_ref, encoder.arch, encoder.small_stem, datasets, batch_size))
    return {s: cached_features(keys[s], cache_dir(), lambda s=s: computed[s]) for s in splits}


# --- MLflow logging ---------------------------------------------------------------------------------------------


def _log_child(
    uri: str,
    parent,
    kind: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    history: list[dict[str, float]] | None = None,
) -> str:
    """A child run of ``parent`` with the evaluation's params and metrics; the summary metric on the parent."""
    from mlflow.entities import Metric, Param, RunTag

    from moco_ray.tracking import mlflow_run as mt

    c = mt.client(uri)
    parent_id = parent.info.run_id
    parent_name = parent.data.tags.get("mlflow.runName") or parent_id[:8]
    tags = {"mlflow.parentRunId": parent_id, EVAL_TAG: kind, **mt.version_tags()}
    child = c.create_run(parent.info.experiment_id, tags=tags, run_name=f"eval-{kind}-{parent_name}")
    cid = child.info.run_id
    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for h in history or []:
        ms += [Metric(f"probe_{k}", float(v), now, int(h["epoch"])) for k, v in h.items() if k != "epoch"]
    c.log_batch(cid, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
    for i in range(0, len(ms), 1000):
        c.log_batch(cid, metrics=ms[i : i + 1000])
    c.set_terminated(cid, "FINISHED")
    c.log_batch(
        parent_id,
        metrics=[Metric(f"eval_{kind}_top1", float(metrics[f"{kind}_top1"]), now, 0)],
        tags=[RunTag(f"moco_ray.eval_{kind}_run", cid)],
    )
    return cid


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _prepare(run_id: str, data: str | None, tracking_uri: str, image_size: int | None, splits: list[str]):
    from moco_ray.data.schema import validate_shards
    from moco_ray.tracking import mlflow_run as mt

    uri = mt.resolve_tracking_uri(tracking_uri)
    parent = mt.get_run(uri, run_id)  # ValueError naming the run when it does not exist
    shards, size, cfg = _resolve_data(uri, run_id, data, image_size)
    manifest = validate_shards(shards)
    for s in splits:
        manifest.require_split(s)
    encoder = run_encoder(uri, run_id)
    return uri, parent, shards, size, manifest, encoder


# --- public API -------------------------------------------------------------------------------------------------


def evaluate_knn(
    run_id: str,
    data: str | None = None,
    *,
    tracking_uri: str = "",
    k: int = 200,
    t: float = 0.1,
    split_train: str = "train",
    split_test: str = "test",
    image_size: int | None = None,
    limit: int = 0,
    use_gpu: bool | None = None,
) -> dict[str, Any]:
    """Weighted kNN top-1 of the run's encoder: memory bank ``split_train``, queries ``split_test``.

    ``data``: shard root (default: the run's ``data.shards``); ``image_size``: default the run's
    ``aug.image_size``; ``limit``: rows per split (0 = all). Logs a child run (see the module docstring) and
    returns ``{"top1", "k", "t", "train_rows", "test_rows", "data", "image_size", "run_id", "eval_run_id"}``.
    """
    from moco_ray.evaluation.knn import knn_accuracy

    if k < 1 or t <= 0:
        raise ValueError(f"knn: need k >= 1 and t > 0; got k={k}, t={t}")
    uri, parent, shards, size, manifest, enc = _prepare(
        run_id, data, tracking_uri, image_size, [split_train, split_test]
    )
    f = features(run_id, enc, shards, [split_train, split_test], size, limit=limit, use_gpu=use_gpu)
    (xtr, ytr), (xte, yte) = f[split_train], f[split_test]
    top1 = knn_accuracy(
        F.normalize(xtr, dim=1), ytr, F.normalize(xte, dim=1), yte, k=k, t=t,
        num_classes=len(manifest.classes) or None, device=_device(),
    )  # fmt: skip
    params = {"protocol": "knn", "knn_k": k, "knn_t": t, "data": shards, "split_train": split_train,
              "split_test": split_test, "image_size": size, "limit": limit,
              "train_rows": len(ytr), "test_rows": len(yte)}  # fmt: skip
    eval_id = _log_child(uri, parent, "knn", params, {"knn_top1": top1})
    return {"top1": top1, "k": k, "t": t, "train_rows": len(ytr), "test_rows": len(yte), "data": shards,
            "image_size": size, "run_id": run_id, "eval_run_id": eval_id}  # fmt: skip


def linear_protocol(preset: str | None, image_size: int, epochs: int | None = None):
    """``small`` for CIFAR-sized images (<= 96 px), ``paper`` otherwise, unless ``preset`` says; ``epochs``
    overrides, with step milestones scaled to the new length (60/80 of 100 -> 6/8 of 10)."""
    from moco_ray.evaluation.linear import LinearProtocol

    name = preset or ("small" if image_size <= SMALL_IMAGE_MAX else "paper")
    if name not in ("small", "paper"):
        raise ValueError(f"linear protocol preset {name!r} is not one of small, paper")
    proto = LinearProtocol.small() if name == "small" else LinearProtocol.paper()
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f"linear probe epochs {epochs} is out of range; allowed: >= 1")
        ms = tuple(max(1, round(m * epochs / proto.epochs)) for m in proto.milestones)
        proto = dataclasses.replace(proto, epochs=epochs, milestones=ms)
    return name, proto


def evaluate_linear(
    run_id: str,
    data: str | None = None,
    *,
    tracking_uri: str = "",
    protocol: str | None = None,
    epochs: int | None = None,
    split_train: str = "train",
    split_test: str = "test",
    image_size: int | None = None,
    limit: int = 0,
    use_gpu: bool | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Linear probe on the run's frozen features (see ``linear_protocol`` for the defaults).

    Returns the ``LinearProbeResult`` fields (``top1``, ``top5``, ``train_top1``, ``history``) plus
    ``protocol``, ``settings``, ``train_rows``, ``test_rows``, ``data``, ``image_size``, ``run_id``,
    ``eval_run_id``; the result is logged as a child run (see the module docstring).
    """
    uri, parent, shards, size, manifest, enc = _prepare(
        run_id, data, tracking_uri, image_size, [split_train, split_test]
    )
    name, proto = linear_protocol(protocol, size, epochs)
    f = features(run_id, enc, shards, [split_train, split_test], size, limit=limit, use_gpu=use_gpu)
    (xtr, ytr), (xte, yte) = f[split_train], f[split_test]
    if name == "small":
        xtr, xte = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    res = proto.run(xtr, ytr, xte, yte, num_classes=len(manifest.classes) or None, device=_device(), seed=seed)
    settings = dataclasses.asdict(proto)
    params = {"protocol": "linear", "linear_preset": name, **{f"linear_{k}": v for k, v in settings.items()},
              "data": shards, "split_train": split_train, "split_test": split_test, "image_size": size,
              "limit": limit, "seed": seed, "train_rows": len(ytr), "test_rows": len(yte)}  # fmt: skip
    metrics = {"linear_top1": res.top1, "linear_top5": res.top5, "linear_train_top1": res.train_top1}
    eval_id = _log_child(uri, parent, "linear", params, metrics, res.history)
    return {"top1": res.top1, "top5": res.top5, "train_top1": res.train_top1, "history": res.history,
            "protocol": name, "settings": settings, "train_rows": len(ytr), "test_rows": len(yte), "data": shards,
            "image_size": size, "run_id": run_id, "eval_run_id": eval_id}  # fmt: skip


_SUFFIX = {"torchvision": ".pt", "torchscript": ".pt", "detectron2": ".pkl"}


def export_run(
    run_id: str,
    fmt: str,
    out: str | os.PathLike,
    *,
    register: str | None = None,
    tracking_uri: str = "",
    image_size: int | None = None,
) -> ExportResult:
    """Write the run's encoder to ``out`` as ``fmt`` (torchvision | torchscript | detectron2).

    ``out`` may be an existing directory (the file is then ``<run id>-<fmt><suffix>`` in it). ``register=NAME``
    also registers the encoder (the run's mlflow.pytorch model, logged now if the run has none) as a new version
    of NAME in the MLflow Model Registry. ``image_size`` only sets TorchScript's example input (default: the
    run's ``aug.image_size``; the traced module accepts any size).
    """
    from moco_ray.evaluation.export import FORMATS, load_torchvision_backbone_from_state, save_export
    from moco_ray.tracking import mlflow_run as mt

    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    if register is not None and not register.strip():
        raise ValueError("register: the registered model name must not be empty")
    uri = mt.resolve_tracking_uri(tracking_uri)
    run = mt.get_run(uri, run_id)
    enc = run_encoder(uri, run_id)
    cfg = run_config(uri, run_id)
    size = image_size or (cfg.aug.image_size if cfg else DEFAULT_IMAGE_SIZE)
    net = load_torchvision_backbone_from_state(enc.state, enc.arch, enc.small_stem)
    path = Path(out)
    if path.is_dir():
        path = path / f"{run_id}-{fmt}{_SUFFIX[fmt]}"
    written = save_export(net, enc.arch, enc.small_stem, fmt, path, image_size=size)
    res = ExportResult(written, fmt)
    if register:
        res.registered_name, res.version = register, _register(uri, run, net, enc, register)
    return res


def _register(uri: str, run, net, enc: RunEncoder, name: str) -> str:
    import mlflow

    from moco_ray.tracking import mlflow_run as mt

    run_id = run.info.run_id
    model_uri = run.data.tags.get(mt.ENCODER_MODEL_URI_TAG)
    if not model_uri:  # e.g. a run logged before the trainer logged mlflow.pytorch models
        model_uri = mt.log_pytorch_model(uri, run_id, net)
        mt.set_tags(uri, run_id, {mt.ENCODER_MODEL_URI_TAG: model_uri})
    mlflow.set_tracking_uri(uri)
    tags = {"moco_ray.run_id": run_id, "arch": enc.arch, "small_stem": str(enc.small_stem)}
    mv = mlflow.register_model(model_uri, name, tags=tags)
    return str(mv.version)
