"""The typed config: validation names the field, presets and override layers, YAML round trip."""

from __future__ import annotations

import pytest

from moco_ray.config import load_config


@pytest.mark.parametrize(
    "override,field",
    [
        ("moco.queue_size=0", "moco.queue_size"),
        ("moco.momentum=1.0", "moco.momentum"),
        ("moco.momentum=-0.1", "moco.momentum"),
        ("moco.temperature=0", "moco.temperature"),
        ("model.dim=0", "model.dim"),
        ("model.arch=alexnet", "model.arch"),
        ("optim.lr=-1", "optim.lr"),
        ("train.epochs=0", "train.epochs"),
        ("moco.queue_size=64", "moco.queue_size"),  # smaller than the global batch of 256
        ("moco.bn_splits=7", "moco.bn_splits"),
        ("moco.method=byol", "moco.method"),
        ("train.nope=1", "train.nope"),
    ],
)
def test_config_validation_names_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_presets_and_override_layers(tmp_path):
    v1 = load_config({"moco": {"method": "moco_v1"}})
    assert (v1.model.head, v1.moco.temperature, v1.aug.preset, v1.optim.schedule) == (
        "linear",
        0.07,
        "v1",
        "step",
    )
    v2 = load_config({"moco": {"method": "moco_v2", "temperature": 0.1}}, ["moco.queue_size=8192"])
    assert (v2.model.head, v2.moco.temperature, v2.moco.queue_size) == ("mlp", 0.1, 8192)
    path = tmp_path / "c.yaml"
    path.write_text(v2.to_yaml())
    again = load_config(path)
    assert again == v2
    assert v2.flat()["moco.queue_size"] == 8192
