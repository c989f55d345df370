"""A regular wheel of moco-ray ships the experiment files, and a copy installed from it finds them from another
directory through importlib.resources (the README's editable install is tests/config/test_config_files.py).

The wheel is built offline from a copy of the project (``pip wheel --no-deps --no-build-isolation``: the
setuptools of this venv, nothing downloaded, no build/ left in the repository) and unpacked as an installer would
put it in site-packages; the copy is then imported ahead of the editable install (``PYTHONPATH``).

Mutations checked by hand (each failed here), in pyproject.toml: the package-data line ``"moco_ray.experiments" =
["*.yaml"]`` dropped (no yaml in the wheel); the ``package-dir`` mapping dropped (the build fails);
``moco_ray.tuning`` left out of the ``packages`` list (its modules missing from the wheel).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_FROM_ELSEWHERE = r"""
import json, sys
import moco_ray
from moco_ray.cli.main import main
from moco_ray.config_files import experiment_file, shipped_files
print(json.dumps({"package": moco_ray.__file__, "quickstart": str(experiment_file("quickstart")),
                  "names": [f.name for f in shipped_files()]}))
sys.exit(main(["experiments"]))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("moco_ray", "experiments"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out)]
    p = subprocess.run([*cmd, str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (whl,) = out.glob("moco_ray-*.whl")
    return whl


def test_the_wheel_holds_every_module_and_every_experiment(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "moco_ray").rglob("*.py")}
    yamls = {f"moco_ray/experiments/{p.name}" for p in (REPO / "experiments").glob("*.yaml")}
    assert sorted(modules - names) == []  # a package missing from pyproject's list
    assert sorted(yamls - names) == [] and yamls
    assert "moco_ray/py.typed" in names


def test_an_installed_copy_finds_them_from_another_directory(wheel: Path, tmp_path: Path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    p = subprocess.run(
        [sys.executable, "-c", _FROM_ELSEWHERE], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-3000:]
    first, *listing = p.stdout.splitlines()
    got = json.loads(first)
    assert Path(got["package"]).is_relative_to(site)  # the wheel's copy, not the editable install
    assert got["quickstart"] == str(site / "moco_ray" / "experiments" / "quickstart.yaml")
    assert sorted(got["names"]) == sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
    assert listing[0].startswith("experiment files (moco-ray pretrain -c NAME):")
    assert any(line.split()[:1] == ["quickstart"] for line in listing)
    assert listing[-1].startswith(f"in {site / 'moco_ray' / 'experiments'};")
