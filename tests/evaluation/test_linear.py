"""Linear-probe protocols on features."""

from __future__ import annotations

import pytest
import torch
from moco_helpers import gaussian_clusters, unit_rows

from moco_ray.evaluation.linear import LinearProtocol, train_probe
from moco_ray.evaluation.probe_sources import CachedFeatures

pytestmark = pytest.mark.usefixtures("one_thread")


def test_linear_probe_presets_reach_high_accuracy():
    # Gaussian classes in 64-D, L2-normalised, noisy enough that they overlap: the reference is the accuracy of
    # the nearest true class centre (near Bayes-optimal), which a good probe should come close to.
    centres = torch.randn(10, 64, generator=torch.Generator().manual_seed(100))

    def sample(n_per_class, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(10).repeat_interleave(n_per_class)
        return unit_rows(centres[y] + 2.5 * torch.randn(len(y), 64, generator=g)), y

    (xtr, ytr), (xte, yte) = sample(300, 1), sample(50, 2)
    reference = float((xte @ unit_rows(centres).T).argmax(1).eq(yte).float().mean())
    assert reference > 0.8
    for proto in (LinearProtocol.small(), LinearProtocol.paper()):
        res = train_probe(CachedFeatures(xtr, ytr, xte, yte), proto, num_classes=10, seed=0)
        assert res.top1 >= reference - 0.06, (proto, res.top1, reference)
        assert res.top5 >= res.top1 and res.train_top1 >= reference - 0.06
        assert len(res.history) == proto.epochs
        assert res.history[-1]["loss"] < res.history[0]["loss"]
    # too few steps at a tiny lr: the same data is not learned (the check above can fail)
    weak = train_probe(CachedFeatures(xtr, ytr, xte, yte), LinearProtocol(epochs=1, lr=1e-4, standardize=False), 10)
    assert weak.top1 < reference - 0.2


def test_linear_probe_schedule_determinism_and_standardisation():
    xtr, ytr = gaussian_clusters(20, 3, 8, noise=0.8, seed=7)
    xte, yte = gaussian_clusters(10, 3, 8, noise=0.8, seed=8)
    step = LinearProtocol(epochs=10, lr=0.5, batch_size=16, schedule="step", milestones=(4, 8))
    a = train_probe(CachedFeatures(xtr, ytr, xte, yte), step, seed=3)
    b = train_probe(CachedFeatures(xtr, ytr, xte, yte), step, seed=3)
    assert a.history == b.history
    lrs = [h["lr"] for h in a.history]
    assert lrs[:4] == [0.5] * 4 and lrs[4:8] == [pytest.approx(0.05)] * 4 and lrs[8] == pytest.approx(0.005)
    # standardised probe does not care about a global feature scale
    c = train_probe(CachedFeatures(xtr * 1000, ytr, xte * 1000, yte), step, seed=3)
    assert c.top1 == a.top1 and c.history[-1]["loss"] == pytest.approx(a.history[-1]["loss"], rel=1e-3)
    assert a.classifier is not None and a.classifier(xte).shape == (30, 3)
    cos = train_probe(CachedFeatures(xtr, ytr, xte, yte), LinearProtocol(epochs=4, lr=0.5, batch_size=16))
    assert cos.history[-1]["lr"] < cos.history[0]["lr"] < 0.5 + 1e-9


def test_linear_probe_rejects_bad_input():
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    one = LinearProtocol(epochs=1)
    with pytest.raises(ValueError, match="num_classes"):
        train_probe(CachedFeatures(x, y, x, y), one, num_classes=2)
    with pytest.raises(ValueError, match="labels"):
        train_probe(CachedFeatures(x, y.float(), x, y), one)
    with pytest.raises(ValueError, match="schedule"):
        train_probe(CachedFeatures(x, y, x, y), LinearProtocol(epochs=1, schedule="linear"))
    with pytest.raises(ValueError, match="dim"):
        train_probe(CachedFeatures(x, y, torch.randn(6, 5), y), one)
