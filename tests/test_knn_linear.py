"""kNN monitor, feature extraction + cache, and linear probe (pure PyTorch, tiny tensors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moco_ray.core.encoders import build_backbone
from moco_ray.evaluation.features import cached_features, extract_features
from moco_ray.evaluation.knn import knn_accuracy, knn_predict
from moco_ray.evaluation.linear import LinearProtocol, train_linear_probe


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a loaded 2-core box their sync costs 10x the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1)


def _reference_scores(q, bank, labels, classes, k, t):
    """Straightforward per-query loops: k most similar rows vote exp(sim / t) for their label."""
    out = []
    for i in range(q.shape[0]):
        sims = [(float(q[i] @ bank[j]), int(labels[j])) for j in range(bank.shape[0])]
        sims.sort(key=lambda s: s[0], reverse=True)
        scores = [0.0] * classes
        for s, c in sims[:k]:
            scores[c] += math.exp(s / t)
        out.append(scores)
    return torch.tensor(out, dtype=torch.float64)


def _clusters(n_per_class: int, classes: int, dim: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return _unit(x), labels


def test_knn_predict_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    bank, q = _unit(torch.randn(60, 8, generator=g)), _unit(torch.randn(9, 8, generator=g))
    labels = torch.randint(0, 4, (60,), generator=g)
    for k, t in ((10, 0.1), (1, 0.5), (60, 0.07)):
        pred = knn_predict(q, bank, labels, 4, knn_k=k, knn_t=t)
        ref = _reference_scores(q, bank, labels, 4, k, t)
        assert pred.shape == (9, 4)
        # the ranking of every class (not only the winner) agrees with the loops; zero-score ties excepted
        for i in range(9):
            ranked = [c for c in pred[i].tolist() if ref[i, c] > 0]
            assert ranked == sorted(ranked, key=lambda c: -ref[i, c])
        assert torch.equal(pred[:, 0], ref.argmax(1))


def test_knn_accuracy_chunking_and_k_clipping():
    g = torch.Generator().manual_seed(1)
    bank, q = _unit(torch.randn(50, 6, generator=g)), _unit(torch.randn(23, 6, generator=g))
    bl, ql = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 3, (23,), generator=g)
    ref = _reference_scores(q, bank, bl, 3, 7, 0.1).argmax(1)
    expected = float((ref == ql).float().mean())
    assert knn_accuracy(bank, bl, q, ql, k=7, t=0.1, chunk=4) == pytest.approx(expected)
    assert knn_accuracy(bank, bl, q, ql, k=7, t=0.1, chunk=1000) == pytest.approx(expected)
    # k larger than the bank is clipped to the bank
    assert knn_accuracy(bank, bl, q, ql, k=500, t=0.1) == knn_accuracy(bank, bl, q, ql, k=50, t=0.1)


def test_knn_accuracy_separable_and_chance():
    bank, bl = _clusters(30, 5, 16, noise=0.05, seed=2)
    q, ql = _clusters(10, 5, 16, noise=0.05, seed=2)
    assert knn_accuracy(bank, bl, q, ql, k=20, t=0.1) == 1.0
    g = torch.Generator().manual_seed(3)
    rbank, rq = _unit(torch.randn(2000, 32, generator=g)), _unit(torch.randn(1000, 32, generator=g))
    acc = knn_accuracy(
        rbank, torch.randint(0, 10, (2000,), generator=g), rq, torch.randint(0, 10, (1000,), generator=g)
    )
    assert 0.05 < acc < 0.16  # chance is 0.1; binomial std over 1000 queries ~0.01


def test_knn_accuracy_rejects_bad_input():
    f, y = _unit(torch.randn(10, 4)), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="dim"):
        knn_accuracy(f, y, _unit(torch.randn(3, 5)), y[:3])
    with pytest.raises(ValueError, match=">= 0"):
        knn_accuracy(f, torch.full((10,), -1), f, y)
    with pytest.raises(ValueError, match="shape"):
        knn_accuracy(f, y[:5], f, y)
    with pytest.raises(ValueError, match="empty"):
        knn_accuracy(f[:0], y[:0], f, y)


@pytest.fixture(scope="module")
def tiny_backbone():
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", small_stem=True)
    with torch.no_grad():  # non-trivial BN statistics so eval mode differs from batch statistics
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return backbone, dim


def test_extract_features_matches_manual_and_is_batch_independent(tiny_backbone):
    backbone, dim = tiny_backbone
    g = torch.Generator().manual_seed(4)
    imgs = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.arange(7)
    backbone.train()
    feats, out_labels = extract_features(backbone, [(imgs[:3], labels[:3]), (imgs[3:], labels[3:])], "cpu")
    assert backbone.training  # mode restored
    assert feats.shape == (7, dim) and feats.dtype == torch.float32
    assert torch.equal(out_labels, labels)
    assert torch.allclose(feats.norm(dim=1), torch.ones(7), atol=1e-5)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    backbone.eval()
    with torch.no_grad():
        manual = F.normalize(backbone((imgs.float() / 255 - mean) / std), dim=1)
    assert torch.allclose(feats, manual, atol=1e-5)
    # one batch of all 7, channels_last, dict batches: same features
    one, _ = extract_features(backbone, [{"img": imgs, "label": labels}], "cpu", channels_last=True)
    assert torch.allclose(one, feats, atol=1e-5)
    raw, _ = extract_features(backbone, [(imgs, labels)], "cpu", normalize=False)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(7))
    empty_f, empty_l = extract_features(backbone, [], "cpu")
    assert empty_f.shape[0] == 0 and empty_l.shape == (0,)


def test_cached_features_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(5, 3), torch.arange(5)

    f1, l1 = cached_features("run/abc epoch=3 train", tmp_path, compute)
    f2, l2 = cached_features("run/abc epoch=3 train", tmp_path, compute)
    assert len(calls) == 1 and torch.equal(f1, f2) and torch.equal(l1, l2)
    cached_features("run/abc epoch=3 test", tmp_path, compute)  # another key: computed again
    assert len(calls) == 2
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 2
    assert torch.load(files[0], weights_only=True)["features"].shape == (5, 3)


def test_linear_probe_presets_reach_high_accuracy():
    # Gaussian classes in 64-D, L2-normalised, noisy enough that they overlap: the reference is the accuracy of
    # the nearest true class centre (near Bayes-optimal), which a good probe should come close to.
    centres = torch.randn(10, 64, generator=torch.Generator().manual_seed(100))

    def sample(n_per_class, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(10).repeat_interleave(n_per_class)
        return _unit(centres[y] + 2.5 * torch.randn(len(y), 64, generator=g)), y

    (xtr, ytr), (xte, yte) = sample(300, 1), sample(50, 2)
    reference = float((xte @ _unit(centres).T).argmax(1).eq(yte).float().mean())
    assert reference > 0.8
    for proto in (LinearProtocol.small(), LinearProtocol.paper()):
        res = proto.run(xtr, ytr, xte, yte, num_classes=10, seed=0)
        assert res.top1 >= reference - 0.06, (proto, res.top1, reference)
        assert res.top5 >= res.top1 and res.train_top1 >= reference - 0.06
        assert len(res.history) == proto.epochs
        assert res.history[-1]["loss"] < res.history[0]["loss"]
    # too few steps at a tiny lr: the same data is not learned (the check above can fail)
    weak = train_linear_probe(xtr, ytr, xte, yte, 10, epochs=1, lr=1e-4, standardize=False)
    assert weak.top1 < reference - 0.2


def test_linear_probe_schedule_determinism_and_standardisation():
    xtr, ytr = _clusters(20, 3, 8, noise=0.8, seed=7)
    xte, yte = _clusters(10, 3, 8, noise=0.8, seed=8)
    kw = dict(epochs=10, lr=0.5, batch_size=16, schedule="step", milestones=(4, 8), seed=3)
    a = train_linear_probe(xtr, ytr, xte, yte, **kw)
    b = train_linear_probe(xtr, ytr, xte, yte, **kw)
    assert a.history == b.history
    lrs = [h["lr"] for h in a.history]
    assert lrs[:4] == [0.5] * 4 and lrs[4:8] == [pytest.approx(0.05)] * 4 and lrs[8] == pytest.approx(0.005)
    # standardised probe does not care about a global feature scale
    c = train_linear_probe(xtr * 1000, ytr, xte * 1000, yte, **kw)
    assert c.top1 == a.top1 and c.history[-1]["loss"] == pytest.approx(a.history[-1]["loss"], rel=1e-3)
    assert a.classifier is not None and a.classifier(xte).shape == (30, 3)
    cos = train_linear_probe(xtr, ytr, xte, yte, epochs=4, lr=0.5, batch_size=16)
    assert cos.history[-1]["lr"] < cos.history[0]["lr"] < 0.5 + 1e-9


def test_linear_probe_rejects_bad_input():
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="num_classes"):
        train_linear_probe(x, y, x, y, num_classes=2, epochs=1)
    with pytest.raises(ValueError, match="labels"):
        train_linear_probe(x, y.float(), x, y, epochs=1)
    with pytest.raises(ValueError, match="schedule"):
        train_linear_probe(x, y, x, y, epochs=1, schedule="linear")
    with pytest.raises(ValueError, match="dim"):
        train_linear_probe(x, y, torch.randn(6, 5), y, epochs=1)
