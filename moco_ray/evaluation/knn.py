"""Weighted kNN classifier on frozen features (the MoCo CIFAR-10 demo's monitor, after Wu et al. 2018).

Each query's k most cosine-similar memory-bank rows vote for their label with weight ``exp(sim / t)``.
Features are expected L2-normalised (``extract_features`` does that), so the dot product is the cosine.
"""

from __future__ import annotations

import torch

from moco_ray.core.defaults import KNN_K, KNN_T


def knn_predict(
    feature: torch.Tensor,
    feature_bank: torch.Tensor,
    feature_labels: torch.Tensor,
    classes: int,
    knn_k: int = KNN_K,
    knn_t: float = KNN_T,
) -> torch.Tensor:
    """Class indices of each query, sorted by weighted vote, best first: ``[B, classes]``.

    ``feature`` [B,D] and ``feature_bank`` [N,D] L2-normalised; ``feature_labels`` [N] in ``[0, classes)``.
    Same computation as the official demo's ``knn_predict`` (which takes the bank transposed, [D,N]); the one-hot
    sum is written as a ``scatter_add`` so no [B*k, classes] one-hot tensor is built.
    """
    sim = feature @ feature_bank.T  # [B, N]
    sim_weight, sim_idx = sim.topk(k=knn_k, dim=-1)  # [B, k]
    sim_labels = feature_labels[sim_idx]  # [B, k]
    sim_weight = (sim_weight / knn_t).exp()
    scores = torch.zeros(feature.shape[0], classes, device=feature.device, dtype=sim_weight.dtype)
    scores.scatter_add_(1, sim_labels, sim_weight)
    return scores.argsort(dim=-1, descending=True)


def _as_labels(x: torch.Tensor, name: str, n: int) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 1 or x.shape[0] != n:
        raise ValueError(f"{name}: expected shape [{n}] to match the features, got {list(x.shape)}")
    if x.is_floating_point():
        raise ValueError(f"{name}: expected integer class indices, got {x.dtype}")
    if n and int(x.min()) < 0:
        raise ValueError(f"{name}: labels must be >= 0 (unlabelled rows, -1, cannot be used for kNN)")
    return x.long()


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = KNN_K,
    t: float = KNN_T,
    chunk: int = 512,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] of the weighted kNN classifier with ``train_*`` as the memory bank.

    Queries are processed ``chunk`` at a time, so memory is ``chunk x N`` similarities rather than all of them at
    once. ``k`` is clipped to the bank size. ``device``: where to compute (default: the bank's device); a GPU
    makes a 50k-row bank take milliseconds instead of seconds.
    """
    if train_feats.dim() != 2 or test_feats.dim() != 2:
        raise ValueError(
            f"knn_accuracy: features must be [N,D]; got bank {list(train_feats.shape)}, "
            f"queries {list(test_feats.shape)}"
        )
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"knn_accuracy: bank dim {train_feats.shape[1]} != query dim {test_feats.shape[1]}")
    n, m = train_feats.shape[0], test_feats.shape[0]
    if n == 0 or m == 0:
        raise ValueError(f"knn_accuracy: empty memory bank ({n} rows) or queries ({m} rows)")
    if k < 1 or t <= 0 or chunk < 1:
        raise ValueError(f"knn_accuracy: need k >= 1, t > 0, chunk >= 1; got k={k}, t={t}, chunk={chunk}")
    train_labels = _as_labels(train_labels, "train_labels", n)
    test_labels = _as_labels(test_labels, "test_labels", m)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    if num_classes is not None:
        if num_classes < classes:
            raise ValueError(f"knn_accuracy: num_classes={num_classes} but labels go up to {classes - 1}")
        classes = num_classes
    dev = torch.device(device) if device is not None else train_feats.device
    bank = train_feats.to(dev, torch.float32)
    bank_labels = train_labels.to(dev)
    k = min(k, n)
    correct = 0
    with torch.no_grad():
        for start in range(0, m, chunk):
            q = test_feats[start : start + chunk].to(dev, torch.float32)
            pred = knn_predict(q, bank, bank_labels, classes, k, t)[:, 0]
            correct += int((pred == test_labels[start : start + chunk].to(dev)).sum())
    return correct / m
