"""GPU contract, host-device syncs: one training step never waits for the device.

A GPU run syncs when Python reads a device tensor's value (``.item()``, ``int()``, ``float()``, ``bool()``,
``.tolist()``, ``.numpy()``, ``.cpu()``), when an op has a data-dependent output size (``nonzero``, boolean
masks, ``unique``), and on a blocking host-to-device copy (``.to(cuda)`` without ``non_blocking``,
``torch.tensor(..., device=cuda)``). Two device-agnostic recorders catch these on the CPU:

- the step itself (augmented views in, ``train_step``, the Worker's per-step accumulation, the queue's enqueue,
  split BN and the in-batch key shuffle) runs on the CPU, where every tensor it touches would live on the GPU: any
  value read or data-dependent shape counts;
- the GPU augmentation and the Normalizer run on ``meta`` tensors (a device that is not the host): host reads of
  CPU tensors are allowed there (parameters are drawn on the CPU), copies to the device must be non-blocking.

fp16 is the one exception, and a counted one: its ``GradScaler`` decides whether to skip the optimizer step by
reading ``found_inf`` on the host (``torch.amp.GradScaler._maybe_opt_step``), one sync per step, as in moco-v3's
own loop; fp32 and bf16 have no scaler and stay at zero. Mutation checked by hand: a second host read added to the
fp16 path (``float(out["loss"])`` in the scaled branch of ``train_step``) failed the fp16 count.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from moco_helpers import TINY_MODEL
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from moco_ray.config import load_config
from moco_ray.core.normalize import Normalizer
from moco_ray.data.gpu_augment import GpuViewAugment
from moco_ray.train.model import build_method
from moco_ray.train.step import MixedPrecision, build_optimizer, train_step

READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}
DATA_DEPENDENT = {"aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive"}


def _dev(t) -> str:
    return t.device.type if isinstance(t, torch.Tensor) else "-"


class SyncRecorder(TorchFunctionMode):
    """Records Python-level reads of tensor values and device tensors made from host data."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in READS and args:
            self.events.append((name, _dev(args[0])))
        if name in ("tensor", "as_tensor") and torch.device(kwargs.get("device") or "cpu").type != "cpu":
            self.events.append((f"{name}(device=...)", "cpu->device"))
        return func(*args, **kwargs)


class OpRecorder(TorchDispatchMode):
    """Records, below autograd, scalar reads, data-dependent shapes and copies between devices."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        src = _dev(args[0]) if args else "-"
        if name == "aten._local_scalar_dense" or name in DATA_DEPENDENT:
            self.events.append((name, src))
        elif name in ("aten._to_copy", "aten.copy_"):
            dst = torch.device(kwargs["device"]).type if kwargs.get("device") else src
            if name == "aten.copy_":
                src, dst = _dev(args[1]), src
            if src != dst:
                blocking = "" if kwargs.get("non_blocking") or (len(args) > 2 and args[2]) else " blocking"
                self.events.append((f"{name}{blocking}", f"{src}->{dst}"))
        return func(*args, **kwargs)


def _record(fn) -> list[tuple[str, str]]:
    with SyncRecorder() as f, OpRecorder() as d:
        fn()
    return f.events + d.events


def _step_setup(channels_last: bool):
    cfg = load_config(None, {**TINY_MODEL, "moco.queue_size": 32, "train.batch_size": 16})
    torch.manual_seed(0)
    model = build_method(cfg).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    assert model.bn_mode == "split"
    opt = build_optimizer(cfg, model)
    norm = Normalizer(channels_last=channels_last)
    views = [torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8) for _ in range(2)]
    return model, opt, norm, views


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_training_step_reads_no_tensor_value(channels_last):
    """``train_step`` + accumulation as ``Worker.run_epoch`` does it, plus the queue, split BN, Normalizer."""
    model, opt, norm, (q, k) = _step_setup(channels_last)
    sums = torch.zeros(3, dtype=torch.float64)
    corrupt = torch.zeros(16, dtype=torch.bool)

    def step():
        out = train_step(model, opt, norm(q), norm(k))
        sums[0] += out["loss"]
        sums[1] += out["acc1"]
        sums[2] += corrupt.sum()

    step()  # the first step allocates optimizer state
    ptr = model.queue.ptr.clone()
    assert _record(step) == []
    assert int(model.queue.ptr) == (int(ptr) + 16) % 32  # the enqueue ran inside the recorded step


# what one fp16 step may read on the host: the scaler's found_inf, once (Python's .item(), then ATen's scalar read)
FP16_SCALER_SYNC = [("item", "cpu"), ("aten._local_scalar_dense", "cpu")]


def test_an_fp16_step_reads_only_the_scalers_found_inf():
    """The fp16 path of the same step (autocast + GradScaler, as ``MixedPrecision.of("fp16", cuda)`` builds it, on
    the CPU here): one host read per step, the scaler's, and the scaler still stepping (its scale unchanged after
    a clean step, the optimizer's state made)."""
    model, opt, norm, (q, k) = _step_setup(channels_last=False)
    precision = MixedPrecision(torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0**8))
    sums = torch.zeros(3, dtype=torch.float64)

    def step():
        out = train_step(model, opt, norm(q), norm(k), autocast=precision.autocast, scaler=precision.scaler)
        sums[0] += out["loss"]
        sums[1] += out["acc1"]

    step()  # the first step allocates optimizer state and the scaler's scale tensor
    assert _record(step) == FP16_SCALER_SYNC
    assert opt.state_dict()["state"] and precision.scaler.get_scale() == 2.0**8


def test_the_recorders_see_what_would_sync():
    """Negative controls: the reads the old code did are recorded."""
    ptr = torch.zeros((), dtype=torch.long)
    events = _record(lambda: (int(ptr), torch.ones(2).tolist(), torch.ones(3).to("meta")))
    assert ("__int__", "cpu") in events and ("tolist", "cpu") in events
    assert ("aten._local_scalar_dense", "cpu") in events
    assert ("aten._to_copy blocking", "cpu->meta") in events
    assert ("tensor(device=...)", "cpu->device") in _record(lambda: torch.tensor([1.0], device="meta"))


def test_gpu_augmentation_and_normalisation_never_block_on_the_device():
    aug, norm = GpuViewAugment("v2", 16), Normalizer(device="meta")
    imgs = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8).to("meta")

    def views():
        q, k = aug.pair(imgs)
        norm(q), norm(k)

    events = _record(views)
    on_device = [e for e in events if e[1] not in ("cpu", "cpu->meta") or "blocking" in e[0]]
    assert on_device == [], on_device
    assert any(e == ("aten._to_copy", "cpu->meta") for e in events)  # the CPU-drawn parameters, non-blocking


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision,syncs", [("bf16", 0), ("fp16", 1)])
def test_on_cuda_a_step_with_gpu_views_never_syncs(precision, syncs):
    """The real check on a GPU: torch's sync debug mode warns on every synchronising call in the step; bf16 makes
    none, fp16 exactly its GradScaler's one (``found_inf``)."""
    model, opt, _, _ = _step_setup(channels_last=True)
    dev = torch.device("cuda")
    model = model.to(dev)
    opt = build_optimizer(load_config(None, {**TINY_MODEL, "moco.queue_size": 32, "train.batch_size": 16}), model)
    mp = MixedPrecision.of(precision, dev)
    aug, norm = GpuViewAugment("v2", 16), Normalizer(device=dev, channels_last=True)
    imgs = torch.randint(0, 256, (16, 3, 20, 20), dtype=torch.uint8).pin_memory()
    sums = torch.zeros(3, dtype=torch.float64, device=dev)

    def step():
        q, k = aug.pair(imgs.to(dev, non_blocking=True))
        out = train_step(model, opt, norm(q), norm(k), autocast=mp.autocast, scaler=mp.scaler)
        sums[0] += out["loss"]
        sums[1] += out["acc1"]

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    synced = [w for w in seen if "synchronizing" in str(w.message)]
    assert len(synced) == syncs, [str(w.message) for w in synced]
    assert torch.isfinite(sums).all()
