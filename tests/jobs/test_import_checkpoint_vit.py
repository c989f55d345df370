"""import_checkpoint on moco-v3 ViT files: the official weights become an MLflow run whose encoder artifact holds
them bit for bit and loads strictly into timm's own VisionTransformer (real sqlite store, read back)."""

from __future__ import annotations

import json

import torch
from official_layouts import official_vit_checkpoint, query_backbone
from timm.models.vision_transformer import VisionTransformer

from moco_ray.jobs.import_checkpoint import import_checkpoint
from moco_ray.tracking.run_log import RunLog


def test_vit_small_checkpoint_imports_bit_for_bit(tmp_path, mlflow_uri):
    """The file names its arch (main_moco.py saves ``'arch': args.arch``), so no --arch is needed.
    Mutation checked: from_official applying the ResNet rule (drop ``fc.*``) to a ViT fails the import here."""
    ckpt = official_vit_checkpoint("vit_small", epoch=300)
    src = tmp_path / "vit-s-300ep.pth.tar"
    torch.save(ckpt, src)
    res = import_checkpoint(src, tracking_uri=mlflow_uri)
    assert res.arch == "vit_small" and res.method == "moco_v3" and res.epoch == 300
    enc = RunLog(mlflow_uri, res.run_id).encoder()
    want = query_backbone(ckpt)
    assert list(enc.state) == list(want)
    assert all(enc.state[k].dtype == v.dtype and torch.equal(enc.state[k], v) for k, v in want.items())
    info = json.loads((RunLog(mlflow_uri, res.run_id).download("encoder/encoder.json", tmp_path / "dl")).read_text())
    assert info["timm_kwargs"] == {
        "img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 12, "num_classes": 0,
    }  # fmt: skip
    VisionTransformer(**info["timm_kwargs"], weight_init="skip").load_state_dict(enc.state, strict=True)
