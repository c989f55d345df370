"""A few dozen MoCo steps on real images lower the contrastive loss and raise the contrastive accuracy.

Real data: scikit-learn's bundled handwritten digits (always available offline), two random views each from the
project's own v2 augmentation. The projector has BatchNorm (as in MoCo v3): with the plain v2 head a randomly
initialised ResNet maps every image to nearly the same direction, and MoCo sits on that plateau (loss ~ log(K+1))
for hundreds of steps, far more than a CPU unit test can afford; BN in the head spreads the embeddings from the
first step, so learning shows within dozens. Everything else is the production core: split-BN with in-batch key
shuffle, EMA key encoder, queue with wrap-around, InfoNCE.
"""

from __future__ import annotations

import numpy as np
import torch

from moco_ray.core import MoCo
from moco_ray.core.encoders import build_encoder
from moco_ray.core.shuffle_bn import split_bn_factory
from moco_ray.data.augment import build_view_augment, normalize_on_device
from moco_ray.data.digits import digits_arrays

STEPS, BATCH = 60, 32


def test_moco_learns_on_real_images():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        imgs, _ = digits_arrays(32)
        data = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
        aug = build_view_augment("v2", 32, 1.0)
        gen = torch.Generator().manual_seed(0)
        enc = build_encoder("resnet18", False, "mlp", 64, 256, norm_layer=split_bn_factory(4), head_bn=True)
        model = MoCo(enc, dim=64, queue_size=256, momentum=0.99, temperature=0.2, bn_mode="split")
        opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
        rng = np.random.default_rng(0)
        losses, accs = [], []
        for _ in range(STEPS):
            batch = data[rng.choice(len(data), BATCH, replace=False)]
            pairs = [aug.pair(img, gen) for img in batch]
            q = normalize_on_device(torch.stack([p[0] for p in pairs]), "cpu")
            k = normalize_on_device(torch.stack([p[1] for p in pairs]), "cpu")
            out = model(q, k)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            losses.append(out["loss"].item())
            accs.append(out["acc1"].item())
    finally:
        torch.set_num_threads(threads)
    # the queue (256 = 8 batches) is full of real keys after step 8; from then on the loss is comparable
    window = [np.mean(losses[i : i + 10]) for i in range(8, STEPS - 9)]
    assert np.mean(losses[-10:]) < max(window) - 0.1, losses
    assert np.mean(accs[-10:]) > np.mean(accs[:10]) + 0.03, accs
    assert np.mean(accs[-10:]) > 5 / 257  # well above chance (1 positive among 257 candidates)
