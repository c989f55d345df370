"""The drivers' explicit ingest step (`ingest_missing_shards`) and `prepare`, which only checks (no Ray here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moco_ray.config import Config, load_config
from moco_ray.jobs.resolve import ingest_missing_shards, prepare, with_absolute_paths

REPO = Path(__file__).resolve().parents[2]
NOTICE = "moco-ray: ingesting digits into {} (first run; later runs reuse the shards)"


def _quickstart(tmp_path: Path, **overrides: str) -> Config:
    """experiments/quickstart.yaml (what a bare `moco-ray pretrain` runs) with everything it writes under tmp_path."""
    paths = {
        "data.shards": str(tmp_path / "digits-shards"),
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "train.storage_path": str(tmp_path / "runs"),
    }
    return with_absolute_paths(load_config(REPO / "experiments" / "quickstart.yaml", {**paths, **overrides}))


def test_quickstart_ingests_once_announced_then_prepare_checks(tmp_path, capsys):
    cfg = _quickstart(tmp_path)
    with pytest.raises(ValueError, match="no manifest.json"):
        prepare(cfg)  # checks only: it never ingests
    assert not (tmp_path / "digits-shards").exists() and not (tmp_path / "mlflow.db").exists()
    manifest = ingest_missing_shards(cfg)
    assert manifest is not None and manifest.counts == {"train": 1438, "test": 359}
    assert capsys.readouterr().out.splitlines() == [NOTICE.format(cfg.data.shards)]
    assert not (tmp_path / "mlflow.db").exists()  # the sqlite store comes last, in prepare
    assert ingest_missing_shards(cfg) is None  # a manifest is there: nothing to do, nothing said
    assert capsys.readouterr().out == ""
    prep = prepare(cfg)
    assert prep.manifest.counts == manifest.counts and (tmp_path / "mlflow.db").is_file()
    assert ingest_missing_shards(cfg, prep) is None and prepare(cfg, prep) is prep


def test_refused_input_is_refused_before_anything_is_ingested(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    refused = {
        "tracking.tracking_uri": (f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}", "cannot write the sqlite store"),
        "train.storage_path": (str(tmp_path / "file" / "runs"), "train.storage_path: cannot write"),
        "data.shards": ("", "data.shards: no dataset given"),
    }
    for key, (value, message) in refused.items():
        with pytest.raises(ValueError, match=message):
            ingest_missing_shards(_quickstart(tmp_path, **{key: value}))
    assert not (tmp_path / "digits-shards").exists() and not (tmp_path / "mlflow.db").exists()
    assert "ingesting" not in capsys.readouterr().out


def test_no_source_no_ingest(tmp_path):
    cfg = _quickstart(tmp_path, **{"data.source": ""})
    assert ingest_missing_shards(cfg) is None
    assert not (tmp_path / "digits-shards").exists()
