"""BackboneSpec: the one description of how to build a backbone, resolved from its fields and read back from
encoder.json (old files with arch + small_stem only included)."""

from __future__ import annotations

import json

import pytest

from moco_ray.config import load_config
from moco_ray.core.backbone_spec import BackboneSpec, as_spec


def test_zero_fields_take_the_archs_values():
    spec = BackboneSpec.resolve("vit_base", image_size=224)
    assert (spec.patch_size, spec.embed_dim, spec.depth, spec.num_heads, spec.feature_dim) == (16, 768, 12, 12, 768)
    tiny = BackboneSpec.resolve("vit_small", False, 32, 4, 64, 2, 4)
    assert (tiny.img_size, tiny.patch_size, tiny.embed_dim, tiny.depth, tiny.num_heads) == (32, 4, 64, 2, 4)
    assert tiny.feature_dim == 64


def test_resnets_ignore_the_vit_fields():
    assert BackboneSpec.resolve("resnet18", True, 32, 4, 64, 2, 4) == BackboneSpec("resnet18", True)
    assert as_spec("resnet50") == BackboneSpec("resnet50") and as_spec("resnet50").feature_dim == 2048
    with pytest.raises(ValueError, match="unknown architecture 'vit_huge'"):
        BackboneSpec.resolve("vit_huge")


def test_config_is_the_one_place_fields_become_a_spec():
    cfg = load_config(
        None,
        ["model.arch=vit_small", "aug.image_size=32", "model.patch_size=4", "model.vit_width=64",
         "model.vit_depth=2", "model.vit_heads=4", "model.stop_grad_conv1=true"],
    )  # fmt: skip
    assert cfg.backbone == BackboneSpec("vit_small", False, 32, 4, 64, 2, 4, True)
    assert load_config(None, ["model.small_stem=true"]).backbone == BackboneSpec("resnet18", True)


def test_encoder_json_round_trip_and_old_files():
    """Mutation checked: from_info ignoring ``backbone`` (resolving from arch alone) fails the ViT round trip."""
    vit = BackboneSpec.resolve("vit_small", False, 32, 4, 64, 2, 4, True)
    info = json.loads(json.dumps(vit.to_info()))
    assert BackboneSpec.from_info(info) == vit
    assert info["arch"] == "vit_small" and info["feature_dim"] == 64 and info["small_stem"] is False
    assert info["timm_kwargs"] == {
        "img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4, "num_classes": 0,
    }  # fmt: skip
    old = {"arch": "resnet18", "small_stem": True, "feature_dim": 512}  # written before ViTs
    assert BackboneSpec.from_info(old) == BackboneSpec("resnet18", True)
    assert "timm_kwargs" not in BackboneSpec("resnet18", True).to_info()
