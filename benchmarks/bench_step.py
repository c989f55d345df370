"""MoCo training-step ceiling with the batch already on the device: ours vs a reference-style step, in one run.

Variants, timed on the same random inputs (warm-up steps, then timed steps between device synchronisations):

- ``reference-fp32``: written here after the official ``moco/builder.py`` + ``main_moco.py``: two torchvision
  ResNets, a Python loop over parameters for the momentum update, queue ``[dim, K]`` enqueued by slice (``assert K
  % batch == 0``), einsum logits, ``nn.CrossEntropyLoss``, fp32, default memory format;
- ``ours-fp32``: ``build_method(cfg)`` and the step of ``moco_ray.train.loop`` (fused EMA, ring-buffer queue), fp32;
- ``ours-bf16-cl``: the same with bf16 autocast and channels_last (the training loop's GPU defaults);
- ``ours-bf16-cl-compile``: plus ``torch.compile(model.encoder_q)`` (``train.compile=true``).

Both sides use the BatchNorm handling a one-worker run uses (``--bn split``: SplitBatchNorm over 8 groups and an
in-batch shuffle of the keys, as the official CIFAR demo; ``--bn none``: plain BN), so the ratio isolates the
step's implementation and precision. Cases: ``r50-224`` (ResNet-50, 224 px, batch 256, K 65536, MLP head) and
``r18-32`` (ResNet-18 small stem, 32 px, batch 512, K 4096); ``--tiny`` swaps in a small ResNet-18 case for smoke
runs on CPU. cuDNN autotuning is on for every variant on a GPU, as in our training loop and the official
main_moco.py (``--cudnn-benchmark off`` turns it off for all). Peak GPU memory is per variant. The JSON is
rewritten after every variant, and a variant that fails (a compile error, out of memory) is recorded with its
error while the others still run, so a failure loses nothing measured before it.

Usage: python benchmarks/bench_step.py [--cases r50-224,r18-32] [--variants ...] [--warmup 10] [--iters 30]
       [--device cuda] [--bn split] [--out step.json];  python benchmarks/bench_step.py --device cpu --tiny
Prints a table per case and a line to paste into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from common import fmt_rate, machine, results_line, write_json

from moco_ray.config import Config, load_config
from moco_ray.core.shuffle_bn import split_bn_factory
from moco_ray.data.augment import normalize_on_device, source_size
from moco_ray.data.gpu_augment import GpuViewAugment
from moco_ray.train.model import build_method
from moco_ray.train.step import build_optimizer, train_step

VARIANTS = ("reference-fp32", "ours-fp32", "ours-bf16-cl", "ours-bf16-cl-compile")


@dataclass(frozen=True)
class Case:
    arch: str
    small_stem: bool
    image_size: int
    batch: int
    queue: int
    hidden_dim: int = 0  # 0 = backbone width (MoCo v2)
    dim: int = 128
    momentum: float = 0.999
    temperature: float = 0.2


CASES = {
    "r50-224": Case("resnet50", False, 224, 256, 65536),
    "r18-32": Case("resnet18", True, 32, 512, 4096, hidden_dim=512, momentum=0.99, temperature=0.1),
    "tiny": Case("resnet18", True, 16, 8, 32, hidden_dim=32, dim=16, momentum=0.99, temperature=0.1),
}


def case_config(case: Case, bn: str = "split") -> Config:
    """The one-worker MoCo v2 Config of a case (the same config the step of `moco_ray.train.loop` would get)."""
    return load_config(
        {
            "moco": {
                "method": "moco_v2",
                "queue_size": case.queue,
                "momentum": case.momentum,
                "temperature": case.temperature,
                "shuffle_bn": bn,
            },
            "model": {
                "arch": case.arch,
                "small_stem": case.small_stem,
                "head": "mlp",
                "dim": case.dim,
                "hidden_dim": case.hidden_dim,
            },
            "aug": {"image_size": case.image_size},
            "train": {"batch_size": case.batch, "num_workers": 1},
        }
    )


# --- the reference: official-code style, kept deliberately plain ---------------------------------------------


class ReferenceMoCo(nn.Module):
    """MoCo v2 as in facebookresearch/moco ``builder.py`` (one process: no all-gather; shuffle-BN -> in-batch)."""

    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int, K: int, m: float, T: float, split_bn: bool):
        super().__init__()
        self.K, self.m, self.T, self.split_bn = K, m, T, split_bn
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0  # for simplicity
        self.queue[:, ptr : ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            if self.split_bn:  # the CIFAR demo's shuffle within the batch (SplitBatchNorm stands in for GPUs)
                idx = torch.randperm(im_k.shape[0], device=im_k.device)
                k = F.normalize(self.encoder_k(im_k[idx]), dim=1)[torch.argsort(idx)]
            else:
                k = F.normalize(self.encoder_k(im_k), dim=1)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels


def _reference_encoder(arch: str, small_stem: bool, hidden_dim: int, norm_layer: Any, num_classes: int) -> nn.Module:
    kw = {"norm_layer": norm_layer} if norm_layer is not None else {}
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, **kw)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim_mlp = net.fc.weight.shape[1]
    net.fc = nn.Sequential(
        nn.Linear(dim_mlp, hidden_dim or dim_mlp), nn.ReLU(), nn.Linear(hidden_dim or dim_mlp, num_classes)
    )
    return net


def build_reference(cfg: Config) -> ReferenceMoCo:
    m, mo = cfg.model, cfg.moco
    split = cfg.bn_mode == "split" and mo.bn_splits > 1
    norm = split_bn_factory(mo.bn_splits) if split else None
    base = partial(_reference_encoder, m.arch, m.small_stem, m.hidden_dim, norm)
    return ReferenceMoCo(base, m.dim, mo.queue_size, mo.momentum, mo.temperature, split)


# --- timing ------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_steps(step: Callable[[], None], device: torch.device, batch: int, warmup: int, iters: int) -> dict[str, float]:
    """img/s over `iters` steps after `warmup` (the first step's seconds are kept: compile time shows there)."""
    if warmup < 1 or iters < 1:
        raise ValueError(f"warmup and iters must be >= 1, got {warmup} and {iters}")
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    dt = time.perf_counter() - t0
    out = {"img_per_s": iters * batch / dt, "ms_per_step": 1000 * dt / iters, "first_step_s": first}
    out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return out


def _inputs(cfg: Config, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float32 views, as `normalize_on_device` hands them to the model."""
    g = torch.Generator().manual_seed(0)
    shape = (cfg.train.batch_size, 3, cfg.aug.image_size, cfg.aug.image_size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return tuple(torch.randn(shape, generator=g).to(device).contiguous(memory_format=fmt) for _ in range(2))


def _timed(make_step: Callable[[], Callable[[], None]], device: torch.device, batch: int, warmup: int, iters: int):
    """Build a step on a clean device (seeded), time it, and free what it held before returning."""
    _free(device)
    torch.manual_seed(0)
    step = make_step()
    result = time_steps(step, device, batch, warmup, iters)
    del step  # the closure holds the model, optimizer and inputs
    _free(device)
    return result


def measure_reference(cfg: Config, device: torch.device, warmup: int = 10, iters: int = 30) -> dict[str, float]:
    """The reference-style fp32 step (see the module docstring) for `cfg`'s model, queue and batch."""
    return _timed(partial(_reference_step, cfg, device), device, cfg.train.batch_size, warmup, iters)


def _reference_step(cfg: Config, device: torch.device) -> Callable[[], None]:
    model = build_reference(cfg).to(device)
    opt = torch.optim.SGD(
        model.encoder_q.parameters(), cfg.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
    )
    criterion = nn.CrossEntropyLoss().to(device)
    im_q, im_k = _inputs(cfg, device, channels_last=False)

    def step() -> None:
        output, target = model(im_q, im_k)
        loss = criterion(output, target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def measure_config(
    cfg: Config,
    device: torch.device,
    warmup: int = 10,
    iters: int = 30,
    *,
    precision: str | None = None,
    channels_last: bool | None = None,
    compile: bool | None = None,
    gpu_aug: bool = False,
) -> dict[str, float]:
    """Our step for `cfg`, as `moco_ray.train.loop` runs it, on device-resident inputs.

    precision / channels_last / compile default to ``cfg.train``'s values; bf16 and channels_last apply on CUDA
    only unless given explicitly (the loop's rule). With ``gpu_aug`` (and ``aug.device=gpu``) each step also draws
    both views on the device from a uint8 source batch and normalises them, as the loop does on that path.
    """
    t, cuda = cfg.train, device.type == "cuda"
    bf16 = (precision or t.precision) == "bf16" and (cuda or precision is not None)
    cl = channels_last if channels_last is not None else (t.channels_last and cuda)
    comp = compile if compile is not None else t.compile
    make = partial(_ours_step, cfg, device, bf16, cl, comp, gpu_aug and cfg.aug.device == "gpu")
    return _timed(make, device, t.batch_size, warmup, iters)


def _ours_step(
    cfg: Config, device: torch.device, bf16: bool, channels_last: bool, compile: bool, gpu_aug: bool
) -> Callable[[], None]:
    model = build_method(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg, model)
    if compile:  # as the loop: the encoder's graph; the queue and EMA bookkeeping stay eager
        model.wrap_trainable(torch.compile)
    dtype = torch.bfloat16 if bf16 else None
    draw = _gpu_views(cfg, device, channels_last) if gpu_aug else None
    im_q, im_k = _inputs(cfg, device, channels_last)

    def step() -> None:
        q, k = draw() if draw is not None else (im_q, im_k)
        train_step(model, opt, q, k, autocast=dtype)

    return step


def _gpu_views(cfg: Config, device: torch.device, channels_last: bool) -> Callable[[], tuple[torch.Tensor, ...]]:
    aug = GpuViewAugment.from_config(cfg.aug)
    p = source_size(cfg.aug.image_size)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (cfg.train.batch_size, 3, p, p), generator=g, dtype=torch.uint8).to(device)

    def draw() -> tuple[torch.Tensor, ...]:
        q, k = aug.pair(src)
        return tuple(normalize_on_device(v, device, channels_last=channels_last) for v in (q, k))

    return draw


def run_variant(cfg: Config, variant: str, device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    if variant == "reference-fp32":
        return measure_reference(cfg, device, warmup, iters)
    settings = {
        "ours-fp32": ("fp32", False, False),
        "ours-bf16-cl": ("bf16", True, False),
        "ours-bf16-cl-compile": ("bf16", True, True),
    }
    if variant not in settings:
        raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    prec, cl, comp = settings[variant]
    return measure_config(cfg, device, warmup, iters, precision=prec, channels_last=cl, compile=comp)


def cudnn_like_loop(device: torch.device, on: bool = True) -> bool:
    """cuDNN autotuning as ``moco_ray.train.loop.Worker`` sets it (on, on a GPU): ceilings and runs alike."""
    torch.backends.cudnn.benchmark = on and device.type == "cuda"
    return torch.backends.cudnn.benchmark


def bench_case(
    name: str,
    cfg: Config,
    device: torch.device,
    variants: list[str],
    warmup: int,
    iters: int,
    save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every variant of one case (a table row printed as each finishes), and its img/s relative to the reference.

    ``save`` gets the case's results so far after every variant; a failing variant is recorded as its error.
    """
    m, t = cfg.model, cfg.train
    print(
        f"\n{name}: {m.arch}{' small stem' if m.small_stem else ''}, {cfg.aug.image_size} px, batch {t.batch_size}, "
        f"K {cfg.moco.queue_size}, bn {cfg.bn_mode}, on {device}",
        flush=True,
    )
    print(f"{'variant':<24}{'img/s':>10}{'ms/step':>10}{'1st step s':>12}{'peak GiB':>10}{'x ref':>8}", flush=True)
    results: dict[str, dict[str, float]] = {}
    ratios: dict[str, float] = {}
    out = {"case": name, "bn_mode": cfg.bn_mode, "variants": results, "ratio_to_reference": ratios}
    for v in variants:
        try:
            r = results[v] = run_variant(cfg, v, device, warmup, iters)
        except Exception as e:  # noqa: BLE001 - one variant's failure must not lose the others' figures
            results[v] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"{v:<24}failed: {results[v]['error']}", flush=True)
            if save is not None:
                save(out)
            continue
        ref = results.get("reference-fp32", {}).get("img_per_s")
        if ref and v != "reference-fp32":
            ratios[v] = r["img_per_s"] / ref
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        ratio = f"{ratios[v]:.2f}" if v in ratios else "-"
        rate = fmt_rate(r["img_per_s"])
        print(f"{v:<24}{rate:>10}{r['ms_per_step']:>10.1f}{r['first_step_s']:>12.1f}{peak:>10}{ratio:>8}", flush=True)
        if save is not None:
            save(out)
    return out


def figures(results: dict[str, Any]) -> str:
    """The RESULTS.md figures column: img/s per variant and the ratio to the reference, per case."""
    parts = []
    for name, res in results["cases"].items():
        cells = []
        for v, r in res["variants"].items():
            if "error" in r:
                cells.append(f"{v} failed")
                continue
            ratio = res["ratio_to_reference"].get(v)
            cells.append(f"{v} {fmt_rate(r['img_per_s'])} img/s" + (f" (x{ratio:.2f})" if ratio else ""))
        parts.append(f"{name} step ceiling: " + ", ".join(cells))
    return "; ".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="r50-224,r18-32", help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--variants", default="", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bn", default="split", choices=["split", "none"], help="BatchNorm handling on both sides")
    ap.add_argument(
        "--cudnn-benchmark", default="on", choices=["on", "off"], help="cuDNN autotuning, all variants (loop: on)"
    )
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--tiny", action="store_true", help="the tiny case only, 1 warm-up + 2 timed steps (smoke)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here; use --device cpu")
    names = ["tiny"] if a.tiny else [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"--cases: unknown {', '.join(unknown)}; known: {', '.join(CASES)}")
    # bf16 autocast on a CPU without bf16 units is emulated and very slow: only the fp32 variants by default there
    default_variants = list(VARIANTS) if device.type == "cuda" else ["reference-fp32", "ours-fp32"]
    variants = [v.strip() for v in a.variants.split(",") if v.strip()] or default_variants
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"--variants: unknown {', '.join(bad)}; known: {', '.join(VARIANTS)}")
    warmup, iters = (1, 2) if a.tiny else (a.warmup, a.iters)
    # One setting for the reference and ours: the training loop's (on, on a GPU), unless asked otherwise
    cudnn_like_loop(device, a.cudnn_benchmark == "on")

    results: dict[str, Any] = {
        "machine": machine(),
        "device": str(device),
        "torch": torch.__version__,
        "warmup": warmup,
        "iters": iters,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cases": {},
    }
    for name in names:
        case = CASES[name]

        def save(res: dict[str, Any], case=case, name=name) -> None:  # after every variant: nothing is lost
            results["cases"][name] = {**res, "case_settings": asdict(case)}
            write_json(a.out, results)

        bench_case(name, case_config(case, a.bn), device, variants, warmup, iters, save)
    cmd = "python benchmarks/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results["results_line"] = results_line(cmd, figures(results))
    print(f"\nRESULTS.md: {results['results_line']}")
    write_json(a.out, results)
    return results


def failed_variants(results: dict[str, Any]) -> list[str]:
    return [f"{c}/{v}" for c, res in results["cases"].items() for v, r in res["variants"].items() if "error" in r]


if __name__ == "__main__":
    failed = failed_variants(main())
    if failed:
        sys.exit(f"bench_step: failed variants (errors in the JSON): {', '.join(failed)}")
