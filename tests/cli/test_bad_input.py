"""Bad input through the real CLI: one line ``moco-ray: error: ...`` naming the problem, exit code 2, no traceback,
no Ray started (except where the check needs the cluster: a GPU asked for on a cluster without one), nothing
half-written.

All cases run in ONE fresh interpreter (`_RUNNER`), each through ``moco_ray.cli.main.main`` with its stderr
captured: a fresh process is what tells "no Ray was started" apart from the session's shared Ray instance, and
one process instead of one per case saves the torch/ray/mlflow import each time (tens of seconds on a busy 2-CPU
machine). Validation of the shard checks themselves lives in test_ingest.py; here only the user-facing line.
The one non-refusal here: ``moco-ray --version`` through the installed console script.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moco_helpers import REPO, cli_env, run_cli_cases
from PIL import Image

from moco_ray.version import __version__


@dataclass
class Case:
    argv: list[str]
    expect: str  # regex searched in the last stderr line
    must_not_exist: list[Path] = field(default_factory=list)  # outputs a failed command must not leave behind
    start_ray: bool = False


def _tiny_tree(image_root: Path, dst: Path, per_class: int, classes: int = 2) -> Path:
    """An ImageFolder of real images: `per_class` train and 2 test images for each of `classes` classes."""
    for split, n in (("train", per_class), ("test", 2)):
        for cls_dir in sorted((image_root / split).iterdir())[:classes]:
            (dst / split / cls_dir.name).mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                shutil.copyfile(f, dst / split / cls_dir.name / f.name)
    return dst


def _bad_image_tree(image_root: Path, dst: Path) -> Path:
    root = _tiny_tree(image_root, dst, per_class=2)
    cls = sorted((root / "train").iterdir())[0]
    buf = io.BytesIO()
    Image.open(next(cls.iterdir())).convert("RGB").resize((32, 32)).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    bad = {
        "zero.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "corrupt.jpg": jpeg[:4] + bytes(range(256)) * 4,  # a JPEG header, then garbage
        "notes.txt": b"not an image\n",
    }
    for name, data in bad.items():
        (cls / name).write_bytes(data)
    return root


def _fix_manifest(shard: dict, path: Path) -> None:
    """Make the manifest entry agree with the rewritten file, so only its content is wrong."""
    data = path.read_bytes()
    shard.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _damaged(shards: Path, dst: Path, how: str) -> Path:
    """A copy of `shards` with its first train shard damaged `how`; the manifest agrees unless `how` is truncate."""
    shutil.copytree(shards, dst)
    m = json.loads((dst / "manifest.json").read_text())
    s = next(s for s in m["shards"] if s["split"] == "train")
    path = dst / s["path"]
    table = pq.read_table(path)
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "missing_column":
        pq.write_table(table.drop_columns(["path", "id"]), path)
    elif how == "wrong_type":
        labels = pa.array([str(v) for v in table["label"].to_pylist()])
        pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", labels), path)
    elif how == "empty":
        m["shards"], m["counts"] = [], {k: 0 for k in m["counts"]}
    if how in ("missing_column", "wrong_type"):
        _fix_manifest(s, path)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(image_root, tmp_path_factory) -> Path:
    from moco_ray.data.ingest import ingest

    src = _tiny_tree(image_root, tmp_path_factory.mktemp("bad_input_src"), per_class=12)
    out = tmp_path_factory.mktemp("bad_input_shards") / "ok"
    ingest(src, out, progress=False)  # 24 train rows
    return out


def _store_with_experiment(empty_store: Path, db: Path, name: str, artifact_location: str) -> None:
    """A sqlite store at `db` (a copy of the migrated empty one) holding experiment `name` at `artifact_location`."""
    from mlflow.tracking import MlflowClient

    db.parent.mkdir(parents=True)
    shutil.copyfile(empty_store, db)
    MlflowClient(f"sqlite:///{db}").create_experiment(name, artifact_location=artifact_location)


@pytest.fixture(scope="module")
def cases(image_root, shards, tmp_path_factory, _empty_store) -> dict[str, Case]:
    t = tmp_path_factory.mktemp("bad_input")
    afile = t / "a_regular_file"
    afile.write_text("x")
    _store_with_experiment(_empty_store, t / "artifacts_blocked" / "mlflow.db", "blocked", f"{afile}/artifacts")
    (t / "export_db").mkdir()
    bad_src = _bad_image_tree(image_root, t / "bad_images")
    (t / "empty_images" / "train" / "a").mkdir(parents=True)
    (t / "no_images" / "train" / "a").mkdir(parents=True)
    (t / "no_images" / "train" / "a" / "notes.txt").write_text("not an image\n")

    def pretrain(
        name: str,
        *over: str,
        data: Path = shards,
        expect: str,
        clean: tuple[str, ...] = ("db", "runs"),
        resume: str = "",
        start_ray: bool = False,
    ) -> Case:
        """A pretrain case with its own MLflow store and storage path, which a failed run must not create."""
        d = t / name
        d.mkdir(exist_ok=True)
        paths = {"db": d / "mlflow.db", "runs": d / "runs"}
        where = [f"tracking.tracking_uri=sqlite:///{paths['db']}", f"train.storage_path={paths['runs']}"]
        if resume:
            argv = ["pretrain", "--resume", resume, *where]
        else:
            quick = ["-c", "experiments/quickstart.yaml", f"data.shards={data}", "data.source="]
            argv = ["pretrain", *quick, "train.batch_size=8", "moco.queue_size=64", *where, *over]
        return Case(argv, expect, [paths[k] for k in clean], start_ray)

    return {
        "ingest_bad_images_strict": Case(
            ["ingest", str(bad_src), str(t / "ingest_out"), "--strict", "--workers", "1"],
            r"4 bad image file\(s\) in (?=.*zero\.jpg)(?=.*truncated\.jpg)(?=.*corrupt\.jpg)(?=.*notes\.txt)",
            [t / "ingest_out"],
        ),
        # an empty class folder, refused as torchvision's ImageFolder does (mutation: without the refusal in
        # ImageFolderSource._listing this reads "no valid images found", and beside a class with images it ingests)
        "ingest_empty_folder": Case(
            ["ingest", str(t / "empty_images"), str(t / "empty_out")],
            r"empty_images: no files in class folder\(s\) train/a; an empty class would still take a label",
            [t / "empty_out"],
        ),
        "ingest_no_valid_image": Case(
            ["ingest", str(t / "no_images"), str(t / "no_images_out")], "no valid images found", [t / "no_images_out"]
        ),
        # #33: an output under a regular file names the file (mutation: without the check in ingest._check_out,
        # mkdir's "Not a directory" for the output; before #33 a raw NotADirectoryError line)
        "ingest_out_under_a_file": Case(
            ["ingest", str(bad_src), f"{afile}/sub/shards"],
            rf"{re.escape(str(afile))}/sub/shards: cannot create it \({re.escape(str(afile))} is not a directory\)",
        ),
        # #33: refused before the store is created or the encoder downloaded (mutation: without the target check in
        # jobs.export.export_run, the store is created and the line is "MLflow run '0123...' not found")
        "export_under_a_file": Case(
            [
                "export",
                "--run",
                "0123456789abcdef0123456789abcdef",
                "--tracking-uri",
                f"sqlite:///{t / 'export_db' / 'mlflow.db'}",
                f"{afile}/enc.pt",
            ],
            rf"export: cannot write {re.escape(str(afile))}/enc\.pt \({re.escape(str(afile))} is not a directory\)",
            [t / "export_db" / "mlflow.db"],
        ),
        "shards_missing": pretrain("shards_missing", data=t / "nowhere", expect=r"no manifest\.json"),
        "shard_truncated": pretrain(
            "shard_truncated",
            data=_damaged(shards, t / "trunc", "truncate"),
            expect=r"part-00000\.parquet has \d+ bytes, the manifest says \d+ \(truncated\?\)",
        ),
        "shard_missing_columns": pretrain(
            "shard_missing_columns",
            data=_damaged(shards, t / "cols", "missing_column"),
            expect=r"missing column\(s\) id, path",
        ),
        "shard_wrong_schema": pretrain(
            "shard_wrong_schema",
            data=_damaged(shards, t / "schema", "wrong_type"),
            expect=r"column 'label' has type string, expected int64",
        ),
        "dataset_empty": pretrain("dataset_empty", data=_damaged(shards, t / "empty", "empty"), expect="empty dataset"),
        "dataset_smaller_than_batch": pretrain(
            "dataset_smaller_than_batch",
            "train.batch_size=32",
            expect=r"split 'train' has 24 rows, fewer than one global batch \(train\.batch_size = 32\)",
        ),
        "unknown_arch": pretrain(
            "unknown_arch", "model.arch=resnet9000", expect=r"model\.arch: 'resnet9000' is out of range"
        ),
        "unknown_field": pretrain("unknown_field", "moco.queue=5", expect=r"unknown config field moco\.queue"),
        "queue_size_zero": pretrain(
            "queue_size_zero", "moco.queue_size=0", expect=r"moco\.queue_size: 0 is out of range"
        ),
        "queue_size_not_int": pretrain(
            "queue_size_not_int", "moco.queue_size=lots", expect=r"moco\.queue_size: expected an integer"
        ),
        "momentum_negative": pretrain(
            "momentum_negative", "moco.momentum=-0.1", expect=r"moco\.momentum: -0\.1 is out of range"
        ),
        "temperature_zero": pretrain(
            "temperature_zero", "moco.temperature=0", expect=r"moco\.temperature: 0\.0 is out of range"
        ),
        "lr_negative": pretrain("lr_negative", "optim.lr=-1", expect=r"optim\.lr: -1\.0 is out of range"),
        "epochs_zero": pretrain(
            "epochs_zero", "train.epochs=0", "optim.warmup_epochs=0", expect=r"train\.epochs: 0 is out of range"
        ),
        "queue_smaller_than_batch": pretrain(
            "queue_smaller_than_batch",
            "moco.queue_size=16",
            "train.batch_size=32",
            expect=r"moco\.queue_size: 16 is out of range; allowed: >= the global batch \(train\.batch_size = 32\)",
        ),
        # MLflow's own limits on experiment names, checked with the config (mutation: without
        # config.check_experiment_name both fail after Ray started, in a long MLflow traceback)
        "experiment_empty": pretrain(
            "experiment_empty",
            "tracking.experiment=",
            expect=r"tracking\.experiment: '' is out of range; allowed: 1 to 500 characters",
        ),
        "experiment_too_long": pretrain(
            "experiment_too_long",
            "tracking.experiment=" + "x" * 501,
            expect=r"tracking\.experiment: 'x{40}'\.\.\. \(501 characters\) is out of range; allowed: 1 to 500",
        ),
        "mlflow_unreachable": pretrain(
            "mlflow_unreachable",
            f"tracking.tracking_uri=http://127.0.0.1:{_closed_port()}",
            expect=r"tracking\.tracking_uri: MLflow server http://127\.0\.0\.1:\d+ is unreachable",
        ),
        "storage_under_a_file": pretrain(
            "storage_under_a_file",
            f"train.storage_path={afile}/sub",
            expect=rf"train\.storage_path: cannot write {re.escape(str(afile))}/sub \(.* is not a directory\)",
        ),
        # #33: the experiment's artifact location checked before Ray (tracking.store.check_artifact_location, called
        # from jobs.resolve.check_targets; mutation: without that call the run is created after Ray started, fails
        # on its config.yaml and stays RUNNING)
        "artifact_location_under_a_file": pretrain(
            "artifacts_blocked",
            "tracking.experiment=blocked",
            expect=rf"tracking\.experiment 'blocked': cannot write the MLflow artifact location "
            rf"{re.escape(str(afile))}/artifacts \({re.escape(str(afile))} is not a directory\)",
            clean=("runs",),
        ),
        "sqlite_store_under_a_file": pretrain(
            "sqlite_store_under_a_file",
            f"tracking.tracking_uri=sqlite:///{afile}/mlflow.db",
            expect=r"tracking\.tracking_uri: cannot write the sqlite store",
        ),
        # looking the run up creates the (empty) MLflow store; nothing else may appear
        "resume_unknown_run": pretrain(
            "resume_unknown_run",
            resume="0123456789abcdef0123456789abcdef",
            expect=r"MLflow run '0123456789abcdef0123456789abcdef' not found",
            clean=("runs",),
        ),
        # the one check that needs the cluster (to count its GPUs): run on a started Ray without any
        "gpu_without_gpus": pretrain(
            "gpu_without_gpus",
            "train.use_gpu=true",
            expect=r"train\.use_gpu: 2 GPU worker\(s\) asked for but the Ray cluster has 0 GPU\(s\)",
            clean=("runs",),
            start_ray=True,
        ),
    }


@pytest.fixture(scope="module")
def results(cases, tmp_path_factory) -> dict[str, dict]:
    t = tmp_path_factory.mktemp("bad_input_run")
    return run_cli_cases({k: {"argv": v.argv, "start_ray": v.start_ray} for k, v in cases.items()}, t)


CASE_NAMES = [
    "ingest_bad_images_strict",
    "ingest_empty_folder",
    "ingest_no_valid_image",
    "ingest_out_under_a_file",
    "export_under_a_file",
    "shards_missing",
    "shard_truncated",
    "shard_missing_columns",
    "shard_wrong_schema",
    "dataset_empty",
    "dataset_smaller_than_batch",
    "unknown_arch",
    "unknown_field",
    "queue_size_zero",
    "queue_size_not_int",
    "momentum_negative",
    "temperature_zero",
    "lr_negative",
    "epochs_zero",
    "queue_smaller_than_batch",
    "experiment_empty",
    "experiment_too_long",
    "mlflow_unreachable",
    "storage_under_a_file",
    "artifact_location_under_a_file",
    "sqlite_store_under_a_file",
    "resume_unknown_run",
    "gpu_without_gpus",
]


def test_every_case_is_listed(cases):
    assert sorted(cases) == sorted(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_clear_line(name, cases, results):
    case, r = cases[name], results[name]
    err = r["stderr"]
    assert r["rc"] == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("moco-ray: error: "), err
    assert re.search(case.expect, last), last
    # checked before any cluster resource is requested; only the GPU check needs the (GPU-less) cluster
    assert r["ray_started"] is case.start_ray
    for p in case.must_not_exist:
        assert not p.exists(), f"{name} left {p} behind"


def test_gpu_request_leaves_no_running_mlflow_run(cases, results):
    """The GPU check fails fast (a hang would hit the runner's timeout) and no MLflow run is left RUNNING."""
    from mlflow.tracking import MlflowClient

    assert results["gpu_without_gpus"]["rc"] == 2
    uri = next(a.split("=", 1)[1] for a in cases["gpu_without_gpus"].argv if a.startswith("tracking.tracking_uri="))
    c = MlflowClient(uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(exps) if exps else []
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []


def test_unwritable_artifact_location_creates_no_run(cases, results):
    """Refused before the run exists: the experiment holds no run at all (before #33 one stayed RUNNING)."""
    from mlflow.tracking import MlflowClient

    assert results["artifact_location_under_a_file"]["rc"] == 2
    uri = next(a.split("=", 1)[1] for a in cases["artifact_location_under_a_file"].argv if "tracking_uri=" in a)
    c = MlflowClient(uri)
    assert c.search_runs([c.get_experiment_by_name("blocked").experiment_id]) == []


def test_version_through_the_console_script():
    """``moco-ray --version`` prints ``moco-ray <version>`` on stdout and exits 0, through the installed console
    script (mutation: without the --version argument argparse refuses it: exit 2, usage on stderr)."""
    script = Path(sys.executable).with_name("moco-ray")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "moco_ray.cli.main"]
    p = subprocess.run([*cmd, "--version"], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stdout, p.stderr) == (0, f"moco-ray {__version__}\n", "")


def test_a_refused_pretrain_config_loads_no_torch():
    """A bad value is refused by the config layer before the job module (torch, Ray, mlflow) loads: a fraction of
    a second instead of seconds on a busy machine. Mutation caught: ``cmd_pretrain`` without its early
    ``load_config`` (the refusal then came from ``run_pretraining``, after torch loaded)."""
    code = (
        "import sys\nfrom moco_ray.cli.main import main\n"
        "rc = main(['pretrain', 'moco.queue_size=-1'])\n"
        "print(rc, sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=120
    )
    assert p.stdout.split("\n")[-2] == "2 []", p.stdout + p.stderr
    assert p.stderr.strip() == "moco-ray: error: moco.queue_size: -1 is out of range; allowed: > 0"
