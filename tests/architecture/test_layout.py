"""Every test file sits in its layer's folder and is named after a module of that layer or after a behaviour listed
for that folder in tests/README.md, and no two test files share a name (pytest imports them by basename).

Mutations checked by hand (each failed here): `tests/train/test_mlflow21_progress.py` put back (an issue number,
no module); `tests/jobs/test_sweep.py` (a tuning module tested from jobs); `tests/train/test_progress.py` next to
`tests/evaluation/test_progress.py` (one basename twice); a test folder that is no layer (`tests/misc/`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
PKG = TESTS.parent / "moco_ray"
README = TESTS / "README.md"

# folders of package layers -> the modules (dotted, under moco_ray) they test
TOP_LEVEL = {"core": ["version", "envvars"], "config": ["config", "config_files"], "cli": ["api"]}
PACKAGE_FOLDERS = {"core", "config", "data", "tracking", "evaluation", "train", "jobs", "tuning", "cli"}
OTHER_FOLDERS = {"architecture", "benchmarks", "deploy"}


def layer_modules(folder: str) -> dict[str, str]:
    """``{"stream": "moco_ray.data.stream", ...}`` for one folder."""
    out = {name: f"moco_ray.{name}" for name in TOP_LEVEL.get(folder, [])}
    sub = PKG / folder
    if sub.is_dir():
        out |= {p.stem: f"moco_ray.{folder}.{p.stem}" for p in sub.glob("*.py") if p.stem != "__init__"}
    return out


def documented_behaviours(readme: str) -> dict[str, set[str]]:
    """``### <folder>`` sections of tests/README.md, each ``- `name`: ...`` line a behaviour of that folder."""
    out: dict[str, set[str]] = {}
    folder = None
    for line in readme.splitlines():
        if m := re.match(r"### (\w+)\s*$", line):
            folder = m.group(1)
        elif folder and (m := re.match(r"- `(\w+)`:", line)):
            out.setdefault(folder, set()).add(m.group(1))
    return out


def misplaced(path: Path, behaviours: dict[str, set[str]]) -> str | None:
    """Why ``tests/<folder>/test_<name>.py`` breaks the rules, or None."""
    folder, name = path.parent.name, path.stem.removeprefix("test_")
    if folder not in PACKAGE_FOLDERS | OTHER_FOLDERS:
        return f"{folder}/ is not a layer folder ({', '.join(sorted(PACKAGE_FOLDERS | OTHER_FOLDERS))})"

    def matches(prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + "_")

    if any(matches(b) for b in behaviours.get(folder, ())):
        return None
    if folder == "benchmarks" and (m := re.fullmatch(r"bench_(\w+)_smoke", name)):
        bench = TESTS.parent / "benchmarks" / f"bench_{m.group(1)}.py"
        return None if bench.exists() else f"no benchmarks/{bench.name}"
    if not any(matches(module) for module in layer_modules(folder)):
        return f"test_{name}.py names no module of {folder}/ and no behaviour listed for it in tests/README.md"
    return None


TEST_FILES = sorted(TESTS.glob("*/test_*.py"))


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: str(p.relative_to(TESTS)))
def test_a_test_file_names_a_module_or_a_behaviour_of_its_layer(path: Path):
    why = misplaced(path, documented_behaviours(README.read_text()))
    assert why is None, f"{path.relative_to(TESTS)}: {why}"


def test_no_two_test_files_share_a_name():
    names = [p.name for p in TESTS.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_no_test_files_outside_the_layer_folders():
    assert sorted(p.name for p in TESTS.glob("test_*.py")) == []


@pytest.mark.parametrize(
    ("rel", "source"),
    [
        ("train/test_mlflow21_progress.py", "from moco_ray.train.progress import log_due\n"),
        ("jobs/test_sweep.py", "from moco_ray.tuning.sweep import run_sweep\n"),
        ("data/test_mlflow21_views.py", "from moco_ray.data.views import train_views\n"),
        ("misc/test_stream.py", "from moco_ray.data.stream import iter_pairs\n"),
    ],
)
def test_the_rules_reject_a_misplaced_file(tmp_path: Path, rel: str, source: str):
    """The checker itself, on files that break each rule (the layout these came from is gone)."""
    path = tmp_path / rel
    path.parent.mkdir(parents=True)
    path.write_text(source)
    assert misplaced(path, documented_behaviours(README.read_text())) is not None
