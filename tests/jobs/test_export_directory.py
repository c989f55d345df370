"""`moco-ray export` writes a directory that describes itself: the weights, encoder.json (arch, exact stem, mean/std,
method, source run) and a README.md whose loading code runs as written; registered versions carry a signature.

Runs are made as the trainer leaves them (tests/moco_helpers.log_like_trainer: config.yaml, params, the encoder
artifact and the mlflow.pytorch model) in a real sqlite store; the export goes through the real CLI in a
subprocess where that is the behaviour (the printed line, the exit code), else through ``export_run``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from moco_helpers import REPO, TINY_MODEL, cli_env, log_like_trainer

MEAN, STD = [0.25, 0.5, 0.75], [0.2, 0.3, 0.4]  # not ImageNet's: the export must carry the run's own


@pytest.fixture(scope="module")
def store(_empty_store, tmp_path_factory) -> dict:
    """One sqlite store with a moco_v2 run (small stem, its own mean/std) and a moco_v3 run (ImageNet stem)."""
    import shutil

    from moco_ray.config import load_config
    from moco_ray.core.encoders import torchvision_backbone

    base = tmp_path_factory.mktemp("export_dir")
    shutil.copyfile(_empty_store, base / "mlflow.db")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    runs = {}
    for name, over in {
        "v2": {"moco.method": "moco_v2", "data.mean": MEAN, "data.std": STD},
        "v3": {"moco.method": "moco_v3", "model.small_stem": False},
    }.items():
        cfg = load_config(None, {**TINY_MODEL, "tracking.experiment": "export-dir", **over})
        torch.manual_seed(len(runs))
        net = torchvision_backbone(cfg.model.arch, cfg.model.small_stem)
        runs[name] = log_like_trainer(uri, cfg, net, name)
    return {"uri": uri, **runs}


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moco_ray.cli.main", "export", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=300)


def _model_info(uri: str, model_uri: str):
    """``mlflow.models.get_model_info`` against ``uri`` (it reads the process-global tracking URI; put back after)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    before = utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.models.get_model_info(model_uri)
    finally:
        mlflow.set_tracking_uri(before)


def _python_block(readme: str, after: str) -> str:
    return re.search(re.escape(after) + r"\s*```python\n(.*?)```", readme, re.S).group(1)


def test_cli_export_is_a_self_describing_directory_that_loads_back(store, tmp_path, monkeypatch):
    """The CLI, a torchvision export with --register: three files; encoder.json with the run's exact stem, mean/std,
    method and id; the README's plain-torchvision code, run as written, and ``load_encoder(dir)`` give the run's
    features; the registered version has a signature. Mutations: encoder.json without ``mean``/``std`` (before
    #35) -> KeyError here; the weights named other than ``encoder.pt`` -> load_encoder(dir) fails; a README
    without the small stem lines -> the snippet's strict load fails; log_pytorch_model without ``signature``
    -> ``signature is None``."""
    from mlflow.tracking import MlflowClient

    from moco_ray import load_encoder

    uri, rid, out = store["uri"], store["v2"], tmp_path / "enc"
    p = _cli("--run", rid, "--tracking-uri", uri, "--register", "moco-export-dir", str(out))
    assert p.returncode == 0, p.stderr
    assert f"exported torchvision: {out} (encoder.pt, encoder.json, README.md)" in p.stdout
    assert "registered model moco-export-dir version 1" in p.stdout
    assert sorted(f.name for f in out.iterdir()) == ["README.md", "encoder.json", "encoder.pt"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["enc"]  # no temp directory left beside it

    info = json.loads((out / "encoder.json").read_text())
    assert (info["arch"], info["small_stem"], info["feature_dim"]) == ("resnet18", True, 512)
    assert (info["mean"], info["std"], info["method"]) == (MEAN, STD, "moco_v2")
    assert (info["format"], info["weights"], info["image_size"]) == ("torchvision", "encoder.pt", 16)
    assert info["source"]["run_id"] == rid and info["source"]["run_name"] == "v2"

    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_encoder(rid, tracking_uri=uri)(x)
        got = load_encoder(str(out))(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    readme = (out / "README.md").read_text()
    assert rid in readme and f"mean {MEAN}" in readme and 'load_encoder("path/to/this/directory")' in readme
    monkeypatch.chdir(out)
    scope: dict = {}
    exec(_python_block(readme, "Plain torchvision:"), scope)  # the user's code, as the README writes it
    with torch.no_grad():
        torch.testing.assert_close(scope["net"](x), want, rtol=0, atol=0)

    mv = MlflowClient(uri).get_model_version("moco-export-dir", "1")
    assert mv.run_id == rid
    sig = _model_info(uri, "models:/moco-export-dir/1").signature
    assert sig is not None
    assert [(s.name, s.shape) for s in sig.inputs.inputs] == [("images", (-1, 3, -1, -1))]
    assert [(s.name, s.shape) for s in sig.outputs.inputs] == [("features", (-1, 512))]


def test_moco_format_follows_the_run_method_and_carries_the_stem(store, tmp_path):
    """The v3 run's moco export is ``module.base_encoder.*`` (its main_lincls.py's prefix), the v2 run's
    ``module.encoder_q.*``; both files say arch, stem, method, and load weights-only (what torch.load defaults to).
    Mutation: export_run passing no ``method`` to the writer -> the v3 file is encoder_q."""
    from moco_ray.jobs.export import export_run

    uri = store["uri"]
    for run, prefix, stem in (("v3", "module.base_encoder.", False), ("v2", "module.encoder_q.", True)):
        res = export_run(store[run], "moco", tmp_path / run, tracking_uri=uri)
        assert res.weights == tmp_path / run / "encoder.moco.pth.tar"
        ckpt = torch.load(res.weights, weights_only=True)
        assert {k for k in ckpt if k != "state_dict"} == {"arch", "epoch", "method", "small_stem"}
        assert (ckpt["arch"], ckpt["method"], ckpt["small_stem"]) == ("resnet18", f"moco_{run}", stem)
        assert ckpt["state_dict"] and all(k.startswith(prefix) for k in ckpt["state_dict"])
        assert json.loads(res.info.read_text())["method"] == f"moco_{run}"
        assert f"`{prefix}*`" in (res.path / "README.md").read_text()


def test_reexport_of_the_same_run_replaces_the_directory(store, tmp_path):
    """OUT holding an earlier export of the same run is replaced whole (no file of the old format stays); OUT
    empty is filled. Mutation: ``_install`` renaming without the earlier export set aside -> ENOTEMPTY, refused."""
    from moco_ray.jobs.export import export_run

    uri, rid, out = store["uri"], store["v3"], tmp_path / "enc"
    out.mkdir()  # empty: taken
    export_run(rid, "torchvision", out, tracking_uri=uri)
    export_run(rid, "detectron2", out, tracking_uri=uri)
    assert sorted(f.name for f in out.iterdir()) == ["README.md", "encoder.detectron2.pkl", "encoder.json"]
    assert json.loads((out / "encoder.json").read_text())["format"] == "detectron2"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["enc"]


def test_refusals_come_before_the_encoder_is_downloaded(store, tmp_path, monkeypatch):
    """One ValueError line each, with RunLog.encoder never called and OUT as it was: another run's export, a
    non-empty directory that is no export, a file, a file name (the single-file form of export before #35), a
    deit export of a ResNet run. Mutation: the deit check after ``log.encoder()`` -> `downloads` is not empty."""
    from moco_ray.jobs.export import export_run
    from moco_ray.tracking.run_log import RunLog

    uri, rid = store["uri"], store["v2"]
    downloads: list[str] = []
    real = RunLog.encoder
    monkeypatch.setattr(RunLog, "encoder", lambda self: downloads.append(self.run_id) or real(self))
    other = tmp_path / "other"
    other.mkdir()
    (other / "encoder.json").write_text(json.dumps({"source": {"run_id": "f" * 32}}))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = {
        other: (rid, "torchvision", rf"{other} is not empty \(an export of run f{{32}}\); choose a new or empty"),
        foreign: (rid, "moco", rf"{foreign} is not empty \(not an export\); choose a new or empty directory"),
        afile: (rid, "moco", rf"{afile} is a file; OUT is the export directory"),
        tmp_path / "enc.pt": (rid, "torchvision", r"enc\.pt names a file; OUT is the export directory now"),
        tmp_path / "deit": (rid, "deit", rf"deit is for Vision Transformers; run {rid} is a resnet18"),
    }
    for out, (run, fmt, msg) in cases.items():
        with pytest.raises(ValueError, match=msg) as e:
            export_run(run, fmt, out, tracking_uri=uri)
        assert "\n" not in str(e.value)
    assert downloads == []
    assert (foreign / "notes.txt").read_text() == "mine" and afile.read_text() == "x"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["afile", "foreign", "other"]


def test_register_gives_an_unsigned_model_a_signed_one(store, tmp_path):
    """A run whose mlflow.pytorch model was logged without a signature (every run before #35): --register logs a
    signed model, points the run's tag at it and registers that. Mutation: ``_register`` keeping the tagged model
    -> the version's signature is None."""
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    from moco_ray.api import load_encoder
    from moco_ray.jobs.export import export_run
    from moco_ray.tracking.run_log import ENCODER_MODEL_URI_TAG, RunLog, _fluent_run

    uri, rid = store["uri"], store["v3"]
    with _fluent_run(uri, rid):  # as log_pytorch_model logged it before models carried a signature
        old = mlflow.pytorch.log_model(
            load_encoder(rid, tracking_uri=uri), name="encoder_model", serialization_format="pickle"
        ).model_uri
    log = RunLog(uri, rid)
    log.set_tags({ENCODER_MODEL_URI_TAG: old})
    assert not log.model_has_signature(old)
    res = export_run(rid, "torchvision", tmp_path / "enc", register="moco-unsigned", tracking_uri=uri)
    new = MlflowClient(uri).get_run(rid).data.tags[ENCODER_MODEL_URI_TAG]
    assert new != old and log.model_has_signature(new)
    sig = _model_info(uri, f"models:/moco-unsigned/{res.version}").signature
    assert [s.shape for s in sig.inputs.inputs] == [(-1, 3, -1, -1)]


def test_vit_run_exports_for_mocov3_main_lincls_deit_and_load_encoder(_empty_store, tmp_path):
    """A ViT moco_v3 run (tiny timm ViT, logged as the trainer logs it): ``moco`` loads in moco-v3 main_lincls.py's
    ViT branch, ``deit`` as DeiT loads it, ``torchvision`` with ``load_encoder(dir)``; the registered version's
    signature fixes the ViT's image size. Mutation: ``ExportInfo.backbone`` from ``arch``/``small_stem`` only (not
    the run's spec) -> encoder.json's timm_kwargs are a 224 px ViT-S's (depth 12), not the run's."""
    import shutil

    from official_scripts import mocov3_main_lincls
    from timm.models.vision_transformer import VisionTransformer

    from moco_ray import load_encoder
    from moco_ray.config import load_config
    from moco_ray.core.encoders import build_backbone
    from moco_ray.jobs.export import export_run
    from moco_ray.tracking.run_log import create_run, version_tags

    shutil.copyfile(_empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    vit = {"model.patch_size": 4, "model.vit_width": 64, "model.vit_depth": 2, "model.vit_heads": 4}
    cfg = load_config(None, {"model.arch": "vit_small", **vit, "aug.image_size": 32, "moco.method": "moco_v3"})
    torch.manual_seed(0)
    net, _ = build_backbone(cfg.backbone)
    log = create_run(uri, "export-vit", "vit", cfg.flat(), version_tags(), cfg.to_yaml())
    log.log_trained_encoder(net.eval(), cfg.backbone)
    log.finish("FINISHED")
    rid = log.run_id

    res = export_run(rid, "moco", tmp_path / "moco", tracking_uri=uri, register="moco-vit")
    kwargs = json.loads(res.info.read_text())["timm_kwargs"]
    assert kwargs == {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4, "num_classes": 0}
    lincls = VisionTransformer(**{**kwargs, "num_classes": 1000})  # main_lincls.py: vits.vit_small(), 1000 classes
    mocov3_main_lincls(torch.load(res.weights, map_location="cpu"), lincls, "head")
    deit = torch.load(export_run(rid, "deit", tmp_path / "deit", tracking_uri=uri).weights, map_location="cpu")
    msg = VisionTransformer(**{**kwargs, "num_classes": 10}).load_state_dict(deit["model"], strict=False)
    assert set(msg.missing_keys) == {"head.weight", "head.bias"} and not msg.unexpected_keys
    export_run(rid, "torchvision", tmp_path / "tv", tracking_uri=uri)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = net(x)
        torch.testing.assert_close(load_encoder(str(tmp_path / "tv"))(x), want, rtol=0, atol=0)
        torch.testing.assert_close(lincls.forward_head(lincls.forward_features(x), pre_logits=True), want)
    sig = _model_info(uri, f"models:/moco-vit/{res.version}").signature
    assert [s.shape for s in sig.inputs.inputs] == [(-1, 3, 32, 32)] and sig.outputs.inputs[0].shape == (-1, 64)
    # a ViT is traced at its own size only: another --image-size is one line, before the download
    with pytest.raises(ValueError, match=r"image size 64: a ViT runs at its own image size \(32 px"):
        export_run(rid, "torchscript", tmp_path / "ts", tracking_uri=uri, image_size=64)
