"""Weighted kNN against a loop reference; chunking, clipping, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from moco_helpers import gaussian_clusters, unit_rows

from moco_ray.evaluation.knn import knn_accuracy, knn_predict

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_knn_predict_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    bank, q = unit_rows(torch.randn(60, 8, generator=g)), unit_rows(torch.randn(9, 8, generator=g))
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
    bank, q = unit_rows(torch.randn(50, 6, generator=g)), unit_rows(torch.randn(23, 6, generator=g))
    bl, ql = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 3, (23,), generator=g)
    ref = _reference_scores(q, bank, bl, 3, 7, 0.1).argmax(1)
    expected = float((ref == ql).float().mean())
    assert knn_accuracy(bank, bl, q, ql, k=7, t=0.1, chunk=4) == pytest.approx(expected)
    assert knn_accuracy(bank, bl, q, ql, k=7, t=0.1, chunk=1000) == pytest.approx(expected)
    # k larger than the bank is clipped to the bank
    assert knn_accuracy(bank, bl, q, ql, k=500, t=0.1) == knn_accuracy(bank, bl, q, ql, k=50, t=0.1)


def test_knn_accuracy_separable_and_chance():
    bank, bl = gaussian_clusters(30, 5, 16, noise=0.05, seed=2)
    q, ql = gaussian_clusters(10, 5, 16, noise=0.05, seed=2)
    assert knn_accuracy(bank, bl, q, ql, k=20, t=0.1) == 1.0
    g = torch.Generator().manual_seed(3)
    rbank, rq = unit_rows(torch.randn(2000, 32, generator=g)), unit_rows(torch.randn(1000, 32, generator=g))
    acc = knn_accuracy(
        rbank, torch.randint(0, 10, (2000,), generator=g), rq, torch.randint(0, 10, (1000,), generator=g)
    )
    assert 0.05 < acc < 0.16  # chance is 0.1; binomial std over 1000 queries ~0.01


def test_knn_accuracy_rejects_bad_input():
    f, y = unit_rows(torch.randn(10, 4)), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="dim"):
        knn_accuracy(f, y, unit_rows(torch.randn(3, 5)), y[:3])
    with pytest.raises(ValueError, match=">= 0"):
        knn_accuracy(f, torch.full((10,), -1), f, y)
    with pytest.raises(ValueError, match="shape"):
        knn_accuracy(f, y[:5], f, y)
    with pytest.raises(ValueError, match="empty"):
        knn_accuracy(f[:0], y[:0], f, y)
