"""Export formats for a pretrained backbone: torchvision state dict, TorchScript, detectron2 pickle, and the
official MoCo checkpoint layout (``module.encoder_q.*``, what ``main_lincls.py`` and downstream tools read).

The torchvision state dict is the reference format: its keys are exactly those of ``torchvision.models.<arch>()``
minus ``fc.*``, so it loads with ``strict=True`` into a plain torchvision model (``fc = Identity``, plus the small
stem when the encoder was trained with one). Training-time modules do not leak into it: ``SplitBatchNorm`` is a
``BatchNorm2d`` subclass with the same parameters and buffers, so its keys and tensors are those of BatchNorm2d.

A file is serialised in memory, then written next to its target and renamed onto it: a failed write (a full disk,
a read-only mount, a regular file in the way) leaves no temp file, the old file as it was, and is one ValueError
naming the path and the errno (torch's own zip writer reports a full disk as a RuntimeError without one).
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from moco_ray.core.backbone_io import load_torchvision_backbone_from_state, torchvision_state_dict
from moco_ray.core.official_io import to_official
from moco_ray.data.writable import check_writable_dir, write_error

FORMATS = ("torchvision", "torchscript", "detectron2", "moco")


def to_torchscript(backbone: nn.Module, example_input: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace a copy of ``backbone`` in eval mode (the source module is left untouched).

    Tracing rather than scripting: a ResNet has no data-dependent control flow in eval mode, and tracing works
    for training-time subclasses (SplitBatchNorm) that TorchScript's compiler may not accept. The traced graph
    keeps the batch size and image size free (adaptive average pooling). torch.jit is deprecated in recent
    torch but still loads anywhere libtorch runs; its FutureWarnings are silenced here.
    """
    model = copy.deepcopy(backbone).eval()
    param = next(model.parameters(), None)
    x = example_input.to(param.device if param is not None else "cpu")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
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


def _serialise(state: dict, arch: str, small_stem: bool, fmt: str, image_size: int, epoch: int) -> bytes:
    """The export file's bytes (in memory, so a failed write is a plain OSError with its errno)."""
    buf = io.BytesIO()
    if fmt == "torchvision":
        torch.save(state, buf)
    elif fmt == "moco":
        torch.save(to_official(state, arch, epoch), buf)
    elif fmt == "torchscript":
        plain = load_torchvision_backbone_from_state(state, arch, small_stem)
        traced = to_torchscript(plain, torch.zeros(1, 3, image_size, image_size))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(traced, buf)
    else:
        pickle.dump(to_detectron2(state), buf)
    return buf.getvalue()


def save_export(
    backbone: nn.Module,
    arch: str,
    small_stem: bool,
    fmt: Literal["torchvision", "torchscript", "detectron2", "moco"],
    out_path: str | os.PathLike,
    image_size: int = 224,
    epoch: int = 0,
) -> Path:
    """Write ``backbone`` to ``out_path`` in ``fmt`` (atomically) and return the path.

    Every format goes through the checked torchvision state dict; TorchScript traces the plain torchvision
    module rebuilt from it (``image_size`` only sets the example input), so no training-time class ends up in the
    file. ``moco``: ``{"state_dict": {"module.encoder_q.<key>": t}, "arch", "epoch"}`` without fc (the official
    scripts add their own). Conventional suffixes: ``.pt`` / ``.pth`` (torchvision), ``.pt`` (torchscript),
    ``.pkl`` (detectron2), ``.pth.tar`` (moco).
    """
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    if image_size < 8:
        raise ValueError(f"export image_size {image_size} is too small; need >= 8")
    out = Path(out_path)
    check_export_target(out)
    state = torchvision_state_dict(backbone, arch, small_stem)
    _write_atomic(out, _serialise(state, arch, small_stem, fmt, image_size, epoch))
    return out
