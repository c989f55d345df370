"""``moco-ray eval`` and ``moco-ray export``: argparse Namespace -> :mod:`moco_ray.jobs` -> print.

Errors are raised (ValueError / FileNotFoundError) for ``moco_ray.cli.main`` to print as one line and exit 2.
"""

from __future__ import annotations

import argparse


def run(a: argparse.Namespace) -> int:
    """``moco-ray eval knn|linear --run ID [--data SHARDS] [--epochs N] [--protocol-preset small|paper|lincls]
    [--image-size PX] [--limit ROWS]``."""
    from moco_ray.jobs import evaluate as runner  # lazy: --help stays fast (torch/Ray/mlflow)

    uri = getattr(a, "tracking_uri", "") or ""
    size = getattr(a, "image_size", None)
    limit = getattr(a, "limit", 0) or 0
    if a.protocol == "knn":
        r = runner.evaluate_knn(a.run, getattr(a, "data", None), tracking_uri=uri, image_size=size, limit=limit)
        print(
            f"kNN top-1 {r['top1']:.4f}  (k={r['k']}, t={r['t']}; {r['train_rows']} train / {r['test_rows']} test "
            f"rows at {r['image_size']} px of {r['data']})"
        )
    else:
        r = runner.evaluate_linear(
            a.run,
            getattr(a, "data", None),
            tracking_uri=uri,
            protocol=getattr(a, "protocol_preset", None),
            epochs=getattr(a, "epochs", None),
            image_size=size,
            limit=limit,
        )
        print(
            f"linear top-1 {r['top1']:.4f} (best {r['best_top1']:.4f} at epoch {r['best_epoch']})  "
            f"top-5 {r['top5']:.4f}  train top-1 {r['train_top1']:.4f}  "
            f"(protocol {r['protocol']}, {r['settings']['epochs']} epochs; {r['train_rows']} train / "
            f"{r['test_rows']} test rows at {r['image_size']} px of {r['data']})"
        )
    print(f"eval run: {r['eval_run_id']} (child of {r['run_id']})")
    from moco_ray.tracking.store import resolve_tracking_uri, where_to_look  # lazy: --help stays fast (mlflow)

    print("\n".join(where_to_look(resolve_tracking_uri(uri), r["eval_run_id"])))
    return 0


def export(a: argparse.Namespace) -> int:
    """``moco-ray export --run ID [--format F] [--register NAME] OUT``."""
    from moco_ray.jobs.export import export_run  # lazy: --help stays fast (torch/mlflow)

    r = export_run(
        a.run,
        getattr(a, "format", "torchvision"),
        a.out,
        register=getattr(a, "register", None),
        tracking_uri=getattr(a, "tracking_uri", "") or "",
    )
    print(f"exported {r.format}: {r.path} ({r.weights.name}, encoder.json, README.md)")
    if r.version is not None:
        print(f"registered model {r.registered_name} version {r.version} (models:/{r.registered_name}/{r.version})")
    return 0
