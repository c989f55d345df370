"""Small real image trees and the real ``moco-ray ingest`` CLI in a subprocess, for the tests in tests/data/ (real
tmpfs mounts, a read-only or a full file system, are moco_helpers.tmpfs)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def image_tree(root: Path, per_class: int = 3, classes: int = 2, size: int = 16, big: int = 0) -> Path:
    """``root/train/cNN/NNN.png``: real PNGs of random pixels (`size` px). With `big`, every image is one flat
    `big` px square instead: a few KB on disk, but each full decode at ingest takes a noticeable time.
    """
    rng = np.random.default_rng(0)
    flat = b""
    if big:
        buf = io.BytesIO()
        Image.new("RGB", (big, big), (200, 120, 40)).save(buf, format="PNG")
        flat = buf.getvalue()
    for c in range(classes):
        d = root / "train" / f"c{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            if flat:
                (d / f"{i:03d}.png").write_bytes(flat)
            else:
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return root


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def cli_ingest(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``moco-ray ingest ARGS`` through the real CLI entry point, in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "moco_ray.cli.main", "ingest", *map(str, args), "--workers", "1"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(p: subprocess.CompletedProcess) -> str:
    """The CLI's single ``moco-ray: error: ...`` line (asserting exit 2 and no traceback)."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moco-ray: error: "), p.stderr
    return lines[0]


def files_state(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file under root."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
