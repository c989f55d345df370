"""``export_run`` to ``OUT_DIR/`` (trailing separator, directory not there yet) writes a file inside a new directory;
exported files get the user's umask (0666 less it), not a temp file's private 0600."""

from __future__ import annotations

import os
import stat

import pytest
from moco_helpers import TINY_MODEL, log_like_trainer


@pytest.fixture
def run_id(mlflow_uri):
    import torch

    from moco_ray.config import load_config
    from moco_ray.core.backbone_io import backbone_of
    from moco_ray.train.model import build_method

    cfg = load_config(None, {**TINY_MODEL, "tracking.experiment": "export-dir"})
    torch.manual_seed(0)
    return log_like_trainer(mlflow_uri, cfg, backbone_of(build_method(cfg)), "export-dir")


def test_trailing_slash_is_a_new_directory_and_mode_follows_umask(run_id, mlflow_uri, tmp_path):
    from moco_ray.jobs.export import export_run

    old = os.umask(0o027)
    try:
        res = export_run(run_id, "torchvision", f"{tmp_path / 'out'}/", tracking_uri=mlflow_uri)
    finally:
        os.umask(old)
    assert (tmp_path / "out").is_dir()
    assert res.path == tmp_path / "out" / f"{run_id}-torchvision.pt" and res.path.is_file()
    assert stat.S_IMODE(res.path.stat().st_mode) == 0o640
    assert [p.name for p in (tmp_path / "out").iterdir()] == [res.path.name]  # no temp file left


def test_path_without_slash_is_still_a_file(run_id, mlflow_uri, tmp_path):
    from moco_ray.jobs.export import export_run

    res = export_run(run_id, "detectron2", tmp_path / "enc.pkl", tracking_uri=mlflow_uri)
    assert res.path == tmp_path / "enc.pkl" and res.path.is_file()
