"""Smoke test of benchmarks/bench_views.py: tiny sizes, both columns, sane JSON; no timing assertions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_views  # noqa: E402

pytestmark = pytest.mark.usefixtures("restore_threads")


def test_bench_views_tiny_writes_sane_json(tmp_path):
    out = tmp_path / "views.json"
    res = bench_views.main(
        ["--cifar-images", "16", "--photos", "4", "--rounds", "1", "--batch", "8", "--out", str(out)]
    )
    saved = json.loads(out.read_text())
    assert set(saved["cases"]) == {"32", "224"}
    for size, case in saved["cases"].items():
        assert case["image_size"] == int(size)
        assert case["images"] == (16 if size == "32" else 4)
        assert case["plain_pairs_per_s"] > 0 and case["ours_pairs_per_s"] > 0
        assert case["ratio"] == pytest.approx(case["ours_pairs_per_s"] / case["plain_pairs_per_s"])
        assert case["cpu_s"]["plain"] > 0 and case["cpu_s"]["ours"] > 0
    assert saved["cpu_model"] and saved["results_line"] == res["results_line"]
    assert res["results_line"].startswith("| ") and "224 px: plain" in res["results_line"]


def test_photo_jpegs_are_imagenet_sized_real_photos():
    import io

    from PIL import Image

    photos, what = bench_views.photo_jpegs(6)
    assert "china" in what and len(photos) == 6
    for data in photos:
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG" and im.size in {(500, 375), (375, 500)}
