"""`--format moco` / `deit` export directories, read back with the official scripts' own key handling.

The loaders are transcriptions of the official code (tests/official_scripts.py names the file of each); they read
the file as ``save_export_dir`` wrote it, with ``torch.load``'s default (``weights_only=True`` on torch >= 2.6), for
every method x arch pair: v1/v2 (and SimCLR, written in the v1/v2 layout) into facebookresearch/moco
main_lincls.py, v3 ResNet and ViT into facebookresearch/moco-v3 main_lincls.py, and a ViT through moco-v3
convert_to_deit.py into DeiT's loading. The ViT is a tiny plain timm ``VisionTransformer`` (the class moco-v3's
``VisionTransformerMoCo`` subclasses; same parameter names at any size).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torchvision
from official_scripts import convert_to_deit, moco_main_lincls, mocov3_main_lincls
from timm.models.vision_transformer import VisionTransformer

from moco_ray.core.encoders import torchvision_backbone
from moco_ray.core.official_io import to_deit, to_official
from moco_ray.evaluation.export import WEIGHTS_FILE, ExportInfo, save_export_dir

pytestmark = pytest.mark.usefixtures("one_thread")

VIT_KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4}


# ---- exports ----


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every float parameter and buffer random, so a dropped or mis-mapped key shows in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return model.eval()


def _resnet(arch: str, small_stem: bool = False) -> nn.Module:
    return _randomise(torchvision_backbone(arch, small_stem))


def _vit() -> nn.Module:
    return _randomise(VisionTransformer(**VIT_KWARGS, num_classes=0))


def _info(net: nn.Module, arch: str, method: str, small_stem: bool = False) -> ExportInfo:
    if isinstance(net, VisionTransformer):
        backbone = {
            "arch": arch,
            "small_stem": False,
            "feature_dim": 64,
            "timm_kwargs": {**VIT_KWARGS, "num_classes": 0},
        }
    else:
        backbone = {"arch": arch, "small_stem": small_stem, "feature_dim": net(torch.zeros(1, 3, 32, 32)).shape[1]}
    source = {"run_id": "0" * 32, "run_name": "test", "experiment_id": "1"}
    return ExportInfo(backbone, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), method, 200, 32, source)


def _export(tmp_path, net: nn.Module, arch: str, method: str, fmt: str = "moco", small_stem: bool = False) -> dict:
    out = save_export_dir(net, _info(net, arch, method, small_stem), fmt, tmp_path / "export", image_size=32)
    return torch.load(out / WEIGHTS_FILE[fmt], map_location="cpu")  # the official scripts' call (weights-only)


def _assert_same(model: nn.Module, source: nn.Module, skip: str) -> None:
    got, want = model.state_dict(), source.state_dict()
    assert {k for k in got if not k.startswith(skip)} == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    ("method", "arch"),
    [("moco_v1", "resnet18"), ("moco_v2", "resnet18"), ("moco_v2", "resnet50"), ("simclr", "resnet18")],
)
def test_v1_v2_export_loads_in_moco_main_lincls(tmp_path, method, arch):
    """Mutation: ``OFFICIAL_PREFIX`` of moco_v1/v2 set to ``module.base_encoder.`` -> every backbone key is dropped
    and main_lincls.py's assertion fails (missing = all 62 / 161 keys)."""
    src = _resnet(arch)
    ckpt = _export(tmp_path, src, arch, method)
    assert (ckpt["arch"], ckpt["epoch"], ckpt["method"], ckpt["small_stem"]) == (arch, 200, method, False)
    model = getattr(torchvision.models, arch)()
    moco_main_lincls(ckpt, model)
    _assert_same(model, src, "fc.")


def test_v3_resnet_export_loads_in_mocov3_main_lincls(tmp_path):
    """Mutation: to_official ignoring ``method`` (always ``module.encoder_q.``, the export before #34) -> missing is
    every key of the ResNet, the assertion of moco-v3 main_lincls.py fails."""
    src = _resnet("resnet18")
    ckpt = _export(tmp_path, src, "resnet18", "moco_v3")
    assert all(k.startswith("module.base_encoder.") for k in ckpt["state_dict"])
    model = torchvision.models.resnet18()
    mocov3_main_lincls(ckpt, model, "fc")
    _assert_same(model, src, "fc.")


def test_v3_vit_export_loads_in_mocov3_main_lincls(tmp_path):
    """The ViT branch of moco-v3 main_lincls.py (linear keyword ``head``). Mutation: the ViT written as
    ``module.encoder_q.*`` -> missing = every key, the assertion fails."""
    src = _vit()
    ckpt = _export(tmp_path, src, "vit_small", "moco_v3")
    model = VisionTransformer(**VIT_KWARGS, num_classes=1000)  # main_lincls.py: vits.vit_small(), 1000 classes
    mocov3_main_lincls(ckpt, model, "head")
    _assert_same(model, src, "head.")


def test_small_stem_is_recorded_and_loads_once_the_stem_is_built(tmp_path):
    """A small-stem conv1 is 3x3: the stock torchvision model refuses it (a size mismatch even with strict=False),
    so the file says ``small_stem`` and the README says to build the stem; built so, main_lincls.py loads it."""
    src = _resnet("resnet18", small_stem=True)
    ckpt = _export(tmp_path, src, "resnet18", "moco_v2", small_stem=True)
    assert ckpt["small_stem"] is True
    assert "small one (3x3 conv1, no max-pool)" in (tmp_path / "export" / "README.md").read_text()
    with pytest.raises(RuntimeError, match="size mismatch for conv1.weight"):
        moco_main_lincls({"state_dict": dict(ckpt["state_dict"])}, torchvision.models.resnet18())
    model = torchvision.models.resnet18()
    model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    moco_main_lincls(ckpt, model)
    _assert_same(model, src, "fc.")


def test_deit_export_is_convert_to_deit_of_the_v3_export(tmp_path):
    """``--format deit`` equals convert_to_deit.py run on the v3 export, and loads as DeiT loads it (moco-v3's
    README: ``load_state_dict(checkpoint['model'], strict=False)``; the new classifier is all that is missing)."""
    src = _vit()
    deit = _export(tmp_path / "a", src, "vit_small", "moco_v3", fmt="deit")
    want = convert_to_deit(_export(tmp_path / "b", src, "vit_small", "moco_v3"))
    assert list(deit) == ["model"] and list(deit["model"]) == list(want["model"])
    assert all(torch.equal(deit["model"][k], want["model"][k]) for k in want["model"])
    info = json.loads((tmp_path / "a" / "export" / "encoder.json").read_text())
    assert info["format"] == "deit" and info["weights"] == "encoder.deit.pth"
    model = VisionTransformer(**VIT_KWARGS, num_classes=10)
    msg = model.load_state_dict(deit["model"], strict=False)
    assert set(msg.missing_keys) == {"head.weight", "head.bias"} and not msg.unexpected_keys
    _assert_same(model, src, "head.")


def test_to_deit_drops_the_head_as_convert_to_deit_does():
    """A ViT state with a classifier (as a fine-tuned or v3 checkpoint's base encoder has): ``head.*`` goes.
    Mutation: without the ``head.`` filter in to_deit the keys differ from convert_to_deit.py's."""
    state = _randomise(VisionTransformer(**VIT_KWARGS, num_classes=7)).state_dict()
    want = convert_to_deit(to_official(state, "vit_small", method="moco_v3"))
    got = to_deit(state)
    assert "head.weight" in state and list(got["model"]) == list(want["model"])


def test_deit_of_a_resnet_and_unknown_methods_are_refused(tmp_path):
    with pytest.raises(ValueError, match="deit export: not a Vision Transformer state dict .*first key 'conv1.weight'"):
        to_deit(_resnet("resnet18").state_dict())
    with pytest.raises(ValueError, match="export format deit is for Vision Transformers; resnet18 is not one"):
        _export(tmp_path, _resnet("resnet18"), "resnet18", "moco_v3", fmt="deit")
    with pytest.raises(ValueError, match="moco export: unknown method 'byol'"):
        to_official({}, "resnet18", method="byol")
    assert not (tmp_path / "export").exists()
