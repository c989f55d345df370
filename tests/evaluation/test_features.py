"""Frozen feature extraction and the on-disk cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moco_ray.core.encoders import build_backbone
from moco_ray.evaluation.features import cached_features, extract_features

pytestmark = pytest.mark.usefixtures("one_thread")


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
