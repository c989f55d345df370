"""Export formats for a pretrained backbone (torchvision state dict, TorchScript, detectron2 pickle, the official
MoCo checkpoint of the run's method, DeiT's) and the export directory that carries its own description.

The torchvision state dict is the reference format: its keys are exactly those of ``torchvision.models.<arch>()``
minus ``fc.*``, so it loads with ``strict=True`` into a plain torchvision model (``fc = Identity``, plus the small
stem when the encoder was trained with one). Training-time modules do not leak into it: ``SplitBatchNorm`` is a
``BatchNorm2d`` subclass with the same parameters and buffers, so its keys and tensors are those of BatchNorm2d.

An export is a directory (:func:`save_export_dir`): the weights, ``encoder.json`` (how to build the module, the
input mean/std, method, source run) and a README.md saying how to load it. A bare weights file lost its arch, stem
and normalisation the moment it left MLflow. The directory is written whole beside its target and renamed onto it,
so a reader never sees a half export; ``save_export`` is the single-file primitive it shares its bytes with.
A failed write (a full disk, a read-only mount, a regular file in the way) leaves no temp file, the old export as it
was, and is one ValueError naming the path and the errno (torch's own zip writer reports a full disk as a
RuntimeError without one, hence the serialisation in memory first).
"""

from __future__ import annotations

import copy
import errno
import io
import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from moco_ray.core.backbone_io import load_torchvision_backbone_from_state, torchvision_state_dict
from moco_ray.core.official_io import to_deit, to_official
from moco_ray.data.writable import check_writable_dir, write_error
from moco_ray.version import __version__

FORMATS = ("torchvision", "torchscript", "detectron2", "moco", "deit")
# The weights' file name in an export directory, per format. The torchvision one is the MLflow encoder artifact's
# (tracking.run_log ENCODER_FILE), so an exported directory is what moco_ray.load_encoder reads.
WEIGHTS_FILE = {
    "torchvision": "encoder.pt",
    "torchscript": "encoder.torchscript.pt",
    "detectron2": "encoder.detectron2.pkl",
    "moco": "encoder.moco.pth.tar",
    "deit": "encoder.deit.pth",
}
INFO_FILE = "encoder.json"  # as tracking.run_log ENCODER_INFO (evaluation may not import tracking: mlflow)
NOTE_FILE = "README.md"
# An OUT named like a weights file is the old single-file form of export, refused rather than made a directory.
_FILE_SUFFIXES = (".pt", ".pth", ".pkl", ".tar", ".ckpt", ".bin")


def to_torchscript(backbone: nn.Module, example_input: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace a copy of ``backbone`` in eval mode (the source module is left untouched).

    Tracing rather than scripting: a ResNet has no data-dependent control flow in eval mode, and tracing works
    for training-time subclasses (SplitBatchNorm) that TorchScript's compiler may not accept. The traced graph
    keeps the batch size and image size free (adaptive average pooling); a timm ViT's input-size check becomes a
    constant (TracerWarning, silenced), so its trace takes its own size only, as the ViT itself does. torch.jit is
    deprecated in recent torch but still loads anywhere libtorch runs; its FutureWarnings are silenced here.
    """
    model = copy.deepcopy(backbone).eval()
    param = next(model.parameters(), None)
    x = example_input.to(param.device if param is not None else "cpu")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x)
    return traced


def _convert_key(k: str) -> str:
    # Exactly the renaming of MoCo's detection/convert-pretrain-to-detectron2.py.
    if "layer" not in k:
        k = "stem." + k
    for t in [1, 2, 3, 4]:
        k = k.replace(f"layer{t}", f"res{t + 1}")
    for t in [1, 2, 3]:
        k = k.replace(f"bn{t}", f"conv{t}.norm")
    k = k.replace("downsample.0", "shortcut")
    k = k.replace("downsample.1", "shortcut.norm")
    return k


def to_detectron2(state: Mapping[str, torch.Tensor]) -> dict:
    """detectron2's pickle payload: ``{"model": {d2 key: numpy array}, "__author__": "MOCO", ...}``.

    Keys are renamed as the official MoCo converter does (``conv1.weight`` -> ``stem.conv1.weight``, ``bn1.*`` ->
    ``stem.conv1.norm.*``, ``layer1.0.bn2.*`` -> ``res2.0.conv2.norm.*``, ``downsample.0/1`` ->
    ``shortcut``/``shortcut.norm``); a full MoCo checkpoint key's ``module.encoder_q.`` prefix is stripped first.
    """
    model = {}
    for k, v in state.items():
        k = k.removeprefix("module.encoder_q.")
        t = v.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        model[_convert_key(k)] = t.contiguous().numpy()
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def check_export_target(out: str | os.PathLike) -> None:
    """ValueError naming ``out`` and the errno (or the file in the way) when its directory, or the nearest one
    above it that exists, cannot take a file: checked with a real probe file before the encoder is downloaded and
    serialised (``os.access`` says yes to root on a read-only mount)."""
    check_writable_dir(Path(out).parent, "export", out)


def _write_atomic(out: Path, data: bytes) -> None:
    """``data`` into a temp file next to ``out``, renamed onto it; on any failure the temp file is removed.

    The file gets the mode a plain ``open()`` would give it (0666 less the umask), not mkstemp's private 0600.
    """
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except OSError as e:
        raise write_error("export", out, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _serialise(
    state: dict[str, torch.Tensor],
    fmt: str,
    *,
    arch: str,
    small_stem: bool,
    module: nn.Module | None = None,
    method: str = "moco_v2",
    image_size: int = 224,
    epoch: int = 0,
) -> bytes:
    """The export file's bytes (in memory, so a failed write is a plain OSError with its errno). TorchScript traces
    ``module`` (else the plain torchvision module rebuilt from ``state``)."""
    buf = io.BytesIO()
    if fmt == "torchvision":
        torch.save(state, buf)
    elif fmt == "moco":
        torch.save(to_official(state, arch, epoch, method=method, small_stem=small_stem), buf)
    elif fmt == "deit":
        torch.save(to_deit(state), buf)
    elif fmt == "torchscript":
        plain = module if module is not None else load_torchvision_backbone_from_state(state, arch, small_stem)
        traced = to_torchscript(plain, torch.zeros(1, 3, image_size, image_size))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(traced, buf)
    else:
        pickle.dump(to_detectron2(state), buf)
    return buf.getvalue()


def _check_args(fmt: str, image_size: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    if image_size < 8:
        raise ValueError(f"export image_size {image_size} is too small; need >= 8")


def save_export(
    backbone: nn.Module,
    arch: str,
    small_stem: bool,
    fmt: Literal["torchvision", "torchscript", "detectron2", "moco", "deit"],
    out_path: str | os.PathLike,
    image_size: int = 224,
    epoch: int = 0,
    method: str = "moco_v2",
) -> Path:
    """Write ``backbone`` to the one file ``out_path`` in ``fmt`` (atomically) and return the path.

    Every format goes through the checked torchvision state dict; TorchScript traces the plain torchvision
    module rebuilt from it (``image_size`` only sets the example input), so no training-time class ends up in the
    file. ``moco``: the official checkpoint of ``method`` (see ``official_io.to_official``) without fc (the
    official scripts add their own). Exports of runs are directories: :func:`save_export_dir`.
    """
    _check_args(fmt, image_size)
    out = Path(out_path)
    check_export_target(out)
    state = torchvision_state_dict(backbone, arch, small_stem)
    data = _serialise(state, fmt, arch=arch, small_stem=small_stem, method=method, image_size=image_size, epoch=epoch)
    _write_atomic(out, data)
    return out


# ---- the export directory ----


@dataclass(frozen=True)
class ExportInfo:
    """What an export's ``encoder.json`` says besides its format: how to build the module (``backbone``: the
    fields of the run's encoder.json, i.e. ``arch``, ``small_stem``, ``feature_dim`` and, for a ViT,
    ``timm_kwargs``), how its inputs were normalised in training, the method, and the run it came from."""

    backbone: Mapping[str, Any]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    method: str
    epochs: int = 0
    image_size: int = 0  # the run's aug.image_size (0: unknown); a ResNet takes any size, a ViT its own
    source: Mapping[str, str] = field(default_factory=dict)  # run_id, run_name, experiment_id

    @property
    def arch(self) -> str:
        return str(self.backbone["arch"])

    @property
    def small_stem(self) -> bool:
        return bool(self.backbone.get("small_stem", False))

    @property
    def is_vit(self) -> bool:
        return "timm_kwargs" in self.backbone

    def to_json(self, fmt: str) -> dict[str, Any]:
        info = dict(self.backbone)
        info.update({"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]})
        info.update({"method": self.method, "epochs": int(self.epochs), "image_size": int(self.image_size)})
        info.update({"format": fmt, "weights": WEIGHTS_FILE[fmt], "source": dict(self.source)})
        info["moco_ray_version"] = __version__
        return info


def export_dir_run(out: str | os.PathLike) -> str | None:
    """The source run id an existing export directory's ``encoder.json`` names (None: not an export)."""
    try:
        info = json.loads((Path(out) / INFO_FILE).read_text())
        return str(info["source"]["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_export_dir(out: str | os.PathLike, run_id: str) -> None:
    """ValueError (one line) unless ``out`` can become the export directory of run ``run_id``: not there yet, an
    empty directory, or an earlier export of the same run (which the new one replaces); and its parent, or the
    nearest directory above it that exists, takes a file (a real probe: the directory is written beside ``out``
    and renamed onto it). Checked before the encoder is downloaded."""
    path = Path(out)
    check_writable_dir(path.parent, "export", path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"export: {path} is a file; OUT is the export directory (weights, {INFO_FILE}, {NOTE_FILE})")
    if not path.exists() and path.name.endswith(_FILE_SUFFIXES):
        raise ValueError(
            f"export: OUT {path} names a file; OUT is the export directory now (weights, {INFO_FILE}, {NOTE_FILE})"
        )
    if path.is_dir() and any(path.iterdir()):
        prev = export_dir_run(path)
        if prev != run_id:
            what = f"an export of run {prev}" if prev else "not an export"
            raise ValueError(f"export: {path} is not empty ({what}); choose a new or empty directory")


def usage_note(info: ExportInfo, fmt: str) -> str:
    """The export directory's README.md: what is in it and how to load it, with this encoder's own values."""
    src = info.source
    arch, w = info.arch, WEIGHTS_FILE[fmt]
    size = f"; trained at {info.image_size} px" if info.image_size else ""
    lines = [
        f"# {arch} encoder: moco-ray run {src.get('run_id', '?')}",
        "",
        f"{info.method} pretraining, {info.epochs} epochs; run `{src.get('run_name', '?')}` of experiment "
        f"{src.get('experiment_id', '?')} in the MLflow store it was exported from (moco-ray {__version__}, "
        f"format `{fmt}`).",
        "",
        "| file | what |",
        "| --- | --- |",
        f"| `{w}` | the weights ({_WHAT[fmt]}) |",
        f"| `{INFO_FILE}` | arch, stem, feature width, input mean/std, method, source run |",
        "",
        f"Inputs: RGB floats in [0, 1] as [N, 3, H, W], normalised with mean {list(info.mean)} and std "
        f"{list(info.std)}, as in training{size}. Output: [N, {info.backbone.get('feature_dim', '?')}] features "
        f"({'the class token after the final norm' if info.is_vit else 'after global average pooling'}).",
        "",
        "## Load it",
        "",
    ]
    lines += _LOAD_LINES[fmt](info, WEIGHTS_FILE[fmt])
    return "\n".join(lines) + "\n"


_WHAT = {
    "torchvision": "a state dict that loads with strict=True",
    "torchscript": "a traced module: needs torch only",
    "detectron2": "the official MoCo converter's detectron2 pickle",
    "moco": "the official checkpoint layout of the method, for main_lincls.py",
    "deit": "moco-v3 convert_to_deit.py's layout, for DeiT fine-tuning",
}


def _plain_module_lines(info: ExportInfo) -> list[str]:
    if info.is_vit:
        return [
            "from timm.models.vision_transformer import VisionTransformer",
            "",
            f"net = VisionTransformer(**{dict(info.backbone['timm_kwargs'])!r})  # {INFO_FILE}: timm_kwargs",
        ]
    lines = ["import torchvision", "", f"net = torchvision.models.{info.arch}(weights=None)"]
    if info.small_stem:
        lines += [
            "net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the small stem (small_stem: true)",
            "net.maxpool = torch.nn.Identity()",
        ]
    return [*lines, "net.fc = torch.nn.Identity()"]


def _load_torchvision(info: ExportInfo, w: str) -> list[str]:
    return [
        f"Plain {'timm' if info.is_vit else 'torchvision'}:",
        "",
        "```python",
        "import torch",
        *_plain_module_lines(info),
        f'net.load_state_dict(torch.load("{w}", weights_only=True), strict=True)',
        "net.eval()",
        "```",
        "",
        "With moco-ray (reads this directory's encoder.json):",
        "",
        "```python",
        "from moco_ray import load_encoder",
        "",
        'net = load_encoder("path/to/this/directory")',
        "```",
    ]


def _load_torchscript(info: ExportInfo, w: str) -> list[str]:
    size = f" ({info.backbone['timm_kwargs']['img_size']} px images only, as the ViT)" if info.is_vit else ""
    return ["```python", "import torch", "", f'net = torch.jit.load("{w}").eval()  # needs torch only{size}', "```"]


def _load_detectron2(info: ExportInfo, w: str) -> list[str]:
    pm = [round(v * 255, 3) for v in info.mean]
    ps = [round(v * 255, 3) for v in info.std]
    return [
        "In a detectron2 config (ResNet, torchvision's input convention, this run's mean/std x 255):",
        "",
        "```yaml",
        f"MODEL:\n  WEIGHTS: {w}\n  PIXEL_MEAN: {pm}\n  PIXEL_STD: {ps}\n  RESNETS:\n    STRIDE_IN_1X1: False",
        "INPUT:\n  FORMAT: RGB",
        "```",
    ]


def _load_deit(info: ExportInfo, w: str) -> list[str]:
    return [
        "As moco-v3's README says for its convert_to_deit.py output: in the DeiT repo, `python main.py --resume "
        f"{w} ...` with `load_state_dict(checkpoint['model'], strict=False)` (the classifier `head` is new), "
        f"and a model built as {INFO_FILE}'s timm_kwargs say (moco-v3's vit_small has 12 heads, DeiT's 6).",
    ]


def _load_moco(info: ExportInfo, w: str) -> list[str]:
    repo = "facebookresearch/moco-v3" if info.method == "moco_v3" else "facebookresearch/moco"
    prefix = "module.base_encoder." if info.method == "moco_v3" else "module.encoder_q."
    lines = [
        f"The official linear classification, as for the official checkpoints ({repo}, keys `{prefix}*`):",
        "",
        "```bash",
        f"python main_lincls.py -a {info.arch} --pretrained {w} [ImageNet-style data dir]",
        "```",
    ]
    if info.small_stem:
        lines += ["", "The stem is moco-ray's small one (3x3 conv1, no max-pool): build it so in main_lincls.py."]
    if info.is_vit and info.method != "moco_v3":
        lines += ["", f"No official {repo} script builds a ViT; the keys are timm's under `{prefix}`."]
    return lines


_LOAD_LINES = {
    "torchvision": _load_torchvision,
    "torchscript": _load_torchscript,
    "detectron2": _load_detectron2,
    "moco": _load_moco,
    "deit": _load_deit,
}


def _write_dir(tmp: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        with open(tmp / name, "wb") as f:  # a plain open(): the file's mode follows the umask
            f.write(data)


def _install(tmp: Path, out: Path, run_id: str) -> None:
    """``tmp`` renamed onto ``out``: in one rename when ``out`` is missing or empty (rename(2) replaces an empty
    directory); an earlier export of the same run is first renamed aside, then removed."""
    try:
        os.rename(tmp, out)
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or export_dir_run(out) != run_id:
            raise
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    try:
        os.rename(out, old / out.name)
        os.rename(tmp, out)
    except OSError:
        if not out.exists():
            os.rename(old / out.name, out)  # the earlier export back where it was
        os.rmdir(old)  # empty again; were the move back to fail, the earlier export stays in it, not deleted
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_export_dir(
    backbone: nn.Module,
    info: ExportInfo,
    fmt: Literal["torchvision", "torchscript", "detectron2", "moco", "deit"],
    out: str | os.PathLike,
    image_size: int = 224,
) -> Path:
    """Write the export directory ``out`` of ``backbone`` (a plain module: torchvision ResNet or timm ViT, as
    ``encoder.json`` says to build it) in ``fmt``: ``WEIGHTS_FILE[fmt]``, ``encoder.json`` and ``README.md``.

    Everything is serialised in memory, written to a temp directory beside ``out`` and renamed onto it, so
    ``out`` is never half written: a failed write removes the temp directory and leaves ``out`` as it was.
    ``out`` may be missing, empty, or an earlier export of the same run (replaced); anything else is refused
    (:func:`check_export_dir`). ``image_size`` sets TorchScript's example input only.
    """
    _check_args(fmt, image_size)
    out = Path(out)
    run_id = str(info.source.get("run_id", ""))
    check_export_dir(out, run_id)
    if fmt == "deit" and not info.is_vit:
        raise ValueError(f"export format deit is for Vision Transformers; {info.arch} is not one")
    state = torchvision_state_dict(backbone)  # fc dropped; the caller's module was loaded strictly
    weights = _serialise(
        state,
        fmt,
        arch=info.arch,
        small_stem=info.small_stem,
        module=backbone,
        method=info.method,
        image_size=image_size,
        epoch=info.epochs,
    )
    files = {
        WEIGHTS_FILE[fmt]: weights,
        INFO_FILE: (json.dumps(info.to_json(fmt), indent=2) + "\n").encode(),
        NOTE_FILE: usage_note(info, fmt).encode(),
    }
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        os.chmod(tmp, 0o777 & ~_umask())  # a plain mkdir's mode, not mkdtemp's private 0700
        _write_dir(tmp, files)
        _install(tmp, out, run_id)
        tmp = None
    except OSError as e:
        raise write_error("export", out, e) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
