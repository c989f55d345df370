"""The shipped experiment files: listed from the installed package (the repository's experiments/, in the README's
editable install), found by name, with a one-line description each. In-process, no Ray; the console script from
another directory is tests/cli/test_main_shipped.py, the wheel tests/config/test_config_files_wheel.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from moco_ray.config import load_config
from moco_ray.config_files import (
    QUICKSTART,
    description,
    experiment_file,
    kind_of,
    shipped_dir,
    shipped_files,
)

REPO_EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def test_the_installed_files_are_the_repositorys():
    """Every experiments/*.yaml is shipped, byte for byte, and nothing else (an editable install reads the folder
    itself; a wheel holds copies: tests/config/test_config_files_wheel.py). Mutation checked by hand: the
    package-dir mapping dropped from pyproject.toml (after a reinstall: ``moco_ray.experiments`` not found)."""
    shipped = {f.path.name: f.path.read_bytes() for f in shipped_files()}
    assert shipped == {p.name: p.read_bytes() for p in REPO_EXPERIMENTS.glob("*.yaml")}
    assert shipped_files()[0].name == QUICKSTART  # listed first: what `moco-ray pretrain` runs


def test_kinds_and_descriptions_of_the_shipped_files():
    """Sweep files are the sweep_* ones; every description is one line taken from the file's opening comment
    (mutation checked by hand: ``_cut`` ignoring parentheses cut v1's at "(He et al." and v3's mid-parenthesis)."""
    files = {f.name: f for f in shipped_files()}
    assert {n for n, f in files.items() if f.kind == "sweep"} == {n for n in files if n.startswith("sweep_")}
    assert files["quickstart"].description == "The README's main job: `moco-ray pretrain` with no arguments."
    assert files["imagenet_mocov1_r50"].description == (
        "MoCo v1 (He et al. 2019), ImageNet-1k, ResNet-50 (facebookresearch/moco main_moco.py with its defaults)"
    )
    assert files["sweep_queue_momentum"].description == (
        "Queue size K x key-encoder momentum m on CIFAR-10 (MoCo v2, ResNet-18 small stem)"
    )
    for f in files.values():
        assert f.description and "\n" not in f.description and f.description.count("(") == f.description.count(")")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("# Short. Then details.\nmoco: {}\n", "Short."),
        ("# A (b. c) d. e\n", "A (b. c) d."),  # a stop inside parentheses is no sentence end
        ("# " + "x" * 95 + " (a: b): tail\n", "x" * 95 + " (a: b)"),  # long: cut at the top-level colon
        ("# one line\n# goes on\n\n# not this\n", "one line goes on"),
        ("moco: {}\n", ""),
    ],
)
def test_description_rule(text: str, expected: str):
    assert description(text) == expected


def test_a_path_that_exists_wins_over_a_shipped_name(tmp_path, monkeypatch):
    """A user's quickstart.yaml in the current directory is theirs, not the shipped one. Mutation checked by hand:
    looking the name up in the shipped folder first returned the shipped file here."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("train:\n  epochs: 1\n")
    assert experiment_file("quickstart.yaml") == Path("quickstart.yaml")
    assert load_config(experiment_file("quickstart.yaml")).train.epochs == 1


@pytest.mark.parametrize("ref", ["quickstart", "quickstart.yaml", "experiments/quickstart.yaml"])
def test_a_shipped_name_from_another_directory(ref: str, tmp_path, monkeypatch, capsys):
    """With or without .yaml, and the README's ``experiments/NAME.yaml`` (with a note saying which file runs)."""
    monkeypatch.chdir(tmp_path)
    assert experiment_file(ref) == shipped_dir() / "quickstart.yaml"
    err = capsys.readouterr().err
    assert ("using the shipped" in err) == ref.startswith("experiments/"), err


@pytest.mark.parametrize("ref", ["nope", "other/quickstart.yaml", "imagenet_mocov9_r50.yaml"])
def test_an_unknown_name_is_one_line_listing_the_shipped_ones(ref: str, tmp_path, monkeypatch):
    """Only a bare name or ``experiments/NAME`` falls back to the shipped files: a missing file in another folder
    is an error, not silently the shipped file (mutation checked by hand: the folder check dropped accepted
    ``other/quickstart.yaml``)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        experiment_file(ref)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"config file not found: {ref};"), msg
    assert "quickstart, cifar10_mocov2_r18" in msg and "sweep_" not in msg  # the kind asked for


def test_a_file_of_the_other_kind_names_its_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="run it with moco-ray sweep -c sweep_queue_momentum$"):
        experiment_file("sweep_queue_momentum")
    with pytest.raises(ValueError, match="run it with moco-ray pretrain -c quickstart$"):
        experiment_file("quickstart", "sweep")
    assert experiment_file("sweep_queue_momentum", "sweep").name == "sweep_queue_momentum.yaml"
    assert kind_of("sweep_x") == "sweep" and kind_of("quickstart") == "experiment"


def test_every_shipped_experiment_loads_by_name(tmp_path, monkeypatch):
    """Each non-sweep file validates when named from another directory (the sweeps: tests/tuning)."""
    monkeypatch.chdir(tmp_path)
    for f in shipped_files("experiment"):
        assert load_config(experiment_file(f.name)).tracking.experiment
