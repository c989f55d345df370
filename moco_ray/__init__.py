"""moco-ray: MoCo self-supervised pretraining orchestrated with Ray, tracked with MLflow.

The Python API (imports are lazy so ``import moco_ray`` stays cheap and Ray-free):

    from moco_ray import pretrain, load_encoder, sweep, load_config
    from moco_ray import evaluate_knn, evaluate_linear, export_run, import_checkpoint
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moco_ray.version import __version__

__all__ = [
    "Config",
    "load_config",
    "pretrain",
    "load_encoder",
    "sweep",
    "evaluate_knn",
    "evaluate_linear",
    "export_run",
    "import_checkpoint",
    "__version__",
]

if TYPE_CHECKING:
    from moco_ray.api import (
        evaluate_knn,
        evaluate_linear,
        export_run,
        import_checkpoint,
        load_encoder,
        pretrain,
        sweep,
    )
    from moco_ray.config import Config, load_config


def __getattr__(name: str) -> Any:
    if name in ("Config", "load_config"):
        from moco_ray import config  # lazy: `import moco_ray` stays cheap (PEP 562 attribute)

        return getattr(config, name)
    if name in __all__:
        from moco_ray import api  # lazy: `import moco_ray` stays cheap and Ray-free (PEP 562 attribute)

        return getattr(api, name)
    raise AttributeError(f"module 'moco_ray' has no attribute {name!r}")
