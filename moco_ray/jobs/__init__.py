"""The drivers: resolve a job on the driver, start or join Ray, run it, record it in MLflow.

``pretrain`` (one TorchTrainer run), ``evaluate`` (kNN / linear probe of a run's encoder), ``export`` (a run's
encoder to a file or the Model Registry); sweeps live in ``moco_ray.tuning``. This package imports nothing, so
``local_ray``'s worker hook stays cheap in every Ray worker.
"""
