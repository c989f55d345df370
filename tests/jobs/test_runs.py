"""`moco-ray runs`: an experiment's runs read back from a real MLflow store, as rows and as the printed table."""

from __future__ import annotations

import pytest

from moco_ray.cli.main import main
from moco_ray.jobs.evaluate import EVAL_TAG
from moco_ray.jobs.runs import experiment_runs, format_table, sort_rows
from moco_ray.tracking.run_log import create_run


def _run(uri: str, name: str, params: dict, metrics: dict, status: str = "FINISHED", parent: str | None = None):
    log = create_run(uri, "table", name, params, {EVAL_TAG: "linear"} if parent else {}, None, parent)
    for step, (k, v) in enumerate(metrics.items()):
        log.log_step_metrics({k: v}, step)
    log.finish(status)
    return log.run_id


@pytest.fixture
def store(mlflow_uri) -> str:
    base = {"moco.method": "moco_v2", "moco.queue_size": 4096, "moco.momentum": 0.999, "moco.temperature": 0.2}
    a = _run(mlflow_uri, "a", {**base, "train.epochs": 4}, {"loss": 6.1, "knn_top1": 0.31})
    _run(mlflow_uri, "b", {**base, "moco.queue_size": 1024, "train.epochs": 4}, {"loss": 5.2, "knn_top1": 0.42})
    _run(mlflow_uri, "c", {**base, "train.epochs": 8}, {"loss": 7.0}, status="KILLED")  # no kNN yet: blank
    _run(mlflow_uri, "a-linear", {"protocol": "linear"}, {"linear_top1": 0.5}, parent=a)  # folded into "a"
    return mlflow_uri


def test_rows_sort_and_blanks(store):
    """Mutations caught: evaluation child runs not filtered (4 rows); blanks sorted among values (a TypeError or
    "c" first); loss sorted best-last (descending)."""
    rows = experiment_runs("table", store)
    assert sorted(r.name for r in rows) == ["a", "b", "c"]
    assert [r.name for r in sort_rows(rows, "knn_top1")] == ["b", "a", "c"]  # best first, blank last
    assert [r.name for r in sort_rows(rows, "knn_top1", reverse=True)] == ["a", "b", "c"]
    assert [r.name for r in sort_rows(rows, "loss")] == ["b", "a", "c"]  # lowest loss first
    assert sort_rows(rows, "K")[0].name == "b"
    assert [r.name for r in sort_rows(rows)] == ["c", "b", "a"]  # newest first
    by_name = {r.name: r for r in rows}
    assert by_name["c"].state == "KILLED" and by_name["c"].values["knn_top1"] is None
    assert by_name["b"].values["K"] == "1024" and by_name["b"].values["knn_top1"] == pytest.approx(0.42)


def test_cli_prints_the_table(store, capsys):
    """Through the console script's `main`: a header, one line per run in the asked order, blanks blank; an
    unknown experiment or column is one line, exit 2."""
    assert main(["runs", "table", "--sort", "knn_top1", "--tracking-uri", store]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["run_id", "name", "state", "method", "K", "m", "T", "epochs", "loss", "knn_top1",
                                "eval_linear_top1"]  # fmt: skip
    assert [line.split()[1] for line in lines[1:]] == ["b", "a", "c"]
    assert lines[1].split()[3:] == ["moco_v2", "1024", "0.999", "0.2", "4", "5.2", "0.42"]
    assert main(["runs", "nope", "--tracking-uri", store]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no experiment 'nope'" in err and "table" in err, err


def test_the_cli_offers_every_sortable_column():
    """The parser's --sort choices are the module's columns (a column added to one and not the other fails)."""
    from moco_ray.cli.main import build_parser
    from moco_ray.jobs.runs import SORTABLE

    runs = build_parser()._subparsers._group_actions[0].choices["runs"]
    (sort,) = [a for a in runs._actions if a.dest == "sort"]
    assert tuple(sort.choices) == SORTABLE


def test_format_table_aligns_columns():
    rows = sort_rows([], "start")
    assert format_table(rows).split() == ["run_id", "name", "state", "method", "K", "m", "T", "epochs", "loss",
                                          "knn_top1", "eval_linear_top1"]  # fmt: skip
