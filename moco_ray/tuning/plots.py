"""Plots of a sweep's results table (headless PNGs), logged to the parent run by moco_ray.tuning.results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from moco_ray.tracking.plots import _plt

LOG_SCALE_KEYS = ("moco.queue_size", "optim.lr", "optim.weight_decay")


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _log_x(key: str, xs: Sequence[float]) -> bool:
    pos = [x for x in xs if x > 0]
    return key in LOG_SCALE_KEYS or (len(pos) == len(xs) and len(pos) > 1 and max(pos) / min(pos) >= 20)


def plot_metric_vs_param(table: pd.DataFrame, key: str, metric: str, out: Path) -> Path | None:
    """Final `metric` against the search key `key`, one line per combination of the other searched keys.

    Finished trials are filled markers; trials ASHA stopped early are hollow (their value is from an earlier
    epoch). Returns None when `key` has fewer than two numeric values with a metric.
    """
    col, pcol = f"final_{metric}", f"param:{key}"
    df = table[table["state"].isin(["finished", "stopped_early"]) & table[col].notna()] if col in table else table[:0]
    if df.empty or df[pcol].nunique() < 2 or not _numeric(list(df[pcol])):
        return None
    others = [c for c in table.columns if c.startswith("param:") and c != pcol]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    groups = df.groupby(others, dropna=False) if others else [((), df)]
    for gkey, g in groups:
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        label = ", ".join(f"{c.split('.')[-1]}={_fmt(v)}" for c, v in zip(others, gkey)) or metric
        mean = g.groupby(pcol)[col].mean().sort_index()
        (line,) = ax.plot(mean.index, mean.values, marker="o", label=label)
        stopped = g[g["state"] == "stopped_early"]
        if not stopped.empty:
            ax.scatter(stopped[pcol], stopped[col], facecolors="none", edgecolors=line.get_color(), s=70, zorder=3)
    if _log_x(key, list(df[pcol])):
        ax.set_xscale("log", base=2 if key == "moco.queue_size" else 10)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {key.split('.')[-1]} (hollow: stopped early)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_heatmap(table: pd.DataFrame, rows: str, cols: str, metric: str, out: Path) -> Path | None:
    """Mean final `metric` over a 2-D grid (rows x cols); cells without a value stay blank."""
    col = f"final_{metric}"
    df = table[table[col].notna()] if col in table else table[:0]
    if df.empty:
        return None
    grid = df.pivot_table(index=f"param:{rows}", columns=f"param:{cols}", values=col, aggfunc="mean")
    grid = grid.reindex(index=sorted(table[f"param:{rows}"].unique()), columns=sorted(table[f"param:{cols}"].unique()))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 * grid.shape[1] + 3, 0.8 * grid.shape[0] + 2))
    im = ax.imshow(grid.values.astype(float), cmap="viridis", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [_fmt(v) for v in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [_fmt(v) for v in grid.index])
    ax.set_xlabel(cols)
    ax.set_ylabel(rows)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid.values[i, j]
            if not (isinstance(v, float) and math.isnan(v)):
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", color="w", fontsize=9)
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(f"final {metric}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_learning_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], metric: str, out: Path) -> Path | None:
    """Per-trial curves ``{label: {"loss": [(epoch, v)], metric: [...]}}``: loss and `metric` against epoch (the
    child runs' MLflow steps: epoch numbers, 1 for the first, as the console counts)."""
    if not any(c.get("loss") or c.get(metric) for c in curves.values()):
        return None
    plt = _plt()
    keys = ["loss"] + ([metric] if metric != "loss" else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, c in curves.items():
            pts = sorted(c.get(key, []))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("learning curves of all trials")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
