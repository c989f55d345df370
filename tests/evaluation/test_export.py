"""Export formats: torchvision state dict, TorchScript, detectron2 pickle (resnet18 small stem, 16-24 px); a target
that cannot be written (#33: a regular file in the way, a real read-only or full tmpfs) is one ValueError naming the
path and the errno, leaving no temp file and the old file as it was; the export directory of a tiny ViT loads as its
README says."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from moco_helpers import remount_read_only, tmpfs

from moco_ray.core.backbone_io import load_torchvision_backbone, torchvision_state_dict
from moco_ray.core.encoders import build_backbone
from moco_ray.core.shuffle_bn import SplitBatchNorm
from moco_ray.evaluation.export import save_export, to_detectron2

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-default BN statistics and affine params, so a dropped or mis-mapped buffer changes the output."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
    return model


@pytest.fixture(scope="module")
def split_bn_backbone() -> nn.Module:
    """A training-time backbone: resnet18, small stem, SplitBatchNorm (as MoCo single-process training builds)."""
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", small_stem=True, norm_layer=partial(SplitBatchNorm, num_splits=2))
    return _randomise_bn(backbone)


def _plain_keys(arch: str, small_stem: bool = False) -> list[str]:
    net = getattr(torchvision.models, arch)(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    return [k for k in net.state_dict() if not k.startswith("fc.")]


def test_state_dict_keys_are_torchvision_minus_fc(split_bn_backbone):
    assert any(isinstance(m, SplitBatchNorm) for m in split_bn_backbone.modules())
    state = torchvision_state_dict(split_bn_backbone, "resnet18", small_stem=True)
    assert list(state) == _plain_keys("resnet18", small_stem=True)
    assert state["conv1.weight"].shape == (64, 3, 3, 3)
    # wrapper prefixes (DataParallel / DDP "module.") are stripped
    wrapped = torchvision_state_dict(nn.DataParallel(split_bn_backbone))
    assert list(wrapped) == list(state)
    assert all(torch.equal(wrapped[k], state[k]) for k in state)


def test_torchvision_export_gives_identical_features(split_bn_backbone, tmp_path):
    split_bn_backbone.train()  # export must not depend on, nor change, the source module's mode
    path = save_export(split_bn_backbone, "resnet18", True, "torchvision", tmp_path / "enc.pt", image_size=16)
    assert split_bn_backbone.training
    assert [p.name for p in tmp_path.iterdir()] == ["enc.pt"]  # atomic write leaves no temp file
    loaded = load_torchvision_backbone(path, "resnet18", small_stem=True)
    assert not any(isinstance(m, SplitBatchNorm) for m in loaded.modules())
    assert not loaded.training
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    split_bn_backbone.eval()
    with torch.no_grad():
        ref, out = split_bn_backbone(x), loaded(x)
    split_bn_backbone.train()
    assert ref.shape == (4, 512)
    assert torch.allclose(ref, out, atol=1e-6)
    # the file is a plain tensor dict: weights_only loading works and strict loading into torchvision succeeds
    state = torch.load(path, weights_only=True)
    net = torchvision.models.resnet18(weights=None)
    net.conv1, net.maxpool, net.fc = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
    net.load_state_dict(state, strict=True)


def test_torchscript_export_matches_source(split_bn_backbone, tmp_path):
    path = save_export(split_bn_backbone, "resnet18", True, "torchscript", tmp_path / "enc.ts.pt", image_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in recent torch
        scripted = torch.jit.load(str(path))
    x = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(2))  # other batch and image size
    split_bn_backbone.eval()
    with torch.no_grad():
        ref, out = split_bn_backbone(x), scripted(x)
    split_bn_backbone.train()
    assert torch.allclose(ref, out, atol=1e-6)


class _Arbitrary:
    """Any non-tensor class: weights_only loading must refuse to unpickle it."""


def test_detectron2_key_layout_resnet50(tmp_path):
    backbone, _ = build_backbone("resnet50")
    state = torchvision_state_dict(backbone, "resnet50")
    d2 = to_detectron2(state)
    assert d2["__author__"] == "MOCO" and d2["matching_heuristics"] is True
    keys = set(d2["model"])
    assert len(keys) == len(state)
    for k in (
        "stem.conv1.weight",
        "stem.conv1.norm.weight",
        "stem.conv1.norm.running_mean",
        "res2.0.conv1.weight",
        "res2.0.conv1.norm.running_mean",
        "res2.0.conv3.norm.bias",
        "res2.0.shortcut.weight",
        "res2.0.shortcut.norm.running_var",
        "res3.0.shortcut.weight",
        "res3.0.shortcut.norm.bias",
        "res5.2.conv3.weight",
    ):
        assert k in keys, k
    assert not any(s in k for k in keys for s in ("layer", "bn", "downsample", "fc."))
    assert all(k.startswith(("stem.", "res2.", "res3.", "res4.", "res5.")) for k in keys)
    assert all(isinstance(v, np.ndarray) for v in d2["model"].values())
    np.testing.assert_array_equal(d2["model"]["res4.1.conv2.weight"], state["layer3.1.conv2.weight"].numpy())


def test_detectron2_export_resnet18_pickle(split_bn_backbone, tmp_path):
    path = save_export(split_bn_backbone, "resnet18", True, "detectron2", tmp_path / "enc.pkl")
    with open(path, "rb") as f:
        obj = pickle.load(f)
    model = obj["model"]
    assert "res2.0.conv2.norm.running_var" in model and "res3.0.shortcut.norm.weight" in model
    assert "res2.0.conv3.weight" not in model and "res2.0.shortcut.weight" not in model  # basic blocks
    assert model["stem.conv1.weight"].shape == (64, 3, 3, 3)
    bn = split_bn_backbone.layer1[0].bn1
    np.testing.assert_array_equal(model["res2.0.conv1.norm.running_mean"], bn.running_mean.numpy())
    # a full MoCo checkpoint's prefix is stripped first, as in the official converter
    full = to_detectron2({"module.encoder_q.layer1.0.bn1.bias": torch.zeros(2)})
    assert list(full["model"]) == ["res2.0.conv1.norm.bias"]


def test_mismatched_state_dict_and_bad_input_give_clear_errors(split_bn_backbone, tmp_path):
    path = save_export(split_bn_backbone, "resnet18", True, "torchvision", tmp_path / "enc.pt")
    with pytest.raises(ValueError, match=r"does not match resnet50 .*missing keys"):
        load_torchvision_backbone(path, "resnet50", small_stem=True)
    with pytest.raises(ValueError, match=r"shape mismatches \(e.g. conv1.weight \[64, 3, 3, 3\]"):
        load_torchvision_backbone(path, "resnet18", small_stem=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_torchvision_backbone(tmp_path / "nope.pt", "resnet18")
    with pytest.raises(ValueError, match="format"):
        save_export(split_bn_backbone, "resnet18", True, "onnx", tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="does not match resnet18"):
        torchvision_state_dict(split_bn_backbone, "resnet18", small_stem=False)
    # a pickle with arbitrary objects is refused by weights_only loading
    bad = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(1), "extra": _Arbitrary()}, bad)
    with pytest.raises(ValueError, match="weights-only"):
        load_torchvision_backbone(bad, "resnet18")
    assert not (tmp_path / "x.onnx").exists()


# ---- a target that cannot be written ----


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A real 1 MB tmpfs holding an old ``enc.pt`` (a resnet18 export is ~45 MB: it cannot fit)."""
    with tmpfs(tmp_path / "disk", "1m") as path:
        (path / "enc.pt").write_bytes(b"the old export")
        yield path


def test_export_under_a_regular_file_names_it(split_bn_backbone, tmp_path):
    """Mutation: without `check_export_target` in `save_export`, mkdir's "(File exists, errno EEXIST)" for the
    parent, after the state dict was built, not naming the file in the way."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError) as e:
        save_export(split_bn_backbone, "resnet18", True, "torchvision", afile / "enc.pt")
    assert str(e.value) == f"export: cannot write {afile}/enc.pt ({afile} is not a directory)"


@pytest.mark.parametrize("fmt", ["torchvision", "torchscript", "detectron2"])
def test_export_to_a_full_disk_keeps_the_old_file(split_bn_backbone, small_disk, fmt):
    """ENOSPC for real. Mutations: writing with ``torch.save(state, tmp)`` straight to the file (not serialised in
    memory first) raises torch's "RuntimeError: [enforce fail at inline_container.cc] unexpected pos" with no
    errno (a traceback); without ``except OSError`` in ``_write_atomic``, a bare OSError; both fail here."""
    with pytest.raises(ValueError) as e:
        save_export(split_bn_backbone, "resnet18", True, fmt, small_disk / "enc.pt", image_size=16)
    assert str(e.value) == f"export: cannot write {small_disk}/enc.pt (No space left on device, errno ENOSPC)"
    assert [p.name for p in small_disk.iterdir()] == ["enc.pt"]  # no temp file left
    assert (small_disk / "enc.pt").read_bytes() == b"the old export"


def test_export_to_a_read_only_mount_is_refused_before_serialising(split_bn_backbone, small_disk, monkeypatch):
    """EROFS, found by `check_export_target`'s probe before the state dict is built (mutation: without it, the
    failure comes from mkstemp after serialising: the same line, but `torchvision_state_dict` ran)."""
    import moco_ray.evaluation.export as export_module

    remount_read_only(small_disk)
    built = []
    monkeypatch.setattr(export_module, "torchvision_state_dict", lambda *a: built.append(a) or {})
    with pytest.raises(ValueError) as e:
        save_export(split_bn_backbone, "resnet18", True, "torchvision", small_disk / "enc.pt")
    assert str(e.value) == f"export: cannot write {small_disk}/enc.pt (Read-only file system, errno EROFS)"
    assert built == [] and (small_disk / "enc.pt").read_bytes() == b"the old export"


# ---- the export directory of a ViT (a tiny timm VisionTransformer) ----


def test_vit_export_directory_loads_as_its_readme_says(tmp_path, monkeypatch):
    """A torchvision-format export of a ViT: the README's plain-timm code, run as written, and
    ``load_encoder(dir)`` give the module's features exactly; the torchscript export too. Mutation: the README
    building the module without ``encoder.json``'s timm_kwargs (``VisionTransformer()``, 224 px ViT-B) -> the
    strict load fails on every shape."""
    import re

    from timm.models.vision_transformer import VisionTransformer

    from moco_ray.api import load_encoder
    from moco_ray.core.backbone_spec import BackboneSpec
    from moco_ray.evaluation.export import ExportInfo, save_export_dir

    spec = BackboneSpec.resolve("vit_small", image_size=32, patch_size=4, width=64, depth=2, heads=4)
    torch.manual_seed(0)
    net = VisionTransformer(**spec.timm_kwargs()).eval()
    info = ExportInfo(spec.to_info(), (0.5,) * 3, (0.25,) * 3, "moco_v3", 3, 32, {"run_id": "a" * 32})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = net(x)
    out = save_export_dir(net, info, "torchvision", tmp_path / "vit", image_size=32)
    readme = (out / "README.md").read_text()
    monkeypatch.chdir(out)
    scope: dict = {}
    exec(re.search(r"Plain timm:\s*```python\n(.*?)```", readme, re.S).group(1), scope)
    with torch.no_grad():
        torch.testing.assert_close(scope["net"](x), want, rtol=0, atol=0)
        torch.testing.assert_close(load_encoder(str(out))(x), want, rtol=0, atol=0)
    ts = save_export_dir(net, info, "torchscript", tmp_path / "vit-ts", image_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(ts / "encoder.torchscript.pt"))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), want)
