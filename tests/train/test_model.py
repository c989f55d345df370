"""build_method: the config's method around a torchvision encoder."""

from __future__ import annotations

from moco_ray.config import load_config
from moco_ray.core.shuffle_bn import SplitBatchNorm
from moco_ray.train.model import build_method


def test_build_method_uses_split_bn_for_one_worker():
    cfg = load_config(None, ["train.batch_size=16", "moco.queue_size=32", "model.small_stem=true"])
    model = build_method(cfg)
    assert model.bn_mode == "split"
    assert any(isinstance(mod, SplitBatchNorm) for mod in model.encoder_q.modules())
