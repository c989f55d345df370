"""What a sweep keeps in its Tune experiment directory, beside Tune's own state.

Two files: the parent MLflow run's id, and the sweep as it was started (base config layers, the overrides every
trial shares, search space, settings). ``--resume`` reads both, so it continues the same parent run with the same
search: Tune's restored search space cannot change, whatever the sweep file says by then. Written through
pyarrow's filesystems, as the experiment directory may be local or remote (``s3://...``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.fs

from moco_ray.tuning.space import SearchSpec, SweepSettings, parse_search, settings_from

PARENT_FILE = "moco_ray_parent_run.txt"
STATE_FILE = "moco_ray_sweep.json"


@dataclass(frozen=True)
class SweepState:
    """The sweep as started: ``base_raw`` (config layers before resolution), ``fixed`` (dotted overrides the sweep
    sets on every trial: tracking store and experiment, absolute paths), its search space and settings."""

    base_raw: dict[str, Any]
    fixed: dict[str, Any]
    search: dict[str, SearchSpec]
    settings: SweepSettings

    def to_json(self) -> str:
        state = {
            "base_raw": self.base_raw,
            "fixed": self.fixed,
            "search": {k: {sp.kind: sp.values} for k, sp in self.search.items()},
            "settings": asdict(self.settings),
        }
        return json.dumps(state, indent=1, default=str)

    @classmethod
    def from_json(cls, text: str) -> SweepState:
        d = json.loads(text)
        return cls(d["base_raw"], d["fixed"], parse_search(d["search"]), settings_from(d["settings"]))


def save(exp_dir: str, state: SweepState, parent_run_id: str) -> None:
    """Both files; the parent's id last, so a directory with it always has the sweep too."""
    _write(f"{exp_dir}/{STATE_FILE}", state.to_json())
    _write(f"{exp_dir}/{PARENT_FILE}", parent_run_id + "\n")


def parent_run_id(exp_dir: str) -> str | None:
    """The parent run's id; None when the directory holds no sweep ("" when the file is empty)."""
    text = _read(f"{exp_dir}/{PARENT_FILE}")
    return None if text is None else text.strip()


def load(exp_dir: str) -> SweepState:
    return SweepState.from_json(_read(f"{exp_dir}/{STATE_FILE}") or "{}")


def _write(path: str, text: str) -> None:
    fs, p = pyarrow.fs.FileSystem.from_uri(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def _read(path: str) -> str | None:
    fs, p = pyarrow.fs.FileSystem.from_uri(path)
    if fs.get_file_info(p).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode()
