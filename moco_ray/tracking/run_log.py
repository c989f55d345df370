"""One MLflow run, written by one process at a time (driver or rank 0), through a small handle.

``RunLog(uri, run_id)`` owns the store's client and knows the run; everything moco-ray writes to or reads back
from a run (params, tags, per-epoch metrics, config, encoder, end state, child runs, Model Registry versions) goes
through it, bound to that store: nothing here sets MLflow's process-global tracking URI for longer than the one
call of MLflow's fluent API that needs it (:func:`_fluent_run`).

mlflow, torch and the model helpers that import torch are imported inside the functions that use them: this
module is imported by every Ray Train worker (``train.reporting``), and only rank 0 (or the driver) writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moco_ray.config import Config, load_config
from moco_ray.core.backbone_spec import BackboneSpec, as_spec
from moco_ray.core.defaults import IMAGENET_MEAN, IMAGENET_STD
from moco_ray.data.writable import write_error
from moco_ray.envvars import scoped_env
from moco_ray.tracking.datasets import log_split_inputs
from moco_ray.tracking.history import EpochMetrics
from moco_ray.tracking.store import client
from moco_ray.version import __version__

if TYPE_CHECKING:
    import torch

ENCODER_DIR = "encoder"
ENCODER_FILE = "encoder.pt"
ENCODER_INFO = "encoder.json"
CONFIG_FILE = "config.yaml"
ENCODER_MODEL_URI_TAG = "moco_ray.encoder_model_uri"  # run tag: the mlflow.pytorch model of the encoder
# MLflow 3's experiment kind (an experiment tag; the UI's own values): "custom_model_development" ("Machine
# learning") opens the experiment on its runs table instead of the GenAI overview (traces, latency)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"
URI_ENV = "MLFLOW_TRACKING_URI"
# run tag: one line per restore that discarded logged epochs (their points stay in MLflow's history)
DISCARDED_EPOCHS_TAG = "moco_ray.discarded_epochs"
# run tag set when a run is created: "1" = its `epoch` metric's value and its per-epoch MLflow steps are the epoch's
# number as the console prints it (1 for the first). Runs made before it have none: there both are the 0-based index
EPOCH_BASE_TAG = "moco_ray.epoch_base"
EPOCH_BASE = 1


def epoch_base(tags: dict[str, str]) -> int:
    """The run's epoch numbering from its tags: 1 (every run made now), 0 for runs logged before the tag existed."""
    return int(tags.get(EPOCH_BASE_TAG, "0"))


def epochs_done(run: Any) -> int:
    """Epochs an MLflow run (entity) finished, read from its last ``epoch`` metric in the run's own numbering; 0
    without one."""
    last = run.data.metrics.get("epoch")
    return 0 if last is None else int(last) + 1 - epoch_base(run.data.tags)


@dataclass
class RunEncoder:
    """A run's encoder weights (torchvision / timm layout) and how to build the module they load into."""

    state: dict[str, torch.Tensor]
    arch: str
    small_stem: bool
    feature_dim: int
    # the channel statistics its inputs were normalised with in training (ImageNet's for runs that predate them)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # the whole build description (a ViT's size too); None -> made from arch + small_stem (ResNets)
    backbone: BackboneSpec | None = None

    def __post_init__(self) -> None:
        if self.backbone is None:
            self.backbone = as_spec(self.arch, self.small_stem)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _installed(dist: str) -> str:
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
        "timm.version": _installed("timm"),
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
        self._epoch_base: int | None = None

    # --- reading ---------------------------------------------------------------------------------------------

    def get(self):
        """The MLflow ``Run``; ValueError naming the run when the store does not have it."""
        from mlflow.exceptions import MlflowException  # lazy: Ray workers import this module; mlflow only if used

        try:
            return self.client.get_run(self.run_id)
        except MlflowException:
            raise ValueError(f"MLflow run {self.run_id!r} not found in {self.uri}") from None

    def download(self, path: str, dst: str | Path) -> Path:
        import mlflow.artifacts  # lazy: Ray workers import this module on every rank; mlflow only if used

        with _no_artifact_bar():
            return Path(
                mlflow.artifacts.download_artifacts(
                    run_id=self.run_id, artifact_path=path, dst_path=str(dst), tracking_uri=self.uri
                )
            )

    def config(self) -> Config | None:
        """The run's resolved config (its ``config.yaml`` artifact), or None when it has none."""
        with tempfile.TemporaryDirectory() as d:
            try:
                path = self.download(CONFIG_FILE, d)
            except Exception:  # MLflow raises several types for a missing artifact
                return None
            return load_config(path)

    def encoder(self) -> RunEncoder:
        """The run's ``encoder/`` artifact (encoder.pt + encoder.json); ValueError when the run has none."""
        import torch  # lazy: torch only where an encoder is read or written, not on every tracking path

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
        spec = BackboneSpec.from_info(info)  # files written before ViTs: arch + small_stem
        dim = int(info.get("feature_dim") or spec.feature_dim)
        mean, std = tuple(info.get("mean") or IMAGENET_MEAN), tuple(info.get("std") or IMAGENET_STD)
        return RunEncoder(state, spec.arch, spec.small_stem, dim, mean, std, spec)

    def logged_steps(self, key: str = "loss") -> set[int]:
        return {step for step, _ in self.metric_history(key)}

    def epoch_base(self) -> int:
        """1 when the run's ``epoch`` values and steps are epoch numbers, 0 when they are 0-based indices (runs
        logged before `EPOCH_BASE_TAG`; a resume keeps writing them so, and their curves stay one numbering)."""
        if self._epoch_base is None:
            self._epoch_base = epoch_base(self.get().data.tags)
        return self._epoch_base

    def logged_epochs(self) -> set[int]:
        """The 0-based epochs with metrics in the run, read from the values of its ``epoch`` metric."""
        base = self.epoch_base()
        return {int(v) - base for _, v in self.metric_history("epoch")}

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """Every ``(step, value)`` of metric ``key``, as MLflow returns them."""
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def children(self) -> list[Any]:
        """This run's child runs (``mlflow.parentRunId``), deleted ones included, oldest first."""
        from mlflow.entities import ViewType  # lazy: Ray workers import this module on every rank; mlflow only if used

        exp_id = self.get().info.experiment_id
        runs = self.client.search_runs(
            [exp_id], f"tags.`mlflow.parentRunId` = '{self.run_id}'", run_view_type=ViewType.ALL, max_results=50000
        )
        return sorted(runs, key=lambda r: r.info.start_time or 0)

    # --- writing ---------------------------------------------------------------------------------------------

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag  # lazy: Ray workers import this module on every rank; mlflow only if used

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param  # lazy: Ray workers import this module on every rank; mlflow only if used

        plist = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(plist), 100):
            self.client.log_batch(self.run_id, params=plist[i : i + 100])

    def log_text(self, text: str, name: str, artifact_path: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(text)
            self.log_artifact(p, artifact_path)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        try:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        except OSError as e:  # a full disk, a read-only or blocked artifact location: one line naming where
            raise write_error(f"run {self.run_id}", f"its artifacts at {self.get().info.artifact_uri}", e) from None

    def log_epochs(self, history: Sequence[EpochMetrics], after: int | None = None) -> int:
        """Log each epoch's metrics (names as in ``EpochMetrics.as_dict``; the ``epoch`` metric and the MLflow step
        are the epoch's number as the console prints it, ``epoch + 1``: one numbering everywhere) not logged yet,
        and every epoch past ``after`` (0-based, as ``history``) even if logged; returns how many epochs were
        written.

        Idempotent up to ``after``: after a worker restart the same epochs come again from the checkpoint's history
        and are skipped, so per-epoch metrics are neither lost nor duplicated. Past ``after`` (the restored
        checkpoint's epoch) they are this model's: a point MLflow already holds there came from a branch that was
        discarded (:meth:`mark_discarded`), and MLflow cannot delete it, so the new point goes at the same step with
        a later timestamp, which MLflow shows as the latest value.
        """
        done, base = self.logged_epochs(), self.epoch_base()
        new = [h for h in history if h.epoch not in done or (after is not None and h.epoch > after)]
        self.log_metric_points(
            (k, v + base if k == "epoch" else v, h.epoch + base) for h in new for k, v in h.as_dict().items()
        )
        return len(new)

    def log_epochs_done(self, epochs: int) -> None:
        """The ``epoch`` metric of a run whose ``epochs`` epochs were trained elsewhere (an imported checkpoint),
        as a run trained here would have it after its last epoch."""
        if epochs > 0:
            last = epochs - 1 + self.epoch_base()
            self.log_metric_points([("epoch", last, last)])

    def mark_discarded(self, after: int, why: str) -> list[int]:
        """The logged epochs past ``after`` (0-based; -1: none kept), which a restore from epoch ``after``'s
        checkpoint discards: one line appended to the ``DISCARDED_EPOCHS_TAG`` tag ("epochs 4-5 discarded by resume
        after epoch 3", 1-based as the console counts), so the run says which points are not its model's until they
        are logged again. Returns those epochs (0-based); nothing logged past ``after``: nothing written."""
        stale = sorted(e for e in self.logged_epochs() if e > after)
        if not stale:
            return []
        since = f"after epoch {after + 1}" if after >= 0 else "before the first checkpoint"
        line = f"{_epoch_ranges(stale)} discarded by {why} {since}"
        lines = [*self.get().data.tags.get(DISCARDED_EPOCHS_TAG, "").splitlines(), line]
        self.set_tags({DISCARDED_EPOCHS_TAG: "\n".join(lines)})
        return stale

    def log_step_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Metrics at MLflow step ``step`` (in training the global step, comparable across runs; a summary: 0)."""
        self.log_metric_points((k, v, step) for k, v in metrics.items())

    def log_metric_points(self, points: Iterable[tuple[str, float, int]]) -> None:
        """``(key, value, step)`` points, in batches of at most 1000 (MLflow's limit for one request)."""
        from mlflow.entities import Metric  # lazy: Ray workers import this module on every rank; mlflow only if used

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v, step in points]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(self.run_id, metrics=ms[i : i + 1000])

    def log_dataset_inputs(self, manifest, contexts: dict[str, str]) -> None:
        """The shard splits ``{split: "training" | "evaluation"}`` as the run's MLflow dataset inputs."""
        log_split_inputs(self.client, self.run_id, manifest, contexts)

    def create_child(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> RunLog:
        """A new run in this run's experiment with ``mlflow.parentRunId`` = this run (no config artifact)."""
        exp_id = self.get().info.experiment_id
        return _new_run(self.uri, exp_id, run_name, params, tags, None, self.run_id)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def reopen(self) -> None:
        self.client.update_run(self.run_id, status="RUNNING")

    def log_encoder(
        self,
        backbone,
        arch: str | BackboneSpec,
        small_stem: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> str:
        """The backbone's torchvision state dict + how to build its module and normalise its inputs (``mean`` /
        ``std``, 0-1 scale; default: the run's ``data.mean`` / ``data.std``, else ImageNet's); returns the
        ``encoder/`` URI."""
        import torch  # lazy: torch only where an encoder is read or written, not on every tracking path

        from moco_ray.core.backbone_io import torchvision_state_dict  # lazy: imports torch and torchvision

        if mean is None or std is None:
            cfg = self.config()
            mean = mean or (list(cfg.data.mean) if cfg else list(IMAGENET_MEAN))
            std = std or (list(cfg.data.std) if cfg else list(IMAGENET_STD))
        spec = as_spec(arch, small_stem)
        info = spec.to_info()  # + timm_kwargs for a ViT: VisionTransformer(**timm_kwargs)
        info.update({"mean": [float(v) for v in mean], "std": [float(v) for v in std]})
        info["format"] = "timm-state-dict" if spec.is_vit else "torchvision-state-dict"
        with tempfile.TemporaryDirectory() as d:
            torch.save(torchvision_state_dict(backbone), Path(d) / ENCODER_FILE)
            (Path(d) / ENCODER_INFO).write_text(json.dumps(info, indent=2))
            self.log_artifact(Path(d) / ENCODER_FILE, ENCODER_DIR)
            self.log_artifact(Path(d) / ENCODER_INFO, ENCODER_DIR)
        return f"runs:/{self.run_id}/{ENCODER_DIR}"

    def log_pytorch_model(self, module, image_size: int | None = None) -> str:
        """The plain torchvision module through mlflow.pytorch (loads with ``mlflow.pytorch.load_model``); with
        ``image_size`` (an image encoder) also its signature, float32 [-1, 3, H, W] -> [-1, feature width] (H, W
        free for a ResNet, ``image_size`` for a ViT), so its registered versions show their schema."""
        import mlflow.pytorch  # lazy: Ray workers import this module on every rank; mlflow only if used
        import torch  # lazy: torch only where an encoder is read or written, not on every tracking path
        import torchvision  # lazy: as torch

        reqs = [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"]
        if type(module).__module__.startswith("timm."):  # a ViT: timm's VisionTransformer unpickles with timm
            reqs.append(f"timm=={_installed('timm')}")
        signature = _encoder_signature(module.cpu().eval(), image_size) if image_size else None
        with _fluent_run(self.uri, self.run_id), _quiet_model_logging():
            info = mlflow.pytorch.log_model(
                module, name="encoder_model", pip_requirements=reqs, serialization_format="pickle", signature=signature
            )
        return info.model_uri

    def model_has_signature(self, model_uri: str) -> bool:
        """Whether the logged model at ``model_uri`` has a signature (models logged before they carried one do not)."""
        import mlflow.artifacts  # lazy: Ray workers import this module on every rank; mlflow only if used
        from mlflow.models import Model  # lazy: as mlflow

        source, _, _ = self._model_source(model_uri)  # through this store, not the process-global tracking URI
        with tempfile.TemporaryDirectory() as d, _no_artifact_bar():
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/MLmodel", dst_path=d)
            return Model.load(path).signature is not None

    def register_model(self, model_uri: str, name: str, tags: dict[str, str]) -> str:
        """A new version of registered model ``name`` (created if missing) from this run's model at ``model_uri``
        (``models:/<model id>``, as :meth:`log_pytorch_model` returns, or ``runs:/<run id>/<path>``); returns the
        version. What ``mlflow.register_model`` does, through this store's client instead of the process-global
        tracking URI it reads (and MLflow's sqlite registry reads for a ``models:/`` source)."""
        from mlflow.exceptions import MlflowException  # lazy: Ray workers import this module; mlflow only if used
        from mlflow.protos.databricks_pb2 import (  # lazy: as mlflow
            ALREADY_EXISTS,
            RESOURCE_ALREADY_EXISTS,
            ErrorCode,
        )

        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
                raise
        source, run_id, model_id = self._model_source(model_uri)
        mv = self.client.create_model_version(name, source, run_id, tags=tags, model_id=model_id)
        if model_id:  # the logged model lists its registered versions, as mlflow.register_model records them
            self._note_model_version(model_id, mv.name, str(mv.version))
        return str(mv.version)

    def _model_source(self, model_uri: str) -> tuple[str, str | None, str | None]:
        """(storage location, source run, logged model id) of a ``models:/<id>`` or ``runs:/`` model URI."""
        from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository  # lazy: mlflow, see docstring

        if RunsArtifactRepository.is_runs_uri(model_uri):
            run_id, _ = RunsArtifactRepository.parse_runs_uri(model_uri)
            return RunsArtifactRepository.get_underlying_uri(model_uri, tracking_uri=self.uri), run_id, None
        model = self.client.get_logged_model(model_uri.removeprefix("models:/"))
        return model.artifact_location, model.source_run_id, model.model_id

    def _note_model_version(self, model_id: str, name: str, ver: str) -> None:
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS  # lazy: mlflow only if used (see docstring)

        model = self.client.get_logged_model(model_id)
        listed = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS) or "[]") + [{"name": name, "version": ver}]
        self.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})

    def log_trained_encoder(
        self,
        backbone,
        arch: str | BackboneSpec,
        small_stem: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> str:
        """Everything a finished run logs of its encoder: ``encoder/`` (state dict + info), the mlflow.pytorch
        model of the plain torchvision module, and the tag pointing at that model (what export --register uses).

        Returns the ``encoder/`` artifact URI. One function, so the trainer and hand-made runs log alike.
        """
        from moco_ray.core.backbone_io import (  # lazy: imports torch and torchvision
            load_torchvision_backbone_from_state,
            torchvision_state_dict,
        )

        encoder_uri = self.log_encoder(backbone, arch, small_stem, mean, std)
        plain = load_torchvision_backbone_from_state(torchvision_state_dict(backbone), arch, small_stem)
        size = as_spec(arch, small_stem).img_size or 32  # the signature's probe: a ViT's own size; a ResNet takes any
        self.set_tags({ENCODER_MODEL_URI_TAG: self.log_pytorch_model(plain, size)})
        return encoder_uri


def _encoder_signature(module, image_size: int):
    """The model signature of an encoder: one real forward of a [1, 3, S, S] batch gives the output width; a ResNet
    (global average pooling) takes any H, W, a ViT only its own size."""
    import numpy as np  # lazy: as torch
    import torch  # lazy: torch only where an encoder is read or written, not on every tracking path
    from mlflow.models.signature import ModelSignature  # lazy: mlflow only if used
    from mlflow.types.schema import Schema, TensorSpec  # lazy: as mlflow

    with torch.no_grad():
        width = module(torch.zeros(1, 3, image_size, image_size)).shape[-1]
    hw = image_size if type(module).__module__.startswith("timm.") else -1
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, 3, hw, hw), "images")])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, width), "features")]))


def _epoch_ranges(epochs: list[int]) -> str:
    """0-based sorted epochs as 1-based ranges: [3] -> "epoch 4"; [3, 4, 6] -> "epochs 4-5, 7"."""
    runs: list[list[int]] = []
    for e in epochs:
        if runs and e == runs[-1][-1] + 1:
            runs[-1].append(e)
        else:
            runs.append([e])
    text = ", ".join(f"{r[0] + 1}" if len(r) == 1 else f"{r[0] + 1}-{r[-1] + 1}" for r in runs)
    return f"epoch {text}" if len(epochs) == 1 else f"epochs {text}"


def _no_artifact_bar() -> contextlib.AbstractContextManager[None]:
    """No "Downloading artifacts" progress bar: moco-ray's downloads are a config, an encoder or a model's
    metadata, and the bar (one per call, several per run) would sit between the epoch and result lines."""
    return scoped_env({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})


@contextlib.contextmanager
def _fluent_run(uri: str, run_id: str) -> Iterator[None]:
    """MLflow's fluent API on run ``run_id`` of ``uri`` for the ``with`` block only.

    ``mlflow.pytorch.log_model`` has no client form: it writes to the active run of the process-global tracking
    URI. That URI is set for the block and then put back as it was, ``$MLFLOW_TRACKING_URI`` included (setting
    the URI overwrites it), so the caller's own MLflow use, e.g. in a notebook, sees no change.
    """
    import mlflow  # lazy: Ray workers import this module on every rank; mlflow only if used
    from mlflow.tracking._tracking_service import utils  # lazy: as mlflow; MLflow's holder of the global URI

    before, env = utils._tracking_uri, os.environ.get(URI_ENV)
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is None:
            os.environ.pop(URI_ENV, None)
        else:
            os.environ[URI_ENV] = env


@contextlib.contextmanager
def _quiet_model_logging() -> Iterator[None]:
    """``mlflow.pytorch.log_model`` without its progress bar and its warning about the pickle format. Pickle is
    moco-ray's choice for this copy (a plain torchvision module, which ``mlflow.pytorch.load_model`` then loads on
    any torch); the safe path is the ``encoder/`` state dict, which ``load_encoder`` and ``export`` read."""
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
    from mlflow.exceptions import MlflowException  # lazy: Ray workers import this module; mlflow only if used

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
    """Create the run in experiment ``experiment`` (made if missing), log params (the flattened config), tags and
    the resolved config YAML (None: a run that has no moco-ray config, e.g. an imported checkpoint)."""
    exp_id = training_experiment(client(uri), experiment)
    return _new_run(uri, exp_id, run_name, params, tags, config_yaml, parent_run_id)


def _new_run(
    uri: str,
    exp_id: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    config_yaml: str | None,
    parent_run_id: str | None,
) -> RunLog:
    all_tags = {EPOCH_BASE_TAG: str(EPOCH_BASE), **tags}
    if run_name:
        all_tags["mlflow.runName"] = run_name
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client(uri).create_run(exp_id, tags=all_tags, run_name=run_name or None)
    log = RunLog(uri, run.info.run_id)
    try:
        log.log_params(params)
        log.set_tags(all_tags)
        if config_yaml is not None:
            log.log_text(config_yaml, CONFIG_FILE)
    except BaseException:  # e.g. an artifact location that became unwritable after the pre-Ray check: not RUNNING
        log.finish("FAILED")
        raise
    return log


def open_run(uri: str, run_id: str) -> tuple[RunLog, Any]:
    """(handle, MLflow Run) of an existing run; ValueError naming it when it does not exist."""
    log = RunLog(uri, run_id)
    return log, log.get()
