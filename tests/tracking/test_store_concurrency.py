"""Several processes opening one fresh sqlite MLflow store at once (two `moco-ray pretrain` started together).

Without the lock around the store's creation, each process sees a database without (all) its tables and runs
MLflow's alembic migrations; all but one crash. Real processes (spawned, so each builds its own MLflow store),
real sqlite file; no Ray.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

N_PROCS = 3


def _open_and_log(uri: str, i: int, start, out) -> None:
    """Wait for the others, then open the store and create a run in one shared experiment."""
    try:
        from moco_ray.tracking.run_log import create_run
        from moco_ray.tracking.store import open_store

        start.wait(timeout=60)
        resolved = open_store(uri)
        log = create_run(resolved, "concurrent", f"run-{i}", {"i": i}, {}, "a: 1\n")
        log.finish("FINISHED")
        out.put((i, log.run_id, ""))
    except BaseException as e:  # reported to the parent: a crash in a child must fail the test with its message
        out.put((i, "", f"{type(e).__name__}: {e}"))


def _run_together(uri: str, n: int) -> list[tuple[int, str, str]]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_and_log, args=(uri, i, start, out)) for i in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return sorted(results)


def test_processes_create_one_fresh_store_together(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = _run_together(uri, N_PROCS)
    assert [err for _, _, err in results] == [""] * N_PROCS, results
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("concurrent")
    runs = c.search_runs([exp.experiment_id])
    assert {r.info.run_id for r in runs} == {rid for _, rid, _ in results}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert (tmp_path / "mlflow.db.lock").is_file()


def test_lock_file_left_behind_does_not_block_later_use(tmp_path):
    """A store created under the lock is used again (lock file still there), through open_store and plain MLflow."""
    from mlflow.tracking import MlflowClient

    from moco_ray.tracking.run_log import create_run
    from moco_ray.tracking.store import open_store, store_lock

    uri = open_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert Path(f"{tmp_path / 'mlflow.db'}.lock").is_file()
    with store_lock(uri):  # taken and released again: not held by the first open_store
        pass
    assert open_store(uri) == uri
    run_id = create_run(uri, "again", "first", {}, {}, "").run_id
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"


def test_unusable_sqlite_file_is_one_clear_error(tmp_path):
    import pytest

    bad = tmp_path / "mlflow.db"
    bad.write_text("not a database, just text\n" * 100)
    with pytest.raises(ValueError, match="cannot open the sqlite store") as e:
        from moco_ray.tracking.store import open_store

        open_store(f"sqlite:///{bad}")
    assert "\n" not in str(e.value)
