"""Parquet shards and the view-pair stream.

Modules (import them directly; this package imports nothing, so ``import moco_ray.data`` stays free of Ray):
``ingest`` (SOURCE -> shards + manifest), ``schema`` (shard checks), ``manifest`` (+ rows and steps per epoch),
``sources``, ``decode`` (+ the corrupt-image rule), ``augment`` / ``gpu_augment`` (view ops), ``views`` (the
per-batch decode + views of the stream), ``stream`` (Ray Data view pairs), ``eval_images`` (a split decoded in
process, for evaluation), ``digits`` (offline sample data), ``arrays`` (an image folder as arrays).
"""
