"""``train.precision`` on a worker: what each setting means per device, and fp16's GradScaler through the Worker's
own steps, its checkpoint (``Reporter.checkpoint_state``) and its restore (``Worker._load``), without Ray (one
process, CPU: the scaler and fp16 autocast exist there; the Worker is driven through its methods).

Mutations checked by hand (each failed here): ``Worker._train_steps`` without ``scaler=`` (the overflowing step
was not skipped and the scale stayed 2^40); ``checkpoint_state`` without ``scaler=`` and ``Worker._load`` without
``precision.load_state_dict``, and ``TrainState.from_dict`` dropping ``scaler`` (each time the resumed scaler
restarted at 65536, not at its backed-off 2^39).
"""

from __future__ import annotations

import types

import pytest
import torch
from moco_helpers import TINY_MODEL

from moco_ray.config import load_config
from moco_ray.train.checkpoint import load_state, rng_state, save_state
from moco_ray.train.hooks import FaultHooks
from moco_ray.train.loop import Worker
from moco_ray.train.model import build_method
from moco_ray.train.reporting import Reporter
from moco_ray.train.step import MixedPrecision, build_optimizer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.filterwarnings("ignore:.*CUDA is not available")  # a cuda scaler built on a machine without one
def test_mixed_precision_is_a_gpu_setting_and_only_fp16_carries_a_scaler():
    for precision in ("fp32", "bf16", "fp16"):
        assert MixedPrecision.of(precision, CPU) == MixedPrecision()  # CPU workers train fp32
    assert MixedPrecision.of("fp32", CUDA) == MixedPrecision()
    assert MixedPrecision.of("bf16", CUDA) == MixedPrecision(torch.bfloat16)
    fp16 = MixedPrecision.of("fp16", CUDA)
    assert fp16.autocast == torch.float16 and isinstance(fp16.scaler, torch.amp.GradScaler)
    assert MixedPrecision().state_dict() is None


def _worker(cfg, precision: MixedPrecision):
    torch.manual_seed(0)
    model = build_method(cfg)
    return types.SimpleNamespace(
        cfg=cfg, spec=types.SimpleNamespace(steps_per_epoch=1, hooks=FaultHooks(), run_id="r", config=cfg),
        device=CPU, progress=None, model=model, opt=build_optimizer(cfg, model), autocast=precision.autocast,
        precision=precision, views=lambda b: (b["q"], b["k"]), global_step=0, rank=0,
    )  # fmt: skip


def test_the_fp16_scalers_state_survives_a_checkpoint_and_a_restore(tmp_path):
    cfg = load_config(None, {**TINY_MODEL, "moco.queue_size": 32, "train.batch_size": 8, "moco.bn_splits": 2})
    fp16 = MixedPrecision(torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0**40))  # overflows fp16
    w = _worker(cfg, fp16)
    batch = {"q": torch.randn(8, 3, 16, 16), "k": torch.randn(8, 3, 16, 16)}
    Worker._train_steps(w, 0, iter([batch]))
    assert fp16.scaler.get_scale() == 2.0**39  # the loop stepped through the scaler: skipped, backed off
    assert w.opt.state_dict()["state"] == {}

    reporter = types.SimpleNamespace(spec=w.spec)
    state = Reporter.checkpoint_state(reporter, w.model, w.opt, 0, w.global_step, [], [rng_state()], w.precision)
    save_state(tmp_path, state)
    loaded = load_state(tmp_path)  # weights_only: the scaler's state is plain floats and ints
    assert loaded.scaler == fp16.state_dict()

    resumed = _worker(cfg, MixedPrecision(torch.float16, torch.amp.GradScaler("cpu")))  # a fresh one: 65536
    Worker._load(resumed, loaded)
    assert resumed.precision.state_dict() == fp16.state_dict()  # scale 2^39 and its growth tracker
    assert resumed.precision.scaler.get_scale() == 2.0**39

    cpu_worker = _worker(cfg, MixedPrecision())  # the same checkpoint on a CPU worker: fp32, scaler state ignored
    Worker._load(cpu_worker, loaded)
    assert cpu_worker.precision.scaler is None and cpu_worker.start_epoch == 1


def test_a_checkpoint_without_scaler_state_restores_an_fp16_worker_at_the_initial_scale(tmp_path):
    """fp32/bf16 checkpoints and those written before fp16 existed have no ``scaler`` key: fp16 starts afresh."""
    cfg = load_config(None, {**TINY_MODEL, "moco.queue_size": 32, "train.batch_size": 8, "moco.bn_splits": 2})
    old = _worker(cfg, MixedPrecision())
    reporter = types.SimpleNamespace(spec=old.spec)
    save_state(tmp_path, Reporter.checkpoint_state(reporter, old.model, old.opt, 2, 12, [], [rng_state()], None))
    assert "scaler" not in torch.load(tmp_path / "state.pt", weights_only=True)  # the old layout, unchanged
    fp16 = _worker(cfg, MixedPrecision(torch.float16, torch.amp.GradScaler("cpu")))
    Worker._load(fp16, load_state(tmp_path))
    assert fp16.precision.scaler.get_scale() == 65536.0 and fp16.start_epoch == 3
