"""The ``moco-ray`` console script.

Errors a user can fix (bad config values, missing paths, wrong shard schema, unknown runs) print one line,
``moco-ray: error: ...``, and exit 2, instead of a traceback. Ctrl-C exits 130; SIGTERM (``kill``, ``ray job stop``,
Slurm, Kubernetes) and SIGHUP (the terminal closed) take the same path and exit 143 / 129. A run or sweep stopped
early with nothing lost (``--resume`` continues it) exits 3. Each prints one line, with the command that continues
when there is something to continue.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from moco_ray.cli import evaluate
from moco_ray.config import Config, TrackingConfig, load_config
from moco_ray.config_files import KINDS, QUICKSTART, experiment_file, kind_of, shipped_dir, shipped_files
from moco_ray.jobs.local_ray import interruption, stop_signal, stop_signals_as_ctrl_c
from moco_ray.version import __version__


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. moco.queue_size=1024")


def cmd_pretrain(a: argparse.Namespace) -> int:
    config = None if a.resume else experiment_file(a.config or QUICKSTART)  # a resume continues the run's config
    # the first line, before torch/Ray/mlflow load (seconds on a busy machine)
    if a.resume:
        which = "the latest unfinished run" if a.resume == "last" else f"run {a.resume}"
        print(f"moco-ray: resuming {which}: loading, then checks and Ray ...", flush=True)
    else:  # a bad value or key is refused here, in one line, in a fraction of a second
        _announce(config, load_config(config, a.overrides))
    from moco_ray.jobs.pretrain import (  # lazy: --help stays fast (torch/Ray/mlflow)
        RunInterrupted,
        RunKilled,
        run_pretraining,
    )

    if a.resume:  # `last`: the config names the experiment (the quickstart's without -c); one line when none
        from moco_ray.jobs.runs import resolve_resume  # lazy: --help stays fast (mlflow)

        a.resume, a.overrides = resolve_resume(a.resume, a.config or QUICKSTART, a.overrides)
    try:
        res = run_pretraining(config, a.overrides, resume=a.resume)
    except RunInterrupted as e:
        print(f"moco-ray: {e}", file=sys.stderr)
        return 3
    except RunKilled:
        raise
    except KeyboardInterrupt:  # before the MLflow run was created (or reopened): nothing of it started
        if not a.resume:
            raise KeyboardInterrupt(f"{interruption()} before the run started: nothing to resume") from None
        again = shlex.join(["moco-ray", "pretrain", "--resume", a.resume, *a.overrides])
        raise KeyboardInterrupt(f"{interruption()} before run {a.resume} restarted; continue with: {again}") from None
    print(f"\nrun id: {res.run_id}")
    print("final: " + "  ".join(f"{k} {v:.4g}" for k, v in res.metrics.items() if k != "epoch"))
    print(f"encoder: {res.encoder_uri}\ncheckpoint: {res.checkpoint_path}")
    _print_where_to_look(res.tracking_uri, res.run_id)
    return 0


def _announce(config: os.PathLike, cfg: Config) -> None:
    """A new run's first line, printed within a second of its start: what runs, and what comes next (the
    imports, checks and Ray's start take tens of seconds on 2 CPUs)."""
    print(
        f"moco-ray: pretraining {config} ({cfg.moco.method}, {cfg.train.epochs} epochs) into experiment "
        f"{cfg.tracking.experiment}: loading, then checks and Ray ...",
        flush=True,
    )


def _print_where_to_look(uri: str, run_id: str) -> None:
    """The run's experiment and page (MLflow UI's training view); for a local store, the command that serves it."""
    from moco_ray.tracking.store import where_to_look  # lazy: --help stays fast (mlflow)

    print("\n".join(where_to_look(uri, run_id)), flush=True)


def cmd_ingest(a: argparse.Namespace) -> int:
    from moco_ray.jobs.ingest_job import run_ingest  # lazy: --help stays fast (torch/Ray/mlflow)

    try:
        r = run_ingest(
            a.source,
            a.out,
            split=a.split,
            shard_size_mb=a.shard_size_mb,
            strict=a.strict,
            overwrite=a.overwrite,
            workers=a.workers,
            reencode=a.reencode,
            ray=a.ray,
        )
    except KeyboardInterrupt:  # shards are committed only once all are written (moco_ray.data.ingest)
        raise KeyboardInterrupt(f"ingest {interruption()}; nothing half-written in {a.out}: run it again") from None
    print(r.summary(a.source, a.out))
    return 0


def cmd_runs(a: argparse.Namespace) -> int:
    from moco_ray.jobs.runs import experiment_runs, format_table, sort_rows  # lazy: --help stays fast (mlflow)

    rows = sort_rows(experiment_runs(a.experiment, a.tracking_uri), a.sort, a.reverse)
    print(format_table(rows))
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    from moco_ray.tuning.outage import TrackingOutage  # lazy: --help stays fast (torch/Ray/mlflow)
    from moco_ray.tuning.sweep import resume_command, run_sweep  # lazy: --help stays fast (torch/Ray/mlflow)

    try:
        res = run_sweep(experiment_file(a.config, "sweep"), overrides=a.overrides, resume=a.resume)
    except TrackingOutage as e:  # stopped, nothing lost: exit 3 as for a pretraining stopped early
        print(f"moco-ray: {e}", file=sys.stderr)
        return 3
    print(res.table.to_string(index=False))
    print(f"\nparent run: {res.parent_run_id}\nbest trial: {res.best}")
    if res.tracking_uri:
        _print_where_to_look(res.tracking_uri, res.parent_run_id)
    if not res.complete:  # Tune's SIGINT handler ends the sweep normally, with trials left unfinished
        raise KeyboardInterrupt(f"sweep {interruption()}; continue with: {resume_command(a.config)}")
    return 0


def cmd_experiments(a: argparse.Namespace) -> int:
    """The shipped files with their descriptions; with a name, that file's text (to copy and edit)."""
    if a.name:
        print(experiment_file(a.name, kind_of(os.path.basename(a.name))).read_text(), end="")
        return 0
    files = shipped_files()
    width = max(len(f.name) for f in files)
    for kind, command in KINDS.items():
        print(f"{kind} files ({command}):")
        print("\n".join(f"  {f.name:<{width}}  {f.description}" for f in files if f.kind == kind))
    print(f"\nin {shipped_dir()}; relative paths in them (data.shards, storage, sqlite store) are the current dir's")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    return evaluate.run(a)


def cmd_export(a: argparse.Namespace) -> int:
    return evaluate.export(a)


def cmd_import_checkpoint(a: argparse.Namespace) -> int:
    from moco_ray.jobs.import_checkpoint import import_checkpoint  # lazy: --help stays fast (torch/Ray/mlflow)

    r = import_checkpoint(
        a.file, a.arch, name=a.name, experiment=a.experiment, tracking_uri=a.tracking_uri, trust_pickle=a.trust_pickle
    )
    print(f"imported {r.method} {r.arch} (epoch {r.epoch}, sha256 {r.sha256[:12]}) into experiment {r.experiment}")
    print(f"run id: {r.run_id}\nencoder: {r.encoder_uri}")
    _print_where_to_look(r.tracking_uri, r.run_id)
    print(f"next: moco-ray eval knn --run {r.run_id} --data SHARDS; moco-ray export --run {r.run_id} --format moco OUT")
    return 0


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    pt = sub.add_parser("pretrain", help="pretrain an encoder (no arguments: the offline quickstart)")
    pt.add_argument(
        "-c", "--config", help=f"experiment YAML, or a shipped one's name (moco-ray experiments; default: {QUICKSTART})"
    )
    pt.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue a stopped run from its last checkpoint; last: the newest unfinished run (with a checkpoint) "
        "of the experiment the config names",
    )
    _add_overrides(pt)
    pt.set_defaults(func=cmd_pretrain)


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    ing = sub.add_parser("ingest", help="turn an image tree or dataset into Parquet shards + manifest")
    ing.add_argument(
        "source",
        help="ImageFolder dir or URI (s3://bucket/prefix, gs://...), torchvision:cifar10|cifar100|stl10, or digits",
    )
    ing.add_argument("out", help="output directory or URI (s3://bucket/prefix, gs://...) for the shards")
    ing.add_argument("--split", help="only this split")
    ing.add_argument("--shard-size-mb", type=float, default=None, help="default 64; with Ray 128 (less for small data)")
    ing.add_argument(
        "--ray",
        action="store_true",
        help="run as a Ray Data job (the cluster in RAY_ADDRESS or running here, else a local Ray); a URI SOURCE or "
        "OUT always does",
    )
    ing.add_argument("--strict", action="store_true", help="fail on any bad image instead of skipping it")
    ing.add_argument("--overwrite", action="store_true", help="replace an existing, different output")
    ing.add_argument("--workers", type=int, default=None, help="parallel readers (default: CPU count; Ray: per task)")
    ing.add_argument("--reencode", choices=["jpeg", "png"], default=None, help="re-encode images (default: keep)")
    ing.set_defaults(func=cmd_ingest)


def _add_runs(sub: argparse._SubParsersAction) -> None:
    rn = sub.add_parser("runs", help="an experiment's runs as a table (name, state, method, K, m, T, metrics)")
    rn.add_argument("experiment", nargs="?", default=TrackingConfig().experiment, help="default: %(default)s")
    sorts = ["start", "name", "state", "method", "K", "m", "T", "epochs", "loss", "knn_top1", "eval_linear_top1"]
    rn.add_argument("--sort", default="start", choices=sorts, help="column (metrics best first, start newest first)")
    rn.add_argument("--reverse", action="store_true", help="the other order")
    rn.add_argument("--tracking-uri", default="")
    rn.set_defaults(func=cmd_runs)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    sw = sub.add_parser("sweep", help="Ray Tune sweep over config keys (K, m, T, augmentation strength, ...)")
    sw.add_argument("-c", "--config", required=True, help="sweep YAML, or a shipped one's name: sweep_queue_momentum")
    sw.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    _add_overrides(sw)
    sw.set_defaults(func=cmd_sweep)


def _add_experiments(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("experiments", help="the shipped experiment and sweep files (names for -c), one line each")
    ex.add_argument("name", nargs="?", help="print this file (e.g. to copy and edit it)")
    ex.set_defaults(func=cmd_experiments)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate a pretrained encoder (knn, linear)")
    ev.add_argument("protocol", choices=["knn", "linear"])
    ev.add_argument(
        "--run",
        required=True,
        metavar="RUN_ID",
        help="MLflow run id of a pretraining (or import-checkpoint) run, as `pretrain` prints it; its encoder is "
        "evaluated and the result logged as a child run",
    )
    ev.add_argument("--data", help="shards to evaluate on (default: the run's own)")
    ev.add_argument("--epochs", type=int, default=None, help="linear probe epochs")
    ev.add_argument(
        "--protocol-preset",
        choices=["small", "paper", "lincls"],
        default=None,
        help="linear probe recipe. small: cached centre-crop features, L2-normalised and standardised, SGD lr 0.1, "
        "cosine (the default at an image size <= 96 px); paper: cached raw features, SGD lr 30, x0.1 at epochs 60 "
        "and 80 (the default above 96 px); lincls: the official main_lincls.py, fresh random crops every epoch "
        "(slow; images held in memory, use --limit). 100 epochs unless --epochs",
    )
    ev.add_argument("--image-size", type=int, default=None, help="px (default: the run's aug.image_size, else 224)")
    ev.add_argument("--limit", type=int, default=0, help="rows per split (0 = all)")
    ev.add_argument("--tracking-uri", default="")
    ev.set_defaults(func=cmd_eval)


def _add_export(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="export a run's encoder as a directory (weights, encoder.json, README.md)")
    ex.add_argument("--run", required=True, metavar="RUN_ID", help="MLflow run id of the run whose encoder to export")
    ex.add_argument(
        "--format",
        choices=["torchvision", "torchscript", "detectron2", "moco", "deit"],
        default="torchvision",
        help="moco: the official checkpoint of the run's method (v1/v2 module.encoder_q.*, v3 module.base_encoder.*), "
        "as main_lincls.py reads it; deit: a ViT as moco-v3's convert_to_deit.py writes it",
    )
    ex.add_argument("--register", metavar="NAME", help="also register it in the MLflow Model Registry")
    ex.add_argument("--tracking-uri", default="")
    ex.add_argument("out", help="the export directory: new, empty, or an earlier export of the same run (replaced)")
    ex.set_defaults(func=cmd_export)


def _add_import_checkpoint(sub: argparse._SubParsersAction) -> None:
    im = sub.add_parser("import-checkpoint", help="register an official MoCo v1/v2/v3 checkpoint as an MLflow run")
    im.add_argument("file", help="e.g. moco_v2_800ep_pretrain.pth.tar")
    im.add_argument(
        "--arch", help="torchvision architecture, or vit_small / vit_base (moco-v3) (default: the file's arch field)"
    )
    im.add_argument("--name", default="", help="run name (default: the file name)")
    im.add_argument("--experiment", default="", help="MLflow experiment (default: moco-ray)")
    im.add_argument("--tracking-uri", default="")
    im.add_argument("--trust-pickle", action="store_true", help="allow full unpickling (runs code from the file)")
    im.set_defaults(func=cmd_import_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moco-ray", description="MoCo self-supervised pretraining on Ray, tracked in MLflow."
    )
    p.add_argument("--version", action="version", version=f"moco-ray {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_pretrain, _add_ingest, _add_sweep, _add_eval, _add_export, _add_import_checkpoint, _add_runs):
        add(sub)
    _add_experiments(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        parser.print_help()
        return 0
    try:
        with stop_signals_as_ctrl_c():  # SIGTERM / SIGHUP: Ctrl-C's path (a run KILLED, the hint, Ray shut down)
            return a.func(a)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"moco-ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # RunKilled / a sweep's interrupt say what there is to continue, and how
        _say(f"moco-ray: {str(e) or interruption()}")
        return 128 + stop_signal()  # 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP


def _say(line: str) -> None:
    """``line`` on stderr, if it can still be shown: after SIGHUP the terminal may be gone (writes fail with EIO),
    and Python's own flush at exit would then fail too (exit 120 instead of 129)."""
    try:
        print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.dup2(devnull, sys.stderr.fileno())


if __name__ == "__main__":
    sys.exit(main())
