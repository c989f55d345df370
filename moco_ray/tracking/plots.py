"""Plots people would rather see than read, rendered headless (Agg) to PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moco_ray.tracking.history import EpochMetrics


def _plt():
    import matplotlib  # lazy: heavy, and the headless backend must be chosen before pyplot is first imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg")

    return plt


def plot_training_curves(history: Sequence[EpochMetrics], out: str | Path, title: str = "") -> Path:
    """Loss (and contrastive top-1) and kNN top-1 against epoch, side by side."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ep = [h.epoch + 1 for h in history]  # epoch numbers as the console and MLflow's steps count them
    axes[0].plot(ep, [h.loss for h in history], marker="o", label="loss")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("InfoNCE loss")
    if history:
        ax2 = axes[0].twinx()
        ax2.plot(ep, [h.acc1 for h in history], color="tab:orange", marker=".", label="top-1")
        ax2.set_ylabel("contrastive top-1")
    knn = [(h.epoch + 1, h.knn_top1) for h in history if h.knn_top1 is not None]
    if knn:
        axes[1].plot(*zip(*knn, strict=True), marker="o", color="tab:green")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("kNN top-1")
    axes[1].set_title("kNN monitor" if knn else "kNN monitor (off)")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
