"""The experiment files shipped with moco-ray, found by name from any directory.

They live in the repository's ``experiments/`` and are installed as the package data of ``moco_ray.experiments``
(pyproject.toml maps that folder there, in an editable install and in a wheel alike), so after ``pip install``
``moco-ray pretrain`` runs the quickstart anywhere and ``-c NAME`` finds a shipped file without a path. A ``-c``
value is a path when that file exists, else a shipped name: only a path that is missing falls back, so a user's
own file is never shadowed. Relative paths inside a shipped file (``data.shards``, ``train.storage_path``, a
``sqlite:///`` tracking URI) stay relative to the current directory, as for any config: the quickstart writes its
shards and ``mlflow.db`` where it is run, not into the installed package.
"""

from __future__ import annotations

import importlib.resources
import os
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "moco_ray.experiments"
QUICKSTART = "quickstart"  # what `moco-ray pretrain` runs with no -c
SWEEP_PREFIX = "sweep_"  # sweep files (`moco-ray sweep -c NAME`); every other file is a pretraining experiment
REPO_DIR = "experiments"  # the repository's folder: `-c experiments/NAME.yaml`, as the README writes it
SUFFIX = ".yaml"
KINDS = {"experiment": "moco-ray pretrain -c NAME", "sweep": "moco-ray sweep -c NAME"}
_A = {"experiment": "an experiment", "sweep": "a sweep"}
_SHORT = 100  # a first sentence longer than this is cut at its first top-level colon


@dataclass(frozen=True)
class ShippedFile:
    """One shipped file: its name (the file name without .yaml), path, kind and one-line description."""

    name: str
    path: Path
    kind: str  # "experiment" | "sweep"
    description: str


def shipped_dir() -> Path:
    """The installed folder of the shipped files (the repository's experiments/ in an editable install)."""
    try:
        return Path(str(importlib.resources.files(PACKAGE)))
    except ModuleNotFoundError:  # an editable install made before the mapping existed
        raise FileNotFoundError(
            f"the shipped experiments ({PACKAGE}) are not installed; reinstall moco-ray (pip install -e .)"
        ) from None


def kind_of(name: str) -> str:
    return "sweep" if name.startswith(SWEEP_PREFIX) else "experiment"


def shipped_files(kind: str | None = None) -> list[ShippedFile]:
    """The shipped files (of one kind, or all), the quickstart first, then by name."""
    paths = sorted(shipped_dir().glob(f"*{SUFFIX}"), key=lambda p: (p.stem != QUICKSTART, p.stem))
    files = [ShippedFile(p.stem, p, kind_of(p.stem), description(p.read_text())) for p in paths]
    return [f for f in files if kind is None or f.kind == kind]


def experiment_file(ref: str | os.PathLike, kind: str = "experiment") -> Path:
    """The file ``-c ref`` names: ``ref`` itself when it is a file; else the shipped file of that name (with or
    without .yaml; ``experiments/NAME.yaml`` too, the README's form, with a note when it is not in the current
    directory). FileNotFoundError (one line listing the shipped names of ``kind``) when neither exists;
    ValueError when the shipped file is of the other kind (a sweep file given to pretrain, or the reverse)."""
    given = Path(ref).expanduser()
    if given.is_file():
        return given
    parts = Path(ref).parts
    name = Path(ref).name.removesuffix(SUFFIX)
    shipped = {f.stem: f for f in shipped_dir().glob(f"*{SUFFIX}")}
    if name not in shipped or parts[:-1] not in ((), (REPO_DIR,)):
        names = ", ".join(f.name for f in shipped_files(kind))
        raise FileNotFoundError(
            f"config file not found: {ref}; shipped {kind} files: {names} (`moco-ray experiments` describes them)"
        )
    if kind_of(name) != kind:
        raise ValueError(f"{name} is {_A[kind_of(name)]} file, not {_A[kind]} file: run it with {_command(name)}")
    if parts[:-1]:
        print(f"moco-ray: note: {ref} is not in {Path.cwd()}: using the shipped {shipped[name]}", file=sys.stderr)
    return shipped[name]


def _command(name: str) -> str:
    return KINDS[kind_of(name)].replace("NAME", name)


def description(text: str) -> str:
    """A file's one-line description: the first sentence of its leading comment block (the files open with what
    they are, then the details), cut at its first colon outside parentheses when longer than ``_SHORT``
    characters (the recipe files name the paper, then list its values after a colon)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    head = " ".join(lines).strip()
    sentence = _cut(head, ". ") or head
    if len(sentence) > _SHORT:
        sentence = _cut(sentence, ": ") or sentence
    return sentence.rstrip(" ,;:")


def _cut(text: str, stop: str) -> str:
    """``text`` up to the first ``stop`` outside parentheses (the stop's first character kept unless it is a
    space or a colon), or "" when there is none."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and text.startswith(stop, i):
            return text[: i + 1] if stop[0] == "." else text[:i]
    return ""


__all__ = [
    "KINDS",
    "PACKAGE",
    "QUICKSTART",
    "ShippedFile",
    "description",
    "experiment_file",
    "kind_of",
    "shipped_dir",
    "shipped_files",
]
