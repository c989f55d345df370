"""MLflow tracking (thin): runs, params, per-epoch metrics, artifacts and plots."""
