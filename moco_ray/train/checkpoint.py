"""The full training state (:class:`TrainState`) <-> a checkpoint directory, ``torch.load(weights_only=True)``.

Everything needed to continue exactly: query/key encoders, queue and pointer (inside the model's state dict),
optimizer, fp16's loss scaler, epoch and global step, the RNG states of torch, numpy and Python, the config and the
metric history.
On disk it is a plain dict of tensors and Python values; :meth:`TrainState.to_dict` / :meth:`TrainState.from_dict`
are the one place that knows its keys.
"""

from __future__ import annotations

import io
import pickle
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from moco_ray.data.manifest import join, resolve_fs
from moco_ray.tracking.history import EpochMetrics

STATE_FILE = "state.pt"


@dataclass
class TrainState:
    """One checkpoint. ``epoch``: the last finished epoch (0-based); ``rng``: every rank's :func:`rng_state`, in
    rank order; ``config``: ``Config.to_dict()`` of the run; ``model`` / ``optimizer``: their state dicts;
    ``scaler``: fp16's ``GradScaler`` state (its scale and growth tracker), None for fp32/bf16 and in older files."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    epoch: int
    global_step: int
    rng: list[dict[str, Any]]
    history: list[EpochMetrics]
    config: dict[str, Any]
    run_id: str
    scaler: dict[str, Any] | None = None

    def rng_of(self, rank: int) -> dict[str, Any]:
        """``rank``'s RNG states; rank 0's for a rank the saving run did not have (resumed on more workers)."""
        return self.rng[rank] if rank < len(self.rng) else self.rng[0]

    def to_dict(self) -> dict[str, Any]:
        """The on-disk layout (unchanged since the first checkpoints; history entries are plain dicts), plus
        ``scaler`` when the run has one (fp16): fp32/bf16 checkpoints keep the old keys exactly."""
        out: dict[str, Any] = {
            "model": self.model,
            "optimizer": self.optimizer,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "rng": self.rng,
            "history": [h.as_dict() for h in self.history],
            "config": self.config,
            "run_id": self.run_id,
        }
        if self.scaler is not None:
            out["scaler"] = self.scaler
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(
            model=d["model"],
            optimizer=d["optimizer"],
            epoch=int(d["epoch"]),
            global_step=int(d["global_step"]),
            rng=list(d["rng"]),
            history=[EpochMetrics.from_dict(h) for h in d["history"]],
            config=d["config"],
            run_id=d["run_id"],
            scaler=d.get("scaler"),  # absent before fp16 existed, and in fp32/bf16 checkpoints
        )


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain Python values (safe for weights_only loading)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this rank's own device only: with a shared CUDA_VISIBLE_DEVICES, "all" would tie the checkpoint to the
        # number of GPUs the run happened to see
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved, wherever the checkpoint was mapped: RNG states must be CPU
    ByteTensors (a checkpoint loaded with ``map_location="cuda"`` would put them on the GPU)."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    keys = n["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, list | tuple):  # older checkpoints saved every visible device: take this one's
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda.cpu())


def save_state(directory: str | Path, state: TrainState) -> Path:
    """Write ``state`` to ``directory/state.pt`` atomically (temp file, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(state.to_dict(), tmp)
    tmp.replace(directory / STATE_FILE)
    return directory / STATE_FILE


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a whole ``torch.save`` archive. A copy cut short (Ray copies a reported checkpoint into
    the run's storage file by file, so a Ctrl-C can land mid-copy) lacks the zip's central directory at the end."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class NotACheckpoint(ValueError):
    """A checkpoint whose state file moco-ray did not write or cannot read back (tampered with, damaged): one line
    naming it, nothing in it run. A ValueError, so the CLI prints it as ``moco-ray: error: ...`` (exit 2)."""

    def __init__(self, directory: str | Path, why: str) -> None:
        super().__init__(f"checkpoint {directory} is not a moco-ray checkpoint: {why}")


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> TrainState:
    """The state as saved, on the CPU by default: ``load_state_dict`` copies weights onto the model's device.

    ``directory`` is a local path or a URI (``s3://``, ``file://``: read through pyarrow, as Ray Train writes it).
    With another ``map_location`` everything but the RNG states moves there; those stay CPU ByteTensors whatever
    the location (``torch.set_rng_state`` accepts nothing else, and a ``meta`` tensor has no data to restore).
    A file that is not a whole moco-ray state (a pickle of other objects, a damaged archive, other keys) raises
    :class:`NotACheckpoint`; ``weights_only`` loading means nothing in it runs.
    """
    state = _read_state(directory)
    if torch.device(map_location).type != "cpu":
        state = {k: v if k == "rng" else _to_location(v, torch.device(map_location)) for k, v in state.items()}
    try:
        return TrainState.from_dict(state)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise NotACheckpoint(directory, f"its {STATE_FILE} lacks moco-ray's training state ({e!r})") from None


def _read_state(directory: str | Path) -> Any:
    """``torch.load(weights_only=True)`` of the directory's state file, errors as one line each."""
    try:
        with _open_state(str(directory)) as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text suggests weights_only=False: the one thing not to do here
        why = f"its {STATE_FILE} holds Python objects other than tensors and plain values (refused, nothing run)"
        raise NotACheckpoint(directory, why) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise NotACheckpoint(directory, f"its {STATE_FILE} cannot be read ({first})") from None


def _open_state(directory: str) -> BinaryIO:
    """The state file of a local directory or of a URI (Ray Train's storage on S3 and the like)."""
    if "://" not in directory:
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"not a moco-ray checkpoint (no {STATE_FILE}): {directory}")
        return path.open("rb")
    fs, path = resolve_fs(directory)
    try:
        with fs.open_input_file(join(path, STATE_FILE)) as f:
            return io.BytesIO(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"not a moco-ray checkpoint (no {STATE_FILE}): {directory}") from None


def _to_location(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_location(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_location(v, device) for v in obj)
    return obj
