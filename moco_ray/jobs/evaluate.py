"""Evaluate a pretraining run's encoder: MLflow run in, kNN or linear-probe figures out, recorded as child runs.

Where the results go (the choice, and why): every evaluation creates a **child run** of the pretraining run
(tag ``mlflow.parentRunId``, tag ``moco_ray.eval = knn | linear``, params = the protocol settings and the data)
holding the full record: top-1 (and top-5, the per-epoch probe curve for the linear probe). The pretraining run
itself gets one **summary metric**, ``eval_knn_top1`` / ``eval_linear_top1``, so the runs table compares encoders
at a glance without opening children; re-evaluating appends a new point (the latest one is what the table shows)
and a new child run, so no earlier result is overwritten. kNN and the ``small`` probe use the cached features
L2-normalised, the ``paper`` probe raw (its lr 30 is tuned for raw features).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from moco_ray.config import Config, absolute
from moco_ray.core.backbone_io import load_torchvision_backbone_from_state
from moco_ray.core.defaults import KNN_K, KNN_T
from moco_ray.core.normalize import Normalizer
from moco_ray.data.eval_images import original_images
from moco_ray.data.manifest import Manifest
from moco_ray.data.schema import validate_shards
from moco_ray.evaluation.knn import knn_accuracy
from moco_ray.evaluation.linear import LinclsProtocol, linear_protocol, train_lincls, train_probe, with_epochs
from moco_ray.evaluation.probe_sources import CachedFeatures
from moco_ray.evaluation.progress import Progress
from moco_ray.jobs.eval_features import features
from moco_ray.tracking.datasets import EVALUATION, TRAINING
from moco_ray.tracking.run_log import RunEncoder, RunLog, open_run, version_tags
from moco_ray.tracking.store import open_store

EVAL_TAG = "moco_ray.eval"
DEFAULT_IMAGE_SIZE = 224  # when the run has no config.yaml to take aug.image_size from


def _resolve_data(log: RunLog, data: str | None, image_size: int | None) -> tuple[str, int, Config | None]:
    cfg = log.config()
    shards = data or (cfg.data.shards if cfg else "")
    if not shards:
        raise ValueError(f"run {log.run_id}: no data given and the run records no data.shards; pass --data SHARDS")
    size = image_size or (cfg.aug.image_size if cfg else DEFAULT_IMAGE_SIZE)
    if size < 8:
        raise ValueError(f"image_size {size} is too small; need >= 8")
    return absolute(shards), size, cfg


def _prepare(run_id: str, data: str | None, tracking_uri: str, image_size: int | None, splits: list[str]):
    log, parent = open_run(open_store(tracking_uri), run_id)  # ValueError naming the run when it does not exist
    shards, size, _ = _resolve_data(log, data, image_size)
    manifest = validate_shards(shards)
    for s in splits:
        manifest.require_split(s)
    enc = log.encoder()
    return log, parent, shards, _vit_size(enc, size, image_size), manifest, enc


def _vit_size(enc: RunEncoder, size: int, asked: int | None) -> int:
    """A ViT's patch grid (and position embedding) is fixed: it sees images at its own size, and no other."""
    vit = enc.backbone
    if vit is None or not vit.is_vit:
        return size
    if asked and asked != vit.img_size:
        raise ValueError(f"image_size {asked}: the run's {vit.arch} takes {vit.img_size} px images only")
    return vit.img_size


def _log_child(
    log: RunLog,
    parent,
    kind: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    history: list[dict[str, float]] | None = None,
    inputs: tuple[Manifest, dict[str, str]] | None = None,
) -> str:
    """A child run of ``parent`` (``log``'s run) with the evaluation's params and metrics; the summary metric on
    the parent. Written through RunLog, as every moco-ray run is.

    ``inputs``: the shards' manifest and ``{split: context}``, logged as the child's MLflow dataset inputs.
    """
    parent_name = parent.data.tags.get("mlflow.runName") or log.run_id[:8]
    child = log.create_child(f"eval-{kind}-{parent_name}", params, {EVAL_TAG: kind, **version_tags()})
    if inputs is not None:
        child.log_dataset_inputs(*inputs)
    points = [(k, v, 0) for k, v in metrics.items()]
    for h in history or []:
        points += [(f"probe_{k}", v, int(h["epoch"])) for k, v in h.items() if k != "epoch"]
    child.log_metric_points(points)
    child.finish()
    log.log_step_metrics({f"eval_{kind}_top1": metrics[f"{kind}_top1"]}, step=0)
    log.set_tags({f"moco_ray.eval_{kind}_run": child.run_id})
    return child.run_id


def _probe_progress(epochs: int):
    """The linear probe's per-epoch callback: a progress line with ETA (at most one per ~30 s, and the last)."""
    bar = Progress("linear probe epoch", epochs, lambda line: print(line, flush=True))  # the driver's console

    def on_epoch(h: dict[str, float]) -> None:
        bar.update(1, f"loss {h['loss']:.4f}  train top1 {h['train_top1']:.3f}  test top1 {h['test_top1']:.3f}")

    return on_epoch


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_knn(
    run_id: str,
    data: str | None = None,
    *,
    tracking_uri: str = "",
    k: int = KNN_K,
    t: float = KNN_T,
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
    if k < 1 or t <= 0:
        raise ValueError(f"knn: need k >= 1 and t > 0; got k={k}, t={t}")
    log, parent, shards, size, manifest, enc = _prepare(
        run_id, data, tracking_uri, image_size, [split_train, split_test]
    )
    f = features(run_id, enc, shards, [split_train, split_test], size, manifest=manifest, limit=limit, use_gpu=use_gpu)
    (xtr, ytr), (xte, yte) = f[split_train], f[split_test]
    top1 = knn_accuracy(
        F.normalize(xtr, dim=1), ytr, F.normalize(xte, dim=1), yte, k=k, t=t,
        num_classes=len(manifest.classes) or None, device=_device(),
    )  # fmt: skip
    params = {"protocol": "knn", "knn_k": k, "knn_t": t, "data": shards, "split_train": split_train,
              "split_test": split_test, "image_size": size, "limit": limit,
              "train_rows": len(ytr), "test_rows": len(yte)}  # fmt: skip
    splits = {split_train: TRAINING, split_test: EVALUATION}  # the memory bank, the queries
    eval_id = _log_child(log, parent, "knn", params, {"knn_top1": top1}, inputs=(manifest, splits))
    return {"top1": top1, "k": k, "t": t, "train_rows": len(ytr), "test_rows": len(yte), "data": shards,
            "image_size": size, "run_id": run_id, "eval_run_id": eval_id}  # fmt: skip


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
    """Linear probe on the run's frozen features (see ``linear_protocol`` for the defaults); ``protocol="lincls"``
    runs the official ``main_lincls`` protocol instead (fresh augmented crops every epoch, see ``_evaluate_lincls``).

    Returns the ``LinearProbeResult`` fields (``top1``, ``top5``, ``train_top1``, ``history``) plus
    ``protocol``, ``settings``, ``train_rows``, ``test_rows``, ``data``, ``image_size``, ``run_id``,
    ``eval_run_id``; the result is logged as a child run (see the module docstring).
    """
    if protocol == "lincls":
        return _evaluate_lincls(run_id, data, tracking_uri, epochs, split_train, split_test, image_size, limit, seed)
    log, parent, shards, size, manifest, enc = _prepare(
        run_id, data, tracking_uri, image_size, [split_train, split_test]
    )
    name, proto = linear_protocol(protocol, size, epochs)
    f = features(run_id, enc, shards, [split_train, split_test], size, manifest=manifest, limit=limit, use_gpu=use_gpu)
    (xtr, ytr), (xte, yte) = f[split_train], f[split_test]
    if name == "small":
        xtr, xte = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    res = train_probe(
        CachedFeatures(xtr, ytr, xte, yte), proto, len(manifest.classes) or None, device=_device(), seed=seed,
        on_epoch=_probe_progress(proto.epochs),
    )  # fmt: skip
    where = {"data": shards, "split_train": split_train, "split_test": split_test, "image_size": size,
             "limit": limit, "seed": seed, "train_rows": len(ytr), "test_rows": len(yte)}  # fmt: skip
    return _record_linear(log, parent, manifest, run_id, name, dataclasses.asdict(proto), res, where)


def _evaluate_lincls(
    run_id: str,
    data: str | None,
    tracking_uri: str,
    epochs: int | None,
    split_train: str,
    split_test: str,
    image_size: int | None,
    limit: int,
    seed: int,
) -> dict[str, Any]:
    """The official ``main_lincls`` protocol on the run's frozen backbone, in this process: RandomResizedCrop +
    flip views drawn afresh every epoch from the decoded images, Resize + CenterCrop for validation, SGD lr 30,
    x0.1 at 60/80 of 100 epochs (scaled with ``epochs``); best and last epoch reported. The images are decoded
    at their own sizes into memory: use ``limit`` (rows per split) on large datasets.
    """
    log, parent, shards, size, manifest, enc = _prepare(
        run_id, data, tracking_uri, image_size, [split_train, split_test]
    )
    proto = with_epochs(LinclsProtocol.for_arch(enc.arch, image_size=size), epochs)
    xtr, ytr, _ = original_images(shards, split_train, limit)
    xte, yte, _ = original_images(shards, split_test, limit)
    device = _device()
    net = load_torchvision_backbone_from_state(enc.state, enc.backbone).to(device)
    prep = Normalizer(enc.mean, enc.std, device=device)
    res = train_lincls(net, xtr, ytr, xte, yte, prep, len(manifest.classes) or None, proto, device=device, seed=seed)
    where = {"data": shards, "split_train": split_train, "split_test": split_test, "image_size": size,
             "limit": limit, "seed": seed, "train_rows": len(ytr), "test_rows": len(yte)}  # fmt: skip
    return _record_linear(log, parent, manifest, run_id, "lincls", dataclasses.asdict(proto), res, where)


def _record_linear(log: RunLog, parent, manifest, run_id: str, preset: str, settings: dict, res, where: dict):
    """A finished probe as a child run (protocol settings + data as params; last and best epoch as metrics) and the
    dict ``evaluate_linear`` returns."""
    params = {"protocol": "linear", "linear_preset": preset, **{f"linear_{k}": v for k, v in settings.items()}, **where}
    metrics = {"linear_top1": res.top1, "linear_top5": res.top5, "linear_train_top1": res.train_top1,
               "linear_best_top1": res.best_top1, "linear_best_epoch": res.best_epoch}  # fmt: skip
    splits = {where["split_train"]: TRAINING, where["split_test"]: EVALUATION}
    eval_id = _log_child(log, parent, "linear", params, metrics, res.history, inputs=(manifest, splits))
    return {"top1": res.top1, "top5": res.top5, "train_top1": res.train_top1, "history": res.history,
            "best_top1": res.best_top1, "best_epoch": res.best_epoch, "protocol": preset, "settings": settings,
            "train_rows": where["train_rows"], "test_rows": where["test_rows"], "data": where["data"],
            "image_size": where["image_size"], "run_id": run_id, "eval_run_id": eval_id}  # fmt: skip
