"""Where a finished run is shown: its experiment, and its page on the MLflow UI's training view.

MLflow 3.17's UI opens an experiment on the GenAI overview whatever its ``mlflow.experimentKind`` tag says, once
the browser has kept the GenAI switch; the ``workflowType=machine_learning`` query parameter overrides it. The
route form and the parameter are pinned against the installed UI's JS bundle, so a new MLflow that changes them
fails here, not in a user's browser.
"""

from __future__ import annotations

from pathlib import Path

import mlflow

from moco_ray.tracking.store import TRAINING_VIEW_QUERY, UI_PORT, run_page, where_to_look


def _bundle() -> str:
    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    (main,) = js.glob("main.*.js")
    return main.read_text(errors="replace")


def test_run_page_route_is_the_installed_ui_s():
    """Mutation checked by hand: a browser-router URL (no ``#/``) or the parameter spelled ``workflow=...``
    failed the asserts below."""
    bundle = _bundle()
    assert "createHashRouter" in bundle  # routes live after "#/"
    assert "getRunPageRoute(e,t){return`/experiments/${e}/runs/${t}`}" in bundle
    assert 'e.get("workflowType")' in bundle and 'MACHINE_LEARNING="machine_learning"' in bundle
    assert TRAINING_VIEW_QUERY == "workflowType=machine_learning"
    assert run_page("https://mlflow.example.org/", "7", "abc") == (
        "https://mlflow.example.org/#/experiments/7/runs/abc?workflowType=machine_learning"
    )


def test_where_to_look_for_a_local_store(mlflow_uri):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(mlflow_uri)
    exp_id = c.create_experiment("where")
    run_id = c.create_run(exp_id).info.run_id
    assert where_to_look(mlflow_uri, run_id) == [
        "experiment: where",
        f"see it: mlflow ui --backend-store-uri {mlflow_uri} --host 127.0.0.1 --port {UI_PORT}",
        f"  then open http://127.0.0.1:{UI_PORT}/#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning",
    ]
