"""The package's import graph, read from source: every way a module can load another.

Counted: ``import a.b``, ``from a.b import c`` (``a.b.c`` when that is a module, else ``a.b``), relative imports
(``from ..jobs import x`` resolved against the importing module), ``importlib.import_module(...)`` and
``__import__(...)`` with a constant name or an f-string whose constant prefix names a package (then every module
under it counts, conservatively), and the parent packages whose ``__init__`` Python runs before a submodule. Imports
inside functions count (a lazy import is still a dependency); only ``if TYPE_CHECKING:`` blocks are skipped. A
dynamic import whose target cannot be read statically is reported, so nothing can load a module unseen.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

DYNAMIC_LOADERS = {"import_module", "__import__"}


@dataclass
class ModuleImports:
    """What one module loads: package modules (eagerly at import, or at all) and top-level third-party names."""

    name: str
    path: Path
    internal: dict[str, int] = field(default_factory=dict)  # module -> first line
    eager_internal: set[str] = field(default_factory=set)
    external: dict[str, int] = field(default_factory=dict)  # top-level distribution name -> first line
    eager_external: set[str] = field(default_factory=set)
    unreadable: list[str] = field(default_factory=list)  # dynamic imports the graph cannot follow


def module_name(root: Path, path: Path) -> str:
    """``<root>/train/loop.py`` -> ``<pkg>.train.loop``; ``<root>/core/__init__.py`` -> ``<pkg>.core``."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    return skip


def _function_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    return inside


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _dynamic_target(call: ast.Call) -> tuple[str | None, bool]:
    """(name or package prefix, is_prefix) of ``import_module(...)`` / ``__import__(...)``; (None, False) if unread."""
    if not call.args:
        return None, False
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value, False
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        prefix = str(arg.values[0].value)
        if prefix.endswith(".") and prefix.count(".") >= 1:
            return prefix.rstrip("."), True
    return None, False


def _is_dynamic_loader(call: ast.Call) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in DYNAMIC_LOADERS


# what an import names: a module; the package of a `from PKG import a, b`; every module under a package prefix
MODULE, FROM_PACKAGE, PREFIX = "module", "from_package", "prefix"


def _raw_imports(tree: ast.AST, name: str, is_package: bool) -> list[tuple[int, str, str, ast.AST]]:
    """(line, dotted target, kind, node) for every import in the module, TYPE_CHECKING blocks left out."""
    skip = _type_checking_nodes(tree)
    out: list[tuple[int, str, str, ast.AST]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, MODULE, node) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(name, is_package, node.level, node.module) if node.level else node.module
            # each name as a submodule; the package itself too (read_module keeps whichever exists)
            out += [(node.lineno, f"{base}.{a.name}", MODULE, node) for a in node.names if a.name != "*"]
            out.append((node.lineno, f"{base}", FROM_PACKAGE, node))
        elif isinstance(node, ast.Call) and _is_dynamic_loader(node):
            target, is_prefix = _dynamic_target(node)
            out.append((node.lineno, target or "", PREFIX if is_prefix else MODULE, node))
    return out


def read_module(root: Path, path: Path, known: set[str]) -> ModuleImports:
    """Parse one module of the package rooted at ``root``; ``known`` is every module name of that package."""
    name = module_name(root, path)
    tree = ast.parse(path.read_text())
    lazy = _function_nodes(tree)
    mod = ModuleImports(name, path)
    pkg = root.name
    for line, target, kind, node in _raw_imports(tree, name, path.name == "__init__.py"):
        eager = id(node) not in lazy
        if not target:
            mod.unreadable.append(f"line {line}: {ast.unparse(node)[:80]}")
            continue
        top = target.split(".")[0]
        if top != pkg:
            mod.external.setdefault(top, line)
            if eager:
                mod.eager_external.add(top)
            continue
        if kind == PREFIX:
            hits = {k for k in known if k == target or k.startswith(target + ".")}
        elif kind == FROM_PACKAGE:
            # `from pkg import a, b`: the package counts only for names that are not its submodules
            names = [f"{target}.{a.name}" for a in node.names]
            hits = {target} if target in known and any(n not in known for n in names) else set()
        else:
            hits = {target} if target in known else set()
        for hit in hits:
            mod.internal.setdefault(hit, line)
            if eager:
                mod.eager_internal.add(hit)
    return mod


@dataclass
class ImportGraph:
    """Every module of one package and what it loads."""

    root: Path
    modules: dict[str, ModuleImports]

    @classmethod
    def of(cls, root: Path) -> ImportGraph:
        paths = sorted(root.rglob("*.py"))
        known = {module_name(root, p) for p in paths}
        return cls(root, {m.name: m for m in (read_module(root, p, known) for p in paths)})

    def parents(self, name: str) -> list[str]:
        """The packages whose ``__init__`` runs before ``name`` (``a.b.c`` -> ``a``, ``a.b``)."""
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in self.modules]

    def reach(self, name: str) -> tuple[dict[str, list[str]], set[str]]:
        """Every module ``name`` can end up running, with one import chain to each, and which of them are named.

        A module that is named can have any function called, so its lazy imports count; a parent package reached
        only because a submodule was named runs its module body alone, so only its eager imports count.
        """
        chains: dict[str, list[str]] = {name: [name]}
        full: set[str] = {name}
        todo = [name]
        while todo:
            cur = todo.pop()
            mod = self.modules[cur]
            named = set(mod.internal) if cur in full else mod.eager_internal
            for nxt in sorted(named | {p for t in named for p in self.parents(t)} | set(self.parents(cur))):
                is_full = nxt in named
                if nxt not in chains or (is_full and nxt not in full):
                    chains.setdefault(nxt, chains[cur] + [nxt])
                    if is_full:
                        full.add(nxt)
                    todo.append(nxt)
        return chains, full

    def frameworks_reached(self, name: str) -> dict[str, list[str]]:
        """Third-party top-level names ``name`` can load through the package, with the chain to the importer."""
        chains, full = self.reach(name)
        out: dict[str, list[str]] = {}
        for mod_name, chain in sorted(chains.items(), key=lambda kv: len(kv[1])):
            mod = self.modules[mod_name]
            used = mod.external if mod_name in full else {k: mod.external[k] for k in mod.eager_external}
            for top in used:
                out.setdefault(top, chain)
        return out

    def cycles(self) -> list[list[str]]:
        """Strongly connected groups of more than one module over the named imports (eager and lazy).

        Parent-package edges are left out: a package running before its submodules is Python's order, not a
        dependency the code chose.
        """
        graph = {n: set(m.internal) - {n} for n, m in self.modules.items()}
        return [sorted(c) for c in _strongly_connected(graph) if len(c) > 1]


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (the package is small, but recursion limits are not a test's business)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    group.append(w)
                    if w == node:
                        break
                out.append(group)
    return out
