"""Progress lines with an ETA (features, kNN, probes): duration formatting and line cadence, on a fake clock."""

from __future__ import annotations

from moco_helpers import FakeClock as Clock

from moco_ray.evaluation.progress import Progress, eta_seconds, format_duration


def test_format_duration_and_eta():
    assert [format_duration(s) for s in (0, 42.4, 185, 3720, 90061)] == ["0s", "42s", "3m05s", "1h02m", "25h01m"]
    assert format_duration(float("inf")) == "?" and format_duration(float("nan")) == "?"
    assert eta_seconds(0, 10, 5.0) == float("inf")
    assert eta_seconds(25, 100, 50.0) == 150.0  # 2 s an item, 75 left


def test_progress_lines_at_most_every_min_seconds_and_at_the_end():
    clock, lines = Clock(), []
    bar = Progress("features train: rows", 1000, lines.append, every=1, min_seconds=30, clock=clock)
    for _ in range(10):  # 100 rows every 10 s: a line every 30 s, then the last one
        clock.t += 10
        bar.update(100)
    assert lines == [
        "features train: rows 300/1000 (30%)  ETA 1m10s",
        "features train: rows 600/1000 (60%)  ETA 40s",
        "features train: rows 900/1000 (90%)  ETA 10s",
        "features train: rows 1000/1000 (100%)  took 1m40s",
    ]
