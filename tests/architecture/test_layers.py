"""The package's imports point down the layers drawn in docs/architecture.md, no layer reaches a framework it must
not use (directly or through a lower module), and no modules import each other in a cycle.

The import graph (``import_graph.py``) counts absolute, relative and dynamic imports (``importlib.import_module``,
``__import__``), lazy imports inside functions, and the parent packages Python runs first; only ``if
TYPE_CHECKING:`` blocks are skipped. Each hole an earlier version of this guard had is shown closed by a probe
module dropped into a copy of the package, which the same checks must reject (the mutation each probe stands for is
in its id).

Mutations checked by hand (each made a probe pass, so its test failed): relative imports read as absolute
(``node.level`` ignored); ``importlib.import_module`` / ``__import__`` not treated as imports; the reach not
followed past the first module (``todo.append`` dropped); cycles of two modules not reported.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from import_graph import ImportGraph

PKG = Path(__file__).resolve().parents[2] / "moco_ray"

# lowest first; a module may import its own layer and the ones below
LAYERS = {
    "version": 0,
    "envvars": 0,
    "core": 0,
    "config": 1,
    "config_files": 1,
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
# third-party frameworks a layer must not use, directly or through any module it imports
FORBIDDEN = {
    "core": {"ray", "mlflow", "yaml"},
    "config": {"ray", "mlflow", "torch", "torchvision"},
    "config_files": {"ray", "mlflow", "torch", "torchvision", "yaml"},
    "data": {"mlflow"},
    "tracking": {"ray"},
    "evaluation": {"ray", "mlflow"},
}


def layer_of(module: str) -> str:
    """``moco_ray.train.loop`` -> ``train``; ``moco_ray`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def upward_imports(graph: ImportGraph, name: str) -> list[str]:
    own = layer_of(name)
    if own == "__init__":
        return []
    mod = graph.modules[name]
    return [
        f"line {line}: {own} (layer {LAYERS[own]}) imports {target} (layer {LAYERS[layer_of(target)]})"
        for target, line in sorted(mod.internal.items())
        if layer_of(target) != own and LAYERS[layer_of(target)] >= LAYERS[own]
    ]


def forbidden_frameworks(graph: ImportGraph, name: str) -> list[str]:
    reached = graph.frameworks_reached(name)
    return [
        f"{layer_of(name)} must not use {fw}: " + " -> ".join([*reached[fw], fw])
        for fw in sorted(FORBIDDEN.get(layer_of(name), set()) & set(reached))
    ]


GRAPH = ImportGraph.of(PKG)
MODULES = sorted(GRAPH.modules)


def test_every_module_has_a_layer():
    assert {layer_of(m) for m in MODULES} <= set(LAYERS), "a new top-level module needs a layer here and in docs"


@pytest.mark.parametrize("name", MODULES)
def test_imports_point_down(name: str):
    bad = upward_imports(GRAPH, name)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", MODULES)
def test_no_forbidden_framework_is_reached(name: str):
    bad = forbidden_frameworks(GRAPH, name)
    assert not bad, "\n".join(bad)


def test_every_dynamic_import_is_readable():
    """``importlib.import_module(some_variable)`` could load any layer; the guard must see what is loaded."""
    bad = {n: m.unreadable for n, m in GRAPH.modules.items() if m.unreadable}
    assert not bad, bad


def test_the_api_and_the_cli_import_without_ray():
    """`import moco_ray.api` (notebooks, scripts) and the CLI's module (every `moco-ray --help`) load no Ray:
    half a second of import, and the Ray-free entry points stay so. Run in a fresh interpreter, as a user's is.
    Mutation caught: `jobs/resolve.py` importing `jobs.ingest_job` (which imports Ray) at its top."""
    import subprocess
    import sys

    code = "import sys, moco_ray.api, moco_ray.cli.main, moco_ray.jobs.resolve; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr[-2000:]


def test_an_ingest_runs_without_torch(tmp_path):
    """`moco-ray ingest` validates and re-encodes with PIL and writes Parquet: torch (1.2 s of import, more on a busy
    machine, in every ingest command) never loads. A real ingest of two PNGs in a fresh interpreter.
    Mutation caught: `data/decode.py` importing torch at its top again."""
    import subprocess
    import sys

    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (40, 90, 200)).save(tmp_path / "imgs" / c / "0.png")
    code = (
        "import sys\nfrom moco_ray.cli.main import main\n"
        f"rc = main(['ingest', {str(tmp_path / 'imgs')!r}, {str(tmp_path / 'shards')!r}, '--workers', '1'])\n"
        "print(rc, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "0 False", out.stdout + out.stderr[-2000:]
    assert (tmp_path / "shards" / "manifest.json").exists()


def test_no_import_cycles():
    assert GRAPH.cycles() == []


PROBES = {  # id: (file, source appended, the check that must flag it)
    "relative-upward-import": ("core/probe.py", "from ..jobs import pretrain\n", "layers"),
    "relative-upward-import-in-function": ("data/probe.py", "def f():\n    from ..tuning import sweep\n", "layers"),
    "importlib-upward-import": (
        "core/probe.py",
        "import importlib\nimportlib.import_module('moco_ray.jobs.pretrain')\n",
        "layers",
    ),
    "dunder-import-upward": ("config.py", "def f():\n    return __import__('moco_ray.train.loop')\n", "layers"),
    "mlflow-through-tracking": ("evaluation/probe.py", "from moco_ray.tracking import run_log\n", "frameworks"),
    "ray-through-data-stream": (
        "evaluation/probe.py",
        "def f():\n    from moco_ray.data import stream\n",
        "frameworks",
    ),
    "torch-through-core": ("config.py", "from moco_ray.core.moco import MoCo\n", "frameworks"),
    "unreadable-dynamic-import": ("core/probe.py", "import importlib\nimportlib.import_module(NAME)\n", "unreadable"),
    "ray-two-modules-down": ("evaluation/probe.py", "from moco_ray.evaluation import probe_b\n", "frameworks"),
    "cycle-through-lazy-import": ("data/probe.py", "from moco_ray.data import probe_b\n", "cycles"),
}
# the second module some probes need: a chain or a cycle takes two
PROBE_PARTNERS = {
    "ray-two-modules-down": ("evaluation/probe_b.py", "from moco_ray.data.stream import eval_dataset\n"),
    "cycle-through-lazy-import": ("data/probe_b.py", "def f():\n    from moco_ray.data import probe\n"),
}


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pkg") / "moco_ray"
    shutil.copytree(PKG, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _checks(graph: ImportGraph, name: str) -> dict[str, list[str]]:
    return {
        "layers": upward_imports(graph, name),
        "frameworks": forbidden_frameworks(graph, name),
        "unreadable": graph.modules[name].unreadable,
        "cycles": [" <-> ".join(c) for c in graph.cycles()],
    }


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_the_guard_rejects_a_probe_module(package_copy: Path, probe: str, tmp_path: Path):
    """Each probe is one hole of the old guard (relative, importlib and __import__ imports, frameworks reached
    through a lower module, cycles, unreadable dynamic imports) put back into a copy of the package: the check
    named for it must flag the probe, and the untouched copy must pass every check."""
    root = tmp_path / "moco_ray"
    shutil.copytree(package_copy, root)
    rel, source, check = PROBES[probe]
    name = "moco_ray." + rel.removesuffix(".py").replace("/", ".")
    assert not _checks(ImportGraph.of(root), name if (root / rel).exists() else "moco_ray.core")[check]
    with (root / rel).open("a") as f:
        f.write(source)
    if probe in PROBE_PARTNERS:
        partner, partner_source = PROBE_PARTNERS[probe]
        (root / partner).write_text(partner_source)
    found = _checks(ImportGraph.of(root), name)[check]
    assert found, f"probe {probe!r} passed the {check} check"
