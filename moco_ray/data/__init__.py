"""Parquet shards and the view-pair stream.

Modules (import them directly; this package imports nothing, so ``import moco_ray.data`` stays free of Ray):
``ingest`` (SOURCE -> shards + manifest), ``schema`` (shard checks), ``manifest``, ``sources``, ``decode``,
``augment`` / ``gpu_augment`` (views), ``stream`` (Ray Data view pairs), ``digits`` (offline sample data).
"""
