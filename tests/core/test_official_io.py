"""The official MoCo checkpoint layouts <-> torchvision backbone state dicts (pure torch, no MLflow, no Ray)."""

from __future__ import annotations

import pytest
import torch
from official_layouts import (
    main_lincls_load,
    official_checkpoint,
    official_vit_checkpoint,
    query_backbone,
    v3_main_lincls_load_vit,
)
from timm.models.vision_transformer import VisionTransformer

from moco_ray.core.backbone_spec import BackboneSpec
from moco_ray.core.official_io import from_official, to_official


@pytest.mark.parametrize(("method", "expect"), [("v1", "moco_v1"), ("v2", "moco_v2"), ("v3", "moco_v3")])
def test_from_official_keeps_the_query_backbone_exactly(method, expect):
    ckpt = official_checkpoint(method)
    got = from_official(ckpt, "resnet18")
    want = query_backbone(ckpt)
    assert got.method == expect and not got.small_stem
    assert list(got.state) == list(want)  # torchvision's key order, fc dropped
    assert all(got.state[k] is want[k] for k in want)  # the file's tensors themselves: nothing converted
    assert got.head_keys and all(".fc." in k for k in got.head_keys)


def test_resnet50_layout_is_read():
    got = from_official(official_checkpoint("v2", "resnet50"), "resnet50")
    assert got.method == "moco_v2" and got.state["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)


def test_arch_mismatch_names_the_first_key_and_the_fitting_arch():
    with pytest.raises(ValueError) as e:
        from_official(official_checkpoint("v1"), "resnet50")
    msg = str(e.value)
    assert "\n" not in msg
    assert "first mismatching key module.encoder_q.layer1.0.conv1.weight" in msg
    assert "[64, 64, 3, 3]" in msg and "fit resnet18, resnet34" not in msg and "fit resnet18" in msg


def test_missing_and_unknown_layouts_are_one_line_errors():
    ckpt = official_checkpoint("v1")
    del ckpt["state_dict"]["module.encoder_q.layer3.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"first mismatching key module\.encoder_q\.layer3\.1\.bn2\.running_var"):
        from_official(ckpt, "resnet18")
    with pytest.raises(ValueError, match=r"unknown checkpoint layout.*first key 'backbone\.conv1\.weight'"):
        from_official({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, "resnet18")
    with pytest.raises(ValueError, match="no state dict"):
        from_official({"epoch": 3}, "resnet18")


def test_to_official_loads_in_main_lincls_and_round_trips():
    want = query_backbone(official_checkpoint("v2"))
    out = to_official(want, "resnet18", epoch=200)
    assert out["arch"] == "resnet18" and out["epoch"] == 200
    assert all(k.startswith("module.encoder_q.") for k in out["state_dict"])
    model, missing = main_lincls_load(out, "resnet18")
    assert missing == {"fc.weight", "fc.bias"}  # main_lincls.py's own assertion
    assert torch.equal(model.layer4[1].bn2.running_var, want["layer4.1.bn2.running_var"])
    back = from_official(out, "resnet18").state
    assert list(back) == list(want) and all(torch.equal(back[k], want[k]) for k in want)


@pytest.mark.parametrize("arch", ["vit_small"])  # vit_base: the same code at width 768 (its shapes: test_vits.py)
def test_moco_v3_vit_checkpoints_are_read_bit_for_bit(arch):
    """moco-v3 ViT files (module.base_encoder.<timm key>, projector in head.*) -> the tensors main_lincls.py keeps,
    themselves, loading strictly into a plain timm ViT of the arch.
    Mutation checked: dropping ``fc.*`` instead of ``head.*`` for a ViT fails here (head.* left in the state)."""
    ckpt = official_vit_checkpoint(arch)
    got = from_official(ckpt, arch)
    want = query_backbone(ckpt)
    lincls, missing = v3_main_lincls_load_vit(ckpt, arch)
    assert missing == {"head.weight", "head.bias"}  # main_lincls.py's own assertion
    assert got.method == "moco_v3" and got.prefix == "module.base_encoder." and not got.small_stem
    assert list(got.state) == list(want) and all(got.state[k] is want[k] for k in want)
    assert got.head_keys and all(k.startswith("module.base_encoder.head.") for k in got.head_keys)
    assert got.backbone == BackboneSpec.resolve(arch) and got.backbone.img_size == 224
    plain = VisionTransformer(**got.backbone.timm_kwargs(), weight_init="skip")
    plain.load_state_dict(got.state, strict=True)
    assert all(torch.equal(plain.state_dict()[k], lincls.state_dict()[k]) for k in want)


def test_vit_arch_mismatch_names_the_first_key_and_the_fitting_arch():
    with pytest.raises(ValueError) as e:
        from_official(official_vit_checkpoint("vit_small"), "vit_base")
    msg = str(e.value)
    assert "\n" not in msg and "first mismatching key module.base_encoder.cls_token" in msg
    assert "[1, 1, 384]" in msg and "fit vit_small" in msg
