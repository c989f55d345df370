"""The package's imports point down the layers drawn in docs/architecture.md; an upward import fails here.

Every ``import moco_ray...`` in every module counts, including those inside functions (lazy imports are still
dependencies); only ``if TYPE_CHECKING:`` blocks are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "moco_ray"

# lowest first; a module may import its own layer and the ones below
LAYERS = {
    "version": 0,
    "envvars": 0,
    "core": 0,
    "config": 1,
    "data": 2,
    "tracking": 3,
    "evaluation": 4,
    "train": 5,
    "jobs": 6,
    "tuning": 7,
    "cli": 8,
    "api": 8,
    "__init__": 9,
}
# third-party frameworks a layer must not import (pure PyTorch / MLflow-only layers)
FORBIDDEN = {
    "core": {"ray", "mlflow", "yaml"},
    "config": {"ray", "mlflow", "torch", "torchvision"},
    "data": {"mlflow"},
    "tracking": {"ray"},
    "evaluation": {"ray", "mlflow"},
}


def _layer_of(module: str) -> str:
    """``moco_ray.train.loop`` -> ``train``; ``moco_ray`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _file_layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "moco_ray":  # `from moco_ray import config` names a layer
                out += [(node.lineno, f"moco_ray.{a.name}") for a in node.names if a.name in LAYERS]
    return out


MODULES = sorted(PKG.rglob("*.py"))


def test_every_module_has_a_layer():
    assert {_file_layer(p) for p in MODULES} <= set(LAYERS), "a new top-level module needs a layer here and in docs"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path: Path):
    own = _file_layer(path)
    bad = []
    for line, mod in _imports(path):
        top = mod.split(".")[0]
        if top == "moco_ray":
            target = _layer_of(mod)
            if target != own and LAYERS[target] >= LAYERS[own] and own != "__init__":
                bad.append(f"line {line}: {own} (layer {LAYERS[own]}) imports {mod} (layer {LAYERS[target]})")
        elif top in FORBIDDEN.get(own, ()):
            bad.append(f"line {line}: {own} must not import {top}")
    assert not bad, "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a core module importing the trainer is caught."""
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from moco_ray.jobs.pretrain import run_pretraining\n")
    assert _imports(fake) == [(2, "moco_ray.jobs.pretrain")]
    assert LAYERS[_layer_of("moco_ray.jobs.pretrain")] > LAYERS["core"]
