"""Shard splits as MLflow dataset inputs: the runs table's "Dataset" column and the run's lineage.

One input per split a run reads: name ``<shard dir>/<split>``, digest = the start of the manifest's fingerprint
(MLflow's digest column holds 36 characters; the full fingerprint is in the profile), source = the split's URI,
profile = the split's rows and classes plus every split's counts. Contexts follow MLflow's convention
(``training`` / ``evaluation``), so the UI labels them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath

from moco_ray.data.manifest import Manifest

DIGEST_CHARS = 16
TRAINING, EVALUATION = "training", "evaluation"


def manifest_digest(manifest: Manifest) -> str:
    """The manifest's fingerprint, shortened; a hash of the shard hashes for a manifest written without one."""
    fp = manifest.fingerprint or hashlib.sha256("".join(s.sha256 for s in manifest.shards).encode()).hexdigest()
    return fp[:DIGEST_CHARS]


def _split_uri(manifest: Manifest, split: str) -> str:
    root = manifest.root.rstrip("/")
    return f"{root}/{split}" if root else split


def split_dataset(manifest: Manifest, split: str):
    """The MLflow ``Dataset`` entity of one split of the shards at ``manifest.root``."""
    from mlflow.entities import Dataset  # lazy: Ray workers import this module on every rank; mlflow only if used

    manifest.require_split(split)
    uri = _split_uri(manifest, split)
    profile = {
        "num_rows": manifest.counts[split],
        "num_classes": len(manifest.classes),
        "split": split,
        "splits": dict(manifest.counts),
        "fingerprint": manifest.fingerprint,
        "data_source": manifest.source,
    }
    name = f"{PurePosixPath(manifest.root.rstrip('/')).name or 'shards'}/{split}"
    return Dataset(
        name=name,
        digest=manifest_digest(manifest),
        source_type="local" if "://" not in uri else uri.split("://", 1)[0],
        source=json.dumps({"uri": uri}),
        schema=json.dumps({"columns": ["image", "label", "id", "path"]}),
        profile=json.dumps(profile),
    )


def log_split_inputs(client, run_id: str, manifest: Manifest, contexts: dict[str, str]) -> None:
    """Log ``{split: context}`` of the shards as the run's dataset inputs (one ``log_inputs`` call)."""
    from mlflow.entities import DatasetInput, InputTag  # lazy: as in split_dataset
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT  # lazy: as in split_dataset

    inputs = [
        DatasetInput(split_dataset(manifest, split), tags=[InputTag(MLFLOW_DATASET_CONTEXT, ctx)])
        for split, ctx in contexts.items()
    ]
    if not inputs:
        return
    try:
        client.log_inputs(run_id, datasets=inputs)
    except Exception as e:
        # MLflow's get-or-create of the dataset row is not atomic: two runs logging the same shards at once (sweep
        # trials starting together) race, and the loser gets "UNIQUE constraint failed: datasets..." (IntegrityError
        # on a server). The row exists now; the retry links it.
        if "UNIQUE constraint failed" not in str(e) and "IntegrityError" not in str(e):
            raise
        client.log_inputs(run_id, datasets=inputs)
