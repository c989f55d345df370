"""The MoCo core, checked against straightforward re-computations (CPU, no Ray)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_ray.core import KeyQueue, MoCo, info_nce, momentum_update
from moco_ray.core.encoders import build_backbone, build_encoder, torchvision_backbone
from moco_ray.core.shuffle_bn import SplitBatchNorm
from moco_ray.core.step import train_step


def test_info_nce_matches_written_out_computation():
    g = torch.Generator().manual_seed(0)
    n, d, k, t = 6, 8, 11, 0.07
    q = F.normalize(torch.randn(n, d, generator=g), dim=1)
    key = F.normalize(torch.randn(n, d, generator=g), dim=1)
    queue = F.normalize(torch.randn(k, d, generator=g), dim=1)
    loss, logits = info_nce(q, key, queue, t)
    expected = 0.0
    for i in range(n):
        pos = math.exp(float(q[i] @ key[i]) / t)
        negs = sum(math.exp(float(q[i] @ queue[j]) / t) for j in range(k))
        expected += -math.log(pos / (pos + negs))
    assert loss.item() == pytest.approx(expected / n, rel=1e-5)
    assert logits.shape == (n, k + 1)
    assert logits.dtype == torch.float32


def test_info_nce_fp32_under_bf16_inputs():
    q = F.normalize(torch.randn(4, 8), dim=1).bfloat16()
    loss, logits = info_nce(q, q, F.normalize(torch.randn(16, 8), dim=1), 0.07)
    assert logits.dtype == torch.float32 and torch.isfinite(loss)


def _tiny_moco(**kw) -> MoCo:
    torch.manual_seed(0)
    enc = build_encoder("resnet18", True, "mlp", 16, 32)
    return MoCo(enc, dim=16, **kw)


def test_key_encoder_starts_as_copy_and_takes_no_gradient():
    model = _tiny_moco(queue_size=32, momentum=0.9, temperature=0.2)
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters(), strict=True):
        assert torch.equal(pq, pk) and not pk.requires_grad
    out = model(torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16))
    out["loss"].backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert model.queue.keys.grad is None


def test_key_encoder_follows_ema_exactly_after_several_steps():
    """Mutation caught (checked by hand, failed): ``core.step.train_step`` without ``opt.step()``."""
    m = 0.9
    model = _tiny_moco(queue_size=32, momentum=m, temperature=0.2)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5)
    expected = [p.detach().clone() for p in model.encoder_k.parameters()]
    for _ in range(4):
        q_before = [p.detach().clone() for p in model.encoder_q.parameters()]
        train_step(model, opt, torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16))
        # the step's forward applied theta_k <- m theta_k + (1 - m) theta_q with the query weights of before it
        expected = [m * e + (1 - m) * q for e, q in zip(expected, q_before, strict=True)]
    for e, pk in zip(expected, model.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(pk, e, rtol=1e-6, atol=1e-7)
    # the optimizer moved the query encoder, so the key encoder lags it by more than the EMA's rounding (~1e-7)
    pairs = zip(model.encoder_k.parameters(), model.encoder_q.parameters(), strict=True)
    assert any(not torch.allclose(pk, pq, atol=1e-5) for pk, pq in pairs)


def test_momentum_update_is_plain_formula_and_leaves_buffers():
    a, b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        a.weight.fill_(1.0), b.weight.fill_(3.0)
        b.running_mean.fill_(5.0)
    momentum_update(a, b, 0.75)
    assert torch.allclose(a.weight, torch.full((3,), 1.5))
    assert torch.equal(a.running_mean, torch.zeros(3))  # buffers are not averaged


def test_queue_fifo_wraparound_and_unit_norm():
    q = KeyQueue(10, 4)
    assert torch.allclose(q.keys.norm(dim=1), torch.ones(10))
    batches = [torch.randn(4, 4) * 7 for _ in range(4)]  # 4 does not divide 10
    written = []
    for b in batches:
        q.enqueue(b)
        written.append(F.normalize(b, dim=1))
    allk = torch.cat(written)  # 16 keys enqueued; slot i holds the latest key with index = i mod 10
    assert int(q.ptr) == 16 % 10
    for slot in range(10):
        latest = max(j for j in range(16) if j % 10 == slot)
        torch.testing.assert_close(q.keys[slot], allk[latest])
    assert torch.allclose(q.keys.norm(dim=1), torch.ones(10))


def test_queue_batch_larger_than_queue_keeps_newest():
    q = KeyQueue(5, 3)
    q.enqueue(torch.randn(2, 3))
    big = torch.randn(12, 3)
    q.enqueue(big)
    # as if enqueued one by one: pointer at (2 + 12) % 5 = 4; slots hold the last 5 keys
    assert int(q.ptr) == 4
    norm = F.normalize(big, dim=1)
    for j in range(7, 12):
        torch.testing.assert_close(q.keys[(2 + j) % 5], norm[j])


def test_queue_state_roundtrip_bit_exact():
    q = KeyQueue(7, 3)
    q.enqueue(torch.randn(5, 3))
    r = KeyQueue(7, 3)
    r.load_state_dict(q.state_dict())
    assert torch.equal(r.keys, q.keys) and int(r.ptr) == int(q.ptr)


def test_split_batchnorm_equals_bn_per_group_and_loads_into_torchvision():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5)
    sbn, bn = SplitBatchNorm(4, num_splits=2), nn.BatchNorm2d(4)
    out = sbn(x)
    # groups are interleaved: sample i belongs to group i % 2
    for g in range(2):
        ref = nn.BatchNorm2d(4)(x[g::2])
        torch.testing.assert_close(out[g::2], ref)
    bn.load_state_dict(sbn.state_dict())  # same keys as BatchNorm2d
    net, _ = build_backbone("resnet18", small_stem=True, norm_layer=lambda c: SplitBatchNorm(c, 2))
    torchvision_backbone("resnet18", small_stem=True).load_state_dict(net.state_dict(), strict=True)


@pytest.mark.parametrize("arch,feat", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_backbones_by_name(arch, feat):
    net, dim = build_backbone(arch, small_stem=True)
    assert dim == feat
    net.eval()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, feat)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="model.arch"):
        build_backbone("vgg_nope")


def test_single_process_shuffle_restores_key_order():
    """With split BN the keys are encoded shuffled and must come back in input order."""
    model = _tiny_moco(queue_size=32, bn_mode="split")
    model.encoder_k.eval()  # eval BN: each key depends only on its own image, so order is checkable
    x = torch.randn(8, 3, 16, 16)
    ref = F.normalize(model.encoder_k(x), dim=1)
    torch.testing.assert_close(model.encode_keys(x), ref)


def test_symmetric_loss_sums_both_directions():
    model = _tiny_moco(queue_size=64, symmetric=True)
    ref = copy.deepcopy(model)
    a, b = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    out = model(a, b)
    ref.momentum_update()
    l12, _, k2 = ref._contrast(a, b)
    l21, _, k1 = ref._contrast(b, a)
    torch.testing.assert_close(out["loss"], l12 + l21)
    assert int(model.queue.ptr) == 16
