"""A briefly trained encoder beats a randomly initialised one on kNN and linear-probe accuracy.

Real images (cifar10-mini, else scikit-learn digits), 16 px, the platform's MoCo v2 core, view augmentation,
kNN monitor and linear probe; no Ray (the pretraining path has its own end-to-end test).

Why this takes minutes: random ResNet features are a strong kNN baseline on small images, and MoCo first makes
them *worse* (its features spread out before the views' invariances build up). Measured with these settings on
cifar10-mini: kNN 0.254 at init, 0.206 after 100 steps of 64, back to 0.262 after 300 and 0.282 after 600 steps.
Hence the ``long`` mark: not in the default run (``pytest -m long`` runs it; 13-16 minutes on 2 shared CPUs).
With 800 steps kNN overtakes the random start; the linear probe does not yet (0.298 vs 0.300), so that half is
a strict xfail: it turns into a failure the day it passes, to be made a plain assertion then.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.long

SIZE, TRAIN, TEST = 16, 2000, 1000
STEPS, BATCH = 800, 64


def _load(root, split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    classes = sorted(p for p in (root / split).iterdir() if p.is_dir())
    per = math.ceil(limit / len(classes))
    xs, ys = [], []
    for ci, d in enumerate(classes):
        for f in sorted(d.iterdir())[:per]:
            xs.append(np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)))
            ys.append(ci)
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys)


@torch.no_grad()
def _features(backbone, x: torch.Tensor) -> torch.Tensor:
    from moco_ray.data.augment import normalize_on_device

    backbone.eval()
    feats = torch.cat([backbone(normalize_on_device(x[i : i + 256], "cpu")) for i in range(0, len(x), 256)])
    return torch.nn.functional.normalize(feats, dim=1)


def _scores(backbone, train, test) -> tuple[float, float]:
    from moco_ray.evaluation.knn import knn_accuracy
    from moco_ray.evaluation.linear import train_linear_probe

    ftr, fte = _features(backbone, train[0]), _features(backbone, test[0])
    knn = knn_accuracy(ftr, train[1], fte, test[1], k=20, t=0.1)
    lin = train_linear_probe(ftr, train[1], fte, test[1], epochs=30, lr=0.1, batch_size=256, seed=0)
    return knn, lin.top1


@pytest.fixture(scope="module")
def scores(image_root) -> dict[str, float]:
    """kNN / linear top-1 of the encoder at init and after STEPS MoCo steps (trained once for both tests)."""
    from moco_ray.config import load_config
    from moco_ray.core.methods import backbone_of, build_method
    from moco_ray.data.augment import build_view_augment, normalize_on_device

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train, test = _load(image_root, "train", TRAIN), _load(image_root, "test", TEST)
        cfg = load_config(
            None,
            {
                "model.arch": "resnet18",
                "model.head_bn": True,
                "model.dim": 64,
                "model.hidden_dim": 256,
                "moco.bn_splits": 2,  # 32 images per BN group: 8 groups of 8 (the demo's default) learn far slower
                "moco.queue_size": 1024,
                "moco.momentum": 0.99,
                "moco.temperature": 0.2,
                "aug.image_size": SIZE,
                "aug.strength": 0.5,
                "train.batch_size": BATCH,
                "train.num_workers": 1,
            },
        )
        torch.manual_seed(0)
        model = build_method(cfg).train()
        random_knn, random_lin = _scores(backbone_of(model), train, test)
        model.train()

        opt = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
        aug = build_view_augment(cfg.aug.preset, SIZE, cfg.aug.strength)
        gen = torch.Generator().manual_seed(0)
        for _ in range(STEPS):
            idx = torch.randint(0, len(train[0]), (BATCH,), generator=gen)
            q, k = zip(*(aug.pair(img, gen) for img in train[0][idx]))
            out = model(normalize_on_device(torch.stack(q), "cpu"), normalize_on_device(torch.stack(k), "cpu"))
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
        knn, lin = _scores(backbone_of(model), train, test)
    finally:
        torch.set_num_threads(threads)
    out = {"random_knn": random_knn, "random_linear": random_lin, "knn": knn, "linear": lin}
    print(f"\n[trained vs random] {out}")
    return out


def test_briefly_trained_encoder_beats_random_on_knn(scores):
    assert scores["knn"] > scores["random_knn"] + 0.01, scores


@pytest.mark.xfail(
    strict=True,
    reason="measured on cifar10-mini: linear 0.298 after 800 steps vs 0.300 at init; the probe on 512 random "
    "conv features needs a longer run to be overtaken (kNN already is)",
)
def test_briefly_trained_encoder_beats_random_on_linear_probe(scores):
    assert scores["linear"] > scores["random_linear"] + 0.01, scores
