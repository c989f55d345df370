"""MoCo v3 and SimCLR, checked against written-out computations (CPU, one process, no Ray)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_ray.config import load_config
from moco_ray.core import MoCoV3, QueryEncoder, SimCLR, ctr_loss, nt_xent
from moco_ray.core.backbone_io import backbone_of
from moco_ray.core.encoders import Encoder, build_mlp_head, torchvision_backbone
from moco_ray.core.method import ContrastiveMethod
from moco_ray.core.moco import MoCo
from moco_ray.core.moco_v3 import build_query_encoder
from moco_ray.core.queue import KeyQueue
from moco_ray.core.shuffle_bn import SplitBatchNorm
from moco_ray.core.step import train_step
from moco_ray.train.model import METHODS, build_method


def _unit(rows: torch.Tensor) -> list[list[float]]:
    out = []
    for r in rows.tolist():
        norm = math.sqrt(sum(x * x for x in r))
        out.append([x / norm for x in r])
    return out


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _ctr_by_hand(q: torch.Tensor, k: torch.Tensor, t: float) -> tuple[float, float]:
    """(loss, acc1) of MoCo v3's ctr: row i's positive is key i, negatives the other keys; loss x 2T."""
    qs, ks = _unit(q), _unit(k)
    loss, hits = 0.0, 0
    for i, qi in enumerate(qs):
        sims = [_dot(qi, kj) / t for kj in ks]
        loss += -math.log(math.exp(sims[i]) / sum(math.exp(s) for s in sims))
        hits += max(range(len(sims)), key=lambda j: sims[j]) == i
    return loss / len(qs) * 2 * t, hits / len(qs)


def _nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, t: float) -> tuple[float, float]:
    """(loss, acc1) of NT-Xent: 2N embeddings; row i's positive is its other view, all others but itself negative."""
    zs = _unit(z1) + _unit(z2)
    n2 = len(zs)
    loss, hits = 0.0, 0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        others = [j for j in range(n2) if j != i]
        sims = {j: _dot(zs[i], zs[j]) / t for j in others}
        loss += -math.log(math.exp(sims[pos]) / sum(math.exp(sims[j]) for j in others))
        hits += max(others, key=lambda j: sims[j]) == pos
    return loss / n2, hits / n2


def test_ctr_loss_matches_written_out_computation():
    g = torch.Generator().manual_seed(0)
    for t in (1.0, 0.2):
        q, k = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g)
        k[:3] = q[:3] + 0.3 * torch.randn(3, 5, generator=g)  # some rows have a clear positive: acc1 not 0
        loss, logits, labels = ctr_loss(q, k, t)
        expected, acc = _ctr_by_hand(q, k, t)
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        assert torch.equal(labels, torch.arange(6))
        assert (logits.argmax(1) == labels).float().mean().item() == pytest.approx(acc)


def test_nt_xent_matches_written_out_computation_and_is_symmetric():
    g = torch.Generator().manual_seed(1)
    for t in (0.5, 0.1):
        z1 = torch.randn(5, 4, generator=g) * 2
        z2 = torch.randn(5, 4, generator=g)
        z2[:2] = z1[:2] + 0.2 * torch.randn(2, 4, generator=g)
        loss, logits, labels = nt_xent(z1, z2, t)
        expected, acc = _nt_xent_by_hand(z1, z2, t)
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        assert (logits.argmax(1) == labels).float().mean().item() == pytest.approx(acc)
        assert torch.isinf(logits.diagonal()).all()  # self-similarity masked out
        swapped, _, _ = nt_xent(z2, z1, t)
        assert swapped.item() == pytest.approx(loss.item(), rel=1e-6)


def test_losses_are_fp32_under_bf16_autocast():
    q = torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l1, logits1, _ = ctr_loss(q, q, 0.2)
        l2, logits2, _ = nt_xent(q, q, 0.1)
    assert logits1.dtype == logits2.dtype == torch.float32
    assert torch.isfinite(l1) and torch.isfinite(l2)


def _toy_backbone() -> nn.Module:
    """A few-thousand-parameter conv net with BN: the method logic at a fraction of resnet18's CPU time."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def _tiny_v3(momentum: float = 0.9, temperature: float = 0.2, symmetric: bool = True) -> MoCoV3:
    torch.manual_seed(0)
    proj = build_mlp_head(8, 32, 16, num_layers=3, last_bn=True)
    pred = build_mlp_head(16, 24, 16, num_layers=2, last_bn=True)
    return MoCoV3(QueryEncoder(_toy_backbone(), proj, pred), momentum, temperature, symmetric)


def test_v3_heads_follow_the_official_resnet_code():
    # moco-v3 MoCo_ResNet: projector _build_mlp(2, 2048, mlp_dim, dim) (last BN affine-free), predictor
    # _build_mlp(2, dim, mlp_dim, dim, last_bn=False); no Linear bias
    torch.manual_seed(0)
    enc = build_query_encoder("resnet18", True, dim=16, hidden_dim=32, pred_hidden_dim=24)
    assert enc.head[0].in_features == 512
    proj = [type(m) for m in enc.head]
    pred = [type(m) for m in enc.predictor]
    lin, bn, relu = nn.Linear, nn.BatchNorm1d, nn.ReLU
    assert proj == [lin, bn, relu, lin, bn]
    assert pred == [lin, bn, relu, lin]
    assert not enc.head[-1].affine
    assert all(m.bias is None for m in [*enc.head, *enc.predictor] if isinstance(m, nn.Linear))
    assert enc.predictor[0].in_features == enc.predictor[-1].out_features == 16
    assert enc.predictor[0].out_features == 24


def test_v3_momentum_encoder_is_backbone_plus_projector_and_takes_no_gradient():
    model = _tiny_v3()
    assert isinstance(model.encoder_k, Encoder) and not hasattr(model.encoder_k, "predictor")
    q_params = list(model.encoder_q.backbone.parameters()) + list(model.encoder_q.head.parameters())
    for pq, pk in zip(q_params, model.encoder_k.parameters(), strict=True):
        assert torch.equal(pq, pk) and not pk.requires_grad
    assert model.queue is None and not any(isinstance(m, KeyQueue) for m in model.modules())  # no queue
    out = model(torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16))
    out["loss"].backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())  # predictor included
    assert all(p.grad.abs().sum() > 0 for p in model.encoder_q.predictor.parameters())


def test_v3_momentum_encoder_follows_ema_exactly_after_several_steps():
    """Mutation caught (checked by hand, failed): ``core.step.train_step`` without ``opt.step()``."""
    m = 0.8
    model = _tiny_v3(momentum=m)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5)
    expected = [p.detach().clone() for p in model.encoder_k.parameters()]
    for _ in range(3):
        q = model.encoder_q
        q_before = [p.detach().clone() for p in [*q.backbone.parameters(), *q.head.parameters()]]
        train_step(model, opt, torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16))
        expected = [m * e + (1 - m) * qb for e, qb in zip(expected, q_before, strict=True)]
    for e, pk in zip(expected, model.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(pk, e, rtol=1e-6, atol=1e-7)
    q_now = [*model.encoder_q.backbone.parameters(), *model.encoder_q.head.parameters()]
    # the optimizer moved the query encoder, so the key encoder lags it by more than the EMA's rounding (~1e-7)
    pairs = zip(model.encoder_k.parameters(), q_now, strict=True)
    assert any(not torch.allclose(pk, pq, atol=1e-5) for pk, pq in pairs)


@pytest.mark.parametrize("symmetric", [True, False])
def test_v3_forward_is_the_sum_of_both_directions(symmetric):
    model = _tiny_v3(temperature=0.3, symmetric=symmetric)
    ref = copy.deepcopy(model)
    a, b = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    out = model(a, b)
    ref.momentum_update()
    with torch.no_grad():
        l12, acc12 = _ctr_by_hand(ref.encoder_q(a), ref.encoder_k(b), 0.3)
        l21, acc21 = _ctr_by_hand(ref.encoder_q(b), ref.encoder_k(a), 0.3)
    if symmetric:
        assert out["loss"].item() == pytest.approx(l12 + l21, rel=1e-4)
        assert out["acc1"].item() == pytest.approx((acc12 + acc21) / 2)
    else:
        assert out["loss"].item() == pytest.approx(l12, rel=1e-4)
        assert out["acc1"].item() == pytest.approx(acc12)


def test_simclr_forward_matches_written_out_and_is_symmetric_in_the_views():
    torch.manual_seed(0)
    model = SimCLR(Encoder(_toy_backbone(), build_mlp_head(8, 32, 16)), temperature=0.5)
    a, b = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    out = model(a, b)
    with torch.no_grad():  # both views through BN together, as forward does
        z1, z2 = model.encoder_q(torch.cat([a, b])).chunk(2)
    expected, acc = _nt_xent_by_hand(z1, z2, 0.5)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
    assert out["acc1"].item() == pytest.approx(acc)
    # the same two views in the other order: the same samples in each BN batch, the same loss
    assert model(b, a)["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-5)
    assert model.queue is None and model.momentum is None and not hasattr(model, "encoder_k")
    assert not any(isinstance(m, KeyQueue) for m in model.modules())


TINY = ["model.small_stem=true", "train.batch_size=8", "model.dim=16", "model.hidden_dim=32"]


@pytest.mark.parametrize(
    "method,cls,temperature",
    [("moco_v3", MoCoV3, 1.0), ("simclr", SimCLR, 0.5), ("moco_v2", None, 0.2)],
)
def test_build_method_runs_forward_backward(method, cls, temperature):
    cfg = load_config(None, [f"moco.method={method}", *TINY, "model.pred_hidden_dim=24", "moco.queue_size=32"])
    torch.manual_seed(0)
    model = build_method(cfg)
    if cls is not None:
        assert isinstance(model, cls) and model.queue is None
        # plain BN: the negatives share the positive's batch, so there is nothing for split-BN to de-leak
        assert not any(isinstance(m, SplitBatchNorm) for m in model.modules())
    assert model.T == temperature  # the method preset reached the module
    out = model(torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"]) and 0.0 <= out["acc1"].item() <= 1.0
    out["loss"].backward()
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    backbone = backbone_of(model)
    assert backbone is model.query_module.backbone
    torchvision_backbone("resnet18", small_stem=True).load_state_dict(backbone.state_dict(), strict=True)


@pytest.mark.parametrize(
    "method,cls,has_momentum,has_queue",
    [("moco_v1", MoCo, True, True), ("moco_v2", MoCo, True, True), ("moco_v3", MoCoV3, True, False),
     ("simclr", SimCLR, False, False)],
)  # fmt: skip
def test_every_registered_method_keeps_the_contract(method, cls, has_momentum, has_queue):
    """What the loop relies on: the Protocol's members, a momentum / queue only where the method has one, and the
    one trainable module wrapped by the method itself (DDP's ``module`` unwrapped again by ``query_module``)."""
    assert set(METHODS) == {"moco_v1", "moco_v2", "moco_v3", "simclr"}
    cfg = load_config(None, [f"moco.method={method}", *TINY, "model.pred_hidden_dim=24", "moco.queue_size=32"])
    model = build_method(cfg)
    assert isinstance(model, cls) and isinstance(model, ContrastiveMethod)
    assert (model.momentum == cfg.moco.momentum) if has_momentum else model.momentum is None
    assert isinstance(model.queue, KeyQueue) if has_queue else model.queue is None
    encoder = model.encoder_q
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in encoder.parameters()}  # the only module that takes gradients

    class Wrapper(nn.Module):  # stands in for DDP: the wrapped module is its `module`
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.module(x)

    model.wrap_trainable(Wrapper)
    assert isinstance(model.encoder_q, Wrapper) and model.query_module is encoder
    out = model(torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16))
    assert set(out) == {"loss", "acc1"} and torch.isfinite(out["loss"])


def test_an_unknown_method_is_refused_with_the_known_names():
    cfg = load_config(None, TINY)
    cfg.moco.method = "byol"  # past the config's own check, as a caller could build it
    with pytest.raises(ValueError, match=r"^moco\.method: 'byol' is not one of moco_v1, moco_v2, moco_v3, simclr$"):
        build_method(cfg)


def test_build_method_v3_uses_pred_hidden_dim_and_rejects_linear_head():
    cfg = load_config(None, ["moco.method=moco_v3", *TINY, "model.pred_hidden_dim=24"])
    enc = build_method(cfg).encoder_q
    assert isinstance(enc, QueryEncoder) and enc.predictor[0].out_features == 24
    assert enc.head[0].out_features == 32 and enc.head[-2].out_features == 16
    with pytest.raises(ValueError, match=r"model\.head"):
        build_method(load_config(None, ["moco.method=moco_v3", *TINY, "model.head=linear"]))


def test_ctr_loss_gradient_does_not_reach_keys():
    q = torch.randn(4, 6, requires_grad=True)
    k = torch.randn(4, 6, requires_grad=True)
    ctr_loss(q, k, 0.5)[0].backward()
    assert q.grad is not None and k.grad is None  # keys are gathered without gradient
    z = torch.randn(4, 6, requires_grad=True)
    nt_xent(z, F.normalize(torch.randn(4, 6), dim=1), 0.5)[0].backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
