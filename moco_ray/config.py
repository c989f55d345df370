"""Typed experiment configuration: dataclasses, presets, YAML loading, dotted overrides, validation.

Layering, lowest to highest priority: dataclass defaults -> method preset (``moco.method``) -> YAML file ->
overrides (``{"moco.queue_size": 1024}`` or ``["moco.queue_size=1024"]``). Every value is validated once the
layers are merged; a bad value raises ``ValueError`` naming the dotted field and the allowed range, before any
Ray or MLflow resource is touched.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from moco_ray.core import defaults as D
from moco_ray.core.backbone_spec import BackboneSpec
from moco_ray.core.defaults import ARCHS, VIT_ARCHS

METHODS = ("moco_v1", "moco_v2", "moco_v3", "simclr")
# train.keep_best: the epoch metrics a best checkpoint can be chosen by, and which way is better
BEST_METRICS: dict[str, Literal["max", "min"]] = {"knn_top1": "max", "acc1": "max", "loss": "min"}
# MLflow's rule for experiment names (mlflow/utils/validation.py: _validate_experiment_name, MAX_EXPERIMENT_NAME_LENGTH
# in MLflow 3.x): not empty, at most 500 characters. Replicated because this layer may not import mlflow, and MLflow
# only refuses a name when the run is created, after Ray has started. tests/config/test_config_errors.py compares.
MLFLOW_MAX_EXPERIMENT_NAME_LENGTH = 500


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    small_stem: bool = False  # 3x3 stride-1 conv1 and no max-pool, for 32-96 px inputs
    head: Literal["linear", "mlp"] = "mlp"  # v1: linear, v2: 2-layer MLP
    dim: int = D.EMBED_DIM  # output feature dimension of the projection head
    hidden_dim: int = 0  # MLP hidden width; 0 = backbone feature width (as in MoCo v2)
    # BatchNorm in the MLP projector (MoCo v3 style) for v1/v2: spreads the embeddings of a fresh network, so
    # training leaves the early plateau (loss ~ log(K+1)) far sooner; off = the MoCo v2 paper head.
    head_bn: bool = False
    pred_hidden_dim: int = 4096  # MoCo v3 prediction head hidden width
    proj_layers: int = 2  # MoCo v3 projector depth (official ResNet code: 2; the paper's text: 3)
    zero_init_residual: bool = False  # last BN of each residual block starts at 0 (MoCo v3's ResNet recipe)
    # every BatchNorm over the global batch (torch's SyncBatchNorm on GPUs, moco_ray.core.sync_bn on CPU workers),
    # converted before DDP: MoCo v3's main_moco.py; SimCLR's global BN. Not with v1/v2's shuffle-BN.
    sync_bn: bool = False
    # Vision Transformers (model.arch vit_small | vit_base, moco-v3 vits.py): image size = aug.image_size; 0 = the
    # arch's own value (patch 16; width 384 / 768, depth 12, 12 heads). Small values make CPU tests cheap.
    patch_size: int = 0
    vit_width: int = 0
    vit_depth: int = 0
    vit_heads: int = 0
    stop_grad_conv1: bool = False  # moco-v3 --stop-grad-conv1: the ViT's patch projection stays at its init


@dataclass
class MoCoConfig:
    method: Literal["moco_v1", "moco_v2", "moco_v3", "simclr"] = "moco_v2"
    queue_size: int = D.QUEUE_SIZE  # K, number of negatives in the queue
    momentum: float = D.MOMENTUM  # m, EMA coefficient of the key encoder
    temperature: float = D.TEMPERATURE  # T
    # constant: m throughout; cosine: m -> 1 as 1 - (1 - m) * (1 + cos(pi * t / epochs)) / 2 per step
    # (MoCo v3's --moco-m-cos)
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    symmetric: bool = False  # each view serves as query once (loss summed over both directions)
    # How batch statistics are kept from leaking between query and key:
    # "auto" -> "ddp" with >1 worker, "split" with one; "ddp" = shuffle-BN across workers;
    # "split" = BatchNorm in `bn_splits` groups + in-batch shuffle (official CIFAR demo); "none" = off.
    shuffle_bn: Literal["auto", "ddp", "split", "none"] = "auto"
    bn_splits: int = D.BN_SPLITS


@dataclass
class AugConfig:
    # v1, v2 (aug+): MoCo's ImageNet views; v3: MoCo v3's asymmetric BYOL views (per-view blur / solarize);
    # cifar: the official CIFAR-10 demo's views (default crop scale 0.08-1, no blur). See data/augment.py.
    preset: Literal["v1", "v2", "v3", "cifar"] = "v2"
    image_size: int = 224
    strength: float = 1.0  # 1.0 = the preset; 0 = no distortion; scales jitter, crop lower bound, blur prob.
    # crop-scale lower bound in place of the preset's (0 = the preset's: 0.2 for v1/v2/v3, 0.08 for cifar); MoCo
    # v3's --crop-min: 0.2 in its ResNet recipe, 0.08 in its ViT recipes
    crop_min: float = 0.0
    device: Literal["cpu", "gpu"] = "cpu"  # where crop/jitter/blur run (gpu: batched on the training device)


@dataclass
class DataConfig:
    # Root of ingested shards (holds manifest.json); local path or any pyarrow/fsspec URI.
    shards: str = ""
    # When `shards` has no manifest yet and `source` is given, ingest it there first (quickstart convenience).
    source: str = ""
    train_split: str = "train"
    # Labelled splits for the kNN monitor: memory bank from `knn_train_split`, queries from `knn_test_split`.
    knn_train_split: str = "train"
    knn_test_split: str = "test"
    # Each epoch's row order. "full": a new random permutation of the whole split every epoch, as the official
    # loaders (Ray Data random_shuffle of the encoded rows: each epoch reads its split's bytes into the object store
    # before the first batch). "files": only the file order changes, plus the local buffer below; it streams (for a
    # split far larger than the object store) but consecutive epochs share batch-mates: 4-12x a random order's
    # co-batch fraction on CIFAR-10. Measured: benchmarks/bench_shuffle.py, RESULTS.md.
    shuffle: Literal["full", "files"] = "full"
    shuffle_buffer: int = 1024  # local shuffle buffer (rows) in iter_torch_batches; used with shuffle "files"
    prefetch_batches: int = 2
    map_batch_size: int = 128  # rows per map_batches call (decode + augment)
    limit: int = 0  # use at most this many training rows (0 = all); for quick runs and tests
    # Whole CPUs set aside for the run's Ray Data stream (read + decode/augment tasks take one each); Ray Data's
    # budget for the run is capped at this, and the resource check counts it beside the Train workers.
    cpus: int = 1
    # A training worker that gets no batch for this long fails the run with a "stream stalled" error (0 = off).
    stall_timeout_s: float = 600.0
    # Fail the run when more than this fraction of an epoch's images could not be decoded (grey stand-ins).
    max_corrupt_fraction: float = 0.01
    # Channel statistics (0-1 scale) the views are normalised with, in training, the kNN monitor, evaluation and
    # the exported encoder's metadata. Default ImageNet's; the CIFAR files set CIFAR-10's (the demo's).
    mean: list[float] = field(default_factory=lambda: list(D.IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(D.IMAGENET_STD))


@dataclass
class OptimConfig:
    lr: float = 0.03  # learning rate at `lr_reference_batch`; scaled linearly to the global batch
    lr_reference_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    # step: the cosine moves every step (fractional epoch); epoch: once per epoch, as MoCo v1/v2's main_moco.py
    schedule_unit: Literal["step", "epoch"] = "step"
    first_epoch: int = 0  # the epoch number the schedule gives the first epoch (the CIFAR demo counts from 1)
    warmup_epochs: int = 0
    milestones: list[int] = field(default_factory=lambda: [120, 160])  # step schedule: x0.1 at each
    # sgd; lars: MoCo v3's LARS (no adaptation / weight decay for biases and BN parameters, train/lars.py);
    # adamw: torch.optim.AdamW with optim.weight_decay on every parameter (MoCo v3's ViT recipe)
    optimizer: Literal["sgd", "lars", "adamw"] = "sgd"


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 256  # global batch, split evenly across workers
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu; a fraction (e.g. 0.25) lets small runs share one GPU
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # mixed precision applies on GPU only (CPU workers train fp32); fp16 adds a GradScaler (moco-v3's AMP)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    channels_last: bool = True  # on GPU only
    compile: bool = False
    seed: int | None = 0
    checkpoint_every: int = 1  # epochs
    keep_checkpoints: int = 2
    # "" (off) or a BEST_METRICS name: the best checkpoint by it is kept besides the latest keep_checkpoints, and
    # the run's encoder artifact is logged from it
    keep_best: str = ""
    max_failures: int = 2  # worker-failure restarts from the last checkpoint
    max_steps_per_epoch: int = 0  # 0 = full epoch; a cap for quick runs and tests
    storage_path: str = ""  # Ray Train checkpoints; "" -> $MOCO_RAY_STORAGE_PATH, else ./moco-ray-runs (the cwd)
    name: str = ""  # Ray Train run name; "" -> derived from the MLflow run id


@dataclass
class EvalConfig:
    knn_every: int = 1  # epochs between kNN evaluations (0 = off)
    knn_k: int = D.KNN_K
    knn_t: float = D.KNN_T
    knn_max_bank: int = 0  # cap on memory-bank rows (0 = whole split)
    knn_max_queries: int = 0  # cap on query rows (0 = whole split)
    # backbone: pooled backbone features; query: the query encoder's L2-normalised output, head included (what the
    # official CIFAR-10 demo's kNN monitor scores)
    knn_features: Literal["backbone", "query"] = "backbone"


@dataclass
class TrackingConfig:
    tracking_uri: str = ""  # "" -> $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db)
    experiment: str = "moco-ray"  # MLflow experiment name: 1 to 500 characters (MLflow's limit)
    run_name: str = ""
    # step-level MLflow metrics (step = global step) every N global steps; 0 = auto (about 12 points per epoch,
    # so short epochs still draw curves); -1 = off
    log_every_steps: int = 0
    # seconds between rank 0's progress lines inside an epoch (by wall clock, not by logging step); 0 = off
    progress_every_s: float = 30.0
    # seconds between samples of MLflow's system metrics (system/* : CPU, memory, GPU) on rank 0; 0 = off
    system_metrics_interval: float = 10.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params and Tune search spaces."""
        return flatten(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def lr(self) -> float:
        """Effective learning rate: base lr scaled linearly by global batch / reference batch."""
        return self.optim.lr * self.train.batch_size / self.optim.lr_reference_batch

    @property
    def backbone(self) -> BackboneSpec:
        """How to build the backbone (the one place config fields become a BackboneSpec)."""
        m = self.model
        return BackboneSpec.resolve(
            m.arch, m.small_stem, self.aug.image_size, m.patch_size, m.vit_width, m.vit_depth, m.vit_heads,
            m.stop_grad_conv1,
        )  # fmt: skip

    @property
    def per_worker_batch(self) -> int:
        return self.train.batch_size // self.train.num_workers

    @property
    def uses_queue(self) -> bool:
        return self.moco.method in ("moco_v1", "moco_v2")

    @property
    def bn_mode(self) -> str:
        """The resolved shuffle-BN mode ("ddp", "split" or "none").

        Only the queue methods need it: v3 and SimCLR take negatives from the same batch as the positive, so batch
        statistics cannot single the positive out; they use plain BN.
        """
        if not self.uses_queue:
            return "none"
        if self.moco.shuffle_bn != "auto":
            return self.moco.shuffle_bn
        return "ddp" if self.train.num_workers > 1 else "split"


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# Method presets: the paper settings that distinguish the methods; a YAML or override wins over them. Sources:
# facebookresearch/moco main_moco.py (v1: defaults; v2: --mlp --moco-t 0.2 --aug-plus --cos) and
# facebookresearch/moco-v3 main_moco.py + CONFIG.md (ResNet-50). Deliberate deviations are one key away:
# bf16 (train.precision), the per-step cosine (optim.schedule_unit); the presets use the official precision (v1/v2
# fp32, v3 fp16 AMP) and lr schedule unit. model.arch is not part of a preset (experiment files set resnet50).
_V1_V2_COMMON: dict[str, Any] = {
    # main_moco.py: --lr 0.03 -b 256 --wd 1e-4 --momentum 0.9 --epochs 200 --moco-k 65536 --moco-m 0.999
    "moco": {"queue_size": 65536, "momentum": 0.999, "momentum_schedule": "constant", "symmetric": False},
    "model": {"dim": 128, "hidden_dim": 0},  # --moco-dim 128; v2 MLP hidden = fc input width (2048 for R-50)
    "optim": {
        "optimizer": "sgd",
        "lr": 0.03,
        "lr_reference_batch": 256,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "warmup_epochs": 0,
        "schedule_unit": "epoch",  # adjust_learning_rate(optimizer, epoch, args) once per epoch, epoch from 0
        "first_epoch": 0,
    },
    "train": {"epochs": 200, "batch_size": 256, "precision": "fp32"},  # no AMP in main_moco.py
}
PRESETS: dict[str, dict[str, Any]] = {
    "moco_v1": deep_merge(
        _V1_V2_COMMON,
        {
            "model": {"head": "linear"},  # fc replaced by Linear(2048, 128)
            "moco": {"temperature": 0.07},  # --moco-t 0.07
            "aug": {"preset": "v1"},
            "optim": {"schedule": "step", "milestones": [120, 160]},  # --schedule 120 160: x0.1 at each
        },
    ),
    "moco_v2": deep_merge(
        _V1_V2_COMMON,
        {
            "model": {"head": "mlp"},  # --mlp
            "moco": {"temperature": 0.2},  # --moco-t 0.2
            "aug": {"preset": "v2"},  # --aug-plus
            "optim": {"schedule": "cosine"},  # --cos: lr * 0.5 * (1 + cos(pi * epoch / epochs))
        },
    ),
    "moco_v3": {
        # moco-v3 main_moco.py defaults + CONFIG.md ResNet-50 100 epochs (--moco-m-cos --crop-min=.2):
        # projector _build_mlp(2, 2048, 4096, 256), predictor _build_mlp(2, 256, 4096, 256, last_bn=False),
        # zero_init_residual=True
        "model": {
            "head": "mlp",
            "dim": 256,  # --moco-dim 256
            "hidden_dim": 4096,  # --moco-mlp-dim 4096
            "pred_hidden_dim": 4096,
            "proj_layers": 2,
            "zero_init_residual": True,
            "sync_bn": True,  # torch.nn.SyncBatchNorm.convert_sync_batchnorm(model), before DDP
        },
        # --moco-t 1.0, --moco-m 0.99 with --moco-m-cos (to 1), loss ctr(q1,k2) + ctr(q2,k1)
        "moco": {"temperature": 1.0, "momentum": 0.99, "momentum_schedule": "cosine", "symmetric": True},
        "aug": {"preset": "v3"},  # augmentation1 / augmentation2, --crop-min 0.2
        "optim": {
            "optimizer": "lars",  # --optimizer lars (vits/optimizer.py, trust coefficient 0.001)
            "lr": 0.6,  # --lr 0.6 (CONFIG.md: 0.3 for 300 and 1000 epochs), x batch / 256
            "lr_reference_batch": 256,
            "momentum": 0.9,
            "weight_decay": 1e-6,  # --wd 1e-6
            "warmup_epochs": 10,  # --warmup-epochs 10
            "schedule": "cosine",
            "schedule_unit": "step",  # adjust_learning_rate(optimizer, epoch + i / iters_per_epoch, args)
            "first_epoch": 0,
        },
        # -b 4096, --epochs 100; fp16: main_moco.py's torch.cuda.amp.autocast + torch.cuda.amp.GradScaler (bf16,
        # no scaler, is one setting away)
        "train": {"epochs": 100, "batch_size": 4096, "precision": "fp16"},
    },
    "simclr": {
        "model": {"head": "mlp"},
        "moco": {"temperature": 0.5, "symmetric": True},
        "aug": {"preset": "v2"},
        "optim": {"schedule": "cosine"},
    },
}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_overrides(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``["moco.queue_size=1024", "train.use_gpu=true"]`` -> nested dict (values parsed as YAML scalars)."""
    if not items:
        return {}
    pairs = items.items() if isinstance(items, dict) else (_split_override(s) for s in items)
    nested: dict[str, Any] = {}
    for key, value in pairs:
        parts = key.split(".")
        if len(parts) != 2:
            raise ValueError(f"override {key!r}: expected SECTION.FIELD, e.g. moco.queue_size=1024")
        nested.setdefault(parts[0], {})[parts[1]] = value
    return nested


def _split_override(s: str) -> tuple[str, Any]:
    if "=" not in s:
        raise ValueError(f"override {s!r}: expected KEY=VALUE, e.g. moco.queue_size=1024")
    key, raw = s.split("=", 1)
    if not raw.strip():
        return key.strip(), ""
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"override {s!r}: {yaml_problem(e)}") from None


def yaml_problem(e: yaml.YAMLError) -> str:
    """``line L, column C: YAML syntax error: <problem>`` from PyYAML's error (its repr spans many lines)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}YAML syntax error: {problem}"


def read_yaml(path: Path) -> Any:
    """The parsed YAML file; a syntax error (or a binary file) is one ValueError naming the file and position."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}, {yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a YAML text file") from None


_NOTED: set[str] = set()


def _note_once(msg: str) -> None:
    """A one-line note on stderr, once per process (configs are loaded more than once per command)."""
    if msg not in _NOTED:
        _NOTED.add(msg)
        print(f"moco-ray: note: {msg}", file=sys.stderr, flush=True)


def clip_warmup(cfg: Config) -> Config:
    """A warm-up as long as the run (or longer) is cut to ``train.epochs - 1``, so the schedule still decays.

    The quickstart's one warm-up epoch would otherwise refuse ``train.epochs=1``. Negative values stay errors.
    """
    o, epochs = cfg.optim, cfg.train.epochs
    if epochs >= 1 and o.warmup_epochs >= epochs:
        _note_once(f"optim.warmup_epochs {o.warmup_epochs} >= train.epochs {epochs}: warm-up cut to {epochs - 1}")
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(o, warmup_epochs=epochs - 1))
    return cfg


def load_config(
    source: str | os.PathLike | dict[str, Any] | Config | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Config:
    """Build a validated Config from a YAML path, a dict or a Config, plus overrides."""
    if isinstance(source, Config):
        raw: dict[str, Any] = source.to_dict()
        preset_applied = True  # its values are already resolved
    elif isinstance(source, dict):
        raw, preset_applied = copy.deepcopy(source), False
    elif source is None:
        raw, preset_applied = {}, False
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of sections (model, moco, data, ...)")
        preset_applied = False
    over = parse_overrides(overrides)
    user = deep_merge(raw, over)
    method = (user.get("moco") or {}).get("method", MoCoConfig.method)
    if method not in METHODS:
        raise ValueError(f"moco.method: {method!r} is not one of {', '.join(METHODS)}")
    base = Config().to_dict()
    if not preset_applied:
        base = deep_merge(base, PRESETS[method])
    cfg = clip_warmup(from_dict(deep_merge(base, user)))
    validate(cfg)
    return cfg


def from_dict(d: dict[str, Any]) -> Config:
    sections = {}
    hints = get_type_hints(Config)
    for name, value in d.items():
        if name not in hints:
            raise ValueError(f"unknown config section {name!r}; known: {', '.join(hints)}")
        cls = hints[name]
        if not isinstance(value, dict):
            raise ValueError(f"config section {name!r} must be a mapping")
        sections[name] = _build_section(cls, name, value)
    return Config(**sections)


def _build_section(cls: type, section: str, values: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ValueError(f"unknown config field {section}.{key}; known: {', '.join(hints)}")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
    return cls(**kwargs)


def _coerce(name: str, typ: Any, value: Any) -> Any:
    origin, args = get_origin(typ), get_args(typ)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{name}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        typ = next(a for a in args if a is not type(None))
        origin = get_origin(typ)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        return [_coerce(name, get_args(typ)[0], v) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {value!r} is out of range; allowed: {allowed}")


def _check_stats(d: DataConfig) -> None:
    _check(len(d.mean) == 3 and all(0 <= v <= 1 for v in d.mean), "data.mean", d.mean, "3 values in [0, 1]")
    _check(len(d.std) == 3 and all(0 < v <= 1 for v in d.std), "data.std", d.std, "3 values in (0, 1]")


def _check_model(m: ModelConfig) -> None:
    _check(m.arch in ARCHS, "model.arch", m.arch, ", ".join(ARCHS))
    _check(m.dim > 0, "model.dim", m.dim, "> 0")
    _check(m.hidden_dim >= 0, "model.hidden_dim", m.hidden_dim, ">= 0 (0 = backbone width)")
    _check(m.proj_layers >= 1, "model.proj_layers", m.proj_layers, ">= 1")
    for name in ("patch_size", "vit_width", "vit_depth", "vit_heads"):
        _check(getattr(m, name) >= 0, f"model.{name}", getattr(m, name), ">= 0 (0 = the arch's value)")
    if m.arch in VIT_ARCHS:
        _check(not m.small_stem, "model.small_stem", m.small_stem, f"false with {m.arch} (a ResNet stem)")
        width, heads = m.vit_width or VIT_ARCHS[m.arch]["embed_dim"], m.vit_heads or VIT_ARCHS[m.arch]["num_heads"]
        _check(width % 4 == 0, "model.vit_width", width, "a multiple of 4 (2-D sin-cos position embedding)")
        _check(width % heads == 0, "model.vit_heads", heads, f"a divisor of the ViT width ({width})")


def _check_vit_image(cfg: Config) -> None:
    """The ViT's patch grid is fixed at build time: the training crops must tile it."""
    if cfg.model.arch in VIT_ARCHS:
        patch, size = cfg.backbone.patch_size, cfg.aug.image_size
        _check(size % patch == 0, "aug.image_size", size, f"a multiple of the ViT patch size ({patch})")


def _check_moco(mo: MoCoConfig) -> None:
    _check(mo.queue_size > 0, "moco.queue_size", mo.queue_size, "> 0")
    _check(0.0 <= mo.momentum < 1.0, "moco.momentum", mo.momentum, "0 <= m < 1")
    _check(mo.temperature > 0 and math.isfinite(mo.temperature), "moco.temperature", mo.temperature, "> 0")
    _check(mo.bn_splits >= 1, "moco.bn_splits", mo.bn_splits, ">= 1")


def _check_aug(a: AugConfig) -> None:
    _check(a.image_size >= 8, "aug.image_size", a.image_size, ">= 8")
    _check(0.0 <= a.strength <= 2.0, "aug.strength", a.strength, "0 <= strength <= 2")
    _check(0.0 <= a.crop_min <= 1.0, "aug.crop_min", a.crop_min, "0 < crop_min <= 1, or 0 (the preset's)")
    _check(not (a.device == "gpu" and a.preset == "v3"), "aug.device", a.device, "cpu with aug.preset v3")


def _check_optim(o: OptimConfig) -> None:
    _check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", o.lr, "> 0")
    _check(o.lr_reference_batch > 0, "optim.lr_reference_batch", o.lr_reference_batch, "> 0")
    _check(0.0 <= o.momentum < 1.0, "optim.momentum", o.momentum, "0 <= momentum < 1")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")


def _check_train(t: TrainConfig, o: OptimConfig) -> None:
    _check(t.epochs >= 1, "train.epochs", t.epochs, ">= 1")
    # (a warm-up as long as the run is clipped by load_config: see clip_warmup)
    _check(0 <= o.warmup_epochs < t.epochs, "optim.warmup_epochs", o.warmup_epochs, "0 <= w < train.epochs")
    _check(t.num_workers >= 1, "train.num_workers", t.num_workers, ">= 1")
    _check(t.batch_size >= 2 * t.num_workers, "train.batch_size", t.batch_size, ">= 2 per worker")
    _check(
        t.batch_size % t.num_workers == 0,
        "train.batch_size",
        t.batch_size,
        f"a multiple of train.num_workers ({t.num_workers})",
    )
    _check(t.cpus_per_worker > 0, "train.cpus_per_worker", t.cpus_per_worker, "> 0")
    _check(0 < t.gpus_per_worker <= 1, "train.gpus_per_worker", t.gpus_per_worker, "0 < g <= 1")
    if not t.use_gpu:
        _check(t.gpus_per_worker == 1, "train.gpus_per_worker", t.gpus_per_worker, "1 (no GPUs: train.use_gpu=false)")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, ">= 1")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, ">= 1")
    best = ", ".join(f"{k} ({v})" for k, v in BEST_METRICS.items())
    _check(t.keep_best in ("", *BEST_METRICS), "train.keep_best", t.keep_best, f"'' (off), {best}")
    _check(t.max_failures >= 0, "train.max_failures", t.max_failures, ">= 0")
    _check(re.fullmatch(r"[\w.-]*", t.name) is not None, "train.name", t.name, "letters, digits, '.', '_', '-'")
    _check(t.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", t.max_steps_per_epoch, ">= 0")


def _check_eval(e: EvalConfig) -> None:
    _check(e.knn_every >= 0, "eval.knn_every", e.knn_every, ">= 0")
    _check(e.knn_k >= 1, "eval.knn_k", e.knn_k, ">= 1")
    _check(e.knn_t > 0, "eval.knn_t", e.knn_t, "> 0")


def _check_stream(d: DataConfig) -> None:
    _check(d.map_batch_size >= 1, "data.map_batch_size", d.map_batch_size, ">= 1")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", d.shuffle_buffer, ">= 0")
    _check(d.limit >= 0, "data.limit", d.limit, ">= 0")
    _check(d.cpus >= 1, "data.cpus", d.cpus, ">= 1 (the stream needs a whole CPU)")
    st = d.stall_timeout_s
    _check(st == 0 or 10 <= st < math.inf, "data.stall_timeout_s", st, "0 (off) or >= 10 seconds")
    f = d.max_corrupt_fraction
    _check(0.0 <= f <= 1.0, "data.max_corrupt_fraction", f, "0 <= f <= 1 (1 = never fail)")


def check_experiment_name(name: str, key: str = "tracking.experiment") -> None:
    """MLflow's own check (see MLFLOW_MAX_EXPERIMENT_NAME_LENGTH), here so it fails before Ray, in one line;
    ``key``: what the user set (a config key, or a command's option)."""
    if 1 <= len(name) <= MLFLOW_MAX_EXPERIMENT_NAME_LENGTH:
        return
    shown = repr(name) if len(name) <= 40 else f"{name[:40]!r}... ({len(name)} characters)"
    raise ValueError(
        f"{key}: {shown} is out of range; allowed: 1 to {MLFLOW_MAX_EXPERIMENT_NAME_LENGTH} "
        "characters (MLflow's limit on experiment names)"
    )


def _check_tracking(tr: TrackingConfig) -> None:
    check_experiment_name(tr.experiment)
    _check(tr.log_every_steps >= -1, "tracking.log_every_steps", tr.log_every_steps, ">= -1 (0 = auto, -1 = off)")
    _check(tr.progress_every_s >= 0, "tracking.progress_every_s", tr.progress_every_s, ">= 0 (0 = off)")
    _check(
        tr.system_metrics_interval == 0 or 0.1 <= tr.system_metrics_interval <= 3600,
        "tracking.system_metrics_interval",
        tr.system_metrics_interval,
        "0 (off) or 0.1 to 3600 seconds",
    )


def _check_batch_layout(cfg: Config) -> None:
    """Fields that must agree with each other: the queue holds a global batch, BN splits divide a worker's batch."""
    mo, t = cfg.moco, cfg.train
    if cfg.uses_queue:
        _check(
            mo.queue_size >= t.batch_size,
            "moco.queue_size",
            mo.queue_size,
            f">= the global batch (train.batch_size = {t.batch_size})",
        )
    if cfg.bn_mode == "split":
        _check(
            cfg.per_worker_batch % mo.bn_splits == 0,
            "moco.bn_splits",
            mo.bn_splits,
            f"a divisor of the per-worker batch ({cfg.per_worker_batch})",
        )
    if cfg.bn_mode == "ddp":
        _check(t.num_workers > 1, "moco.shuffle_bn", mo.shuffle_bn, "'ddp' needs train.num_workers > 1")
    if cfg.model.sync_bn and cfg.uses_queue:  # shuffle-BN keeps key and query statistics apart; SyncBN would mix
        _check(False, "model.sync_bn", True, f"false with {mo.method} (its shuffle-BN); true for moco_v3 and simclr")


def _check_keep_best(cfg: Config) -> None:
    """A best checkpoint by kNN needs the kNN monitor: with it off no epoch would ever compete."""
    if cfg.train.keep_best == "knn_top1" and cfg.eval.knn_every == 0:
        raise ValueError("train.keep_best: 'knn_top1' needs the kNN monitor, but eval.knn_every is 0 (off)")


def validate(cfg: Config) -> None:
    """Raise ValueError naming the first bad field and its allowed range (sections in this order)."""
    _check_model(cfg.model)
    _check_moco(cfg.moco)
    _check_aug(cfg.aug)
    _check_stats(cfg.data)
    _check_optim(cfg.optim)
    _check_train(cfg.train, cfg.optim)
    _check_eval(cfg.eval)
    _check_stream(cfg.data)
    _check_tracking(cfg.tracking)
    _check_batch_layout(cfg)
    _check_vit_image(cfg)
    _check_keep_best(cfg)


def absolute(path: str) -> str:
    """A local path made absolute (Ray workers run in another cwd); a URI (``s3://...``) or "" unchanged."""
    return path if (not path or "://" in path) else str(Path(path).expanduser().resolve())
