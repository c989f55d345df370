"""The results table and the best trial from typed trial rows (no Ray, no MLflow)."""

from __future__ import annotations

import math

from moco_ray.tuning.reconcile import TrialRow
from moco_ray.tuning.results import pick_best, results_table


def _rows() -> list[TrialRow]:
    return [
        TrialRow(
            "t1", {"moco.queue_size": 128}, "r1", "finished", last_result={"epoch": 2, "loss": 5.0, "knn_top1": 0.4},
            curves={"loss": [(0, 6.0), (1, 5.0)], "knn_top1": [(0, 0.5), (1, 0.4)]},
        ),
        TrialRow(
            "t2", {"moco.queue_size": 256}, "r2", "stopped_early",
            last_result={"epoch": 1, "loss": 4.0, "knn_top1": 0.9},
            curves={"loss": [(0, 4.0)], "knn_top1": [(0, 0.9)]},
        ),
        TrialRow("t3", {"moco.queue_size": 512}, "r3", "failed", "RuntimeError: boom"),
    ]  # fmt: skip


def test_table_has_one_row_per_trial_with_final_and_best_values():
    t = results_table(_rows(), ["moco.queue_size"], "knn_top1", "max")
    assert list(t["trial_id"]) == ["t1", "t2", "t3"] and list(t["state"]) == ["finished", "stopped_early", "failed"]
    assert list(t["param:moco.queue_size"]) == [128, 256, 512] and list(t["epochs_done"]) == [2, 1, 0]
    assert list(t["final_loss"][:2]) == [5.0, 4.0] and math.isnan(t["final_loss"][2])
    assert list(t["best_knn_top1"][:2]) == [0.5, 0.9]  # the best epoch, not the last
    assert list(t.columns)[-1] == "error" and t["error"][2] == "RuntimeError: boom"
    assert {c for c in t.columns if c.startswith("final_")} == {"final_loss", "final_acc1", "final_knn_top1"}


def test_finished_trials_win_over_stopped_ones():
    t = results_table(_rows(), ["moco.queue_size"], "knn_top1", "max")
    best = pick_best(t, "knn_top1", "max")
    assert best["trial_id"] == "t1" and best["params"] == {"moco.queue_size": 128} and best["value"] == 0.4
    only_stopped = t[t["state"] != "finished"]
    assert pick_best(only_stopped, "knn_top1", "max")["trial_id"] == "t2"
    assert pick_best(t[t["state"] == "failed"], "knn_top1", "max") == {}


def test_a_row_reads_its_last_report():
    row = _rows()[0]
    assert row.name == "queue_size=128" and row.epochs_done == 2 and row.final("loss") == 5.0
    assert row.final("acc1") is None
