"""Image trees in the test session's S3 (moto's server, see s3_server.py), uploaded with s3fs as a user would, and
what a prefix holds, for the object-storage ingest tests in tests/data/ and tests/jobs/."""

from __future__ import annotations

import io
from pathlib import Path

import boto3
import numpy as np
import s3fs
from PIL import Image

BAD_FILES = ("empty.png", "notes.png", "truncated.png")


def _png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def image_tree(
    root: Path, per_class: int = 3, classes: int = 2, splits: tuple[str, ...] = ("train",), big: int = 0
) -> Path:
    """``root/<split>/cNN/NNN.png``: real PNGs of random pixels, or with `big` one flat `big` px square each (a few
    KB to upload, a noticeable time to decode)."""
    flat = b""
    if big:
        buf = io.BytesIO()
        Image.new("RGB", (big, big), (200, 120, 40)).save(buf, format="PNG")
        flat = buf.getvalue()
    n = 0
    for split in splits:
        for c in range(classes):
            d = root / split / f"c{c:02d}"
            d.mkdir(parents=True)
            for i in range(per_class):
                (d / f"{i:03d}.png").write_bytes(flat or _png(n))
                n += 1
    return root


def add_bad_files(root: Path) -> Path:
    """An empty file, a text file named .png and a truncated PNG in the first class of the first split."""
    cls = sorted(sorted(root.iterdir())[0].iterdir())[0]
    good = _png(10_000, size=48)
    for name, data in zip(BAD_FILES, (b"", b"not an image\n", good[: len(good) // 2])):
        (cls / name).write_bytes(data)
    return root


def upload(local: Path, uri: str) -> str:
    """Copy a local tree to ``uri`` (``s3://bucket/prefix``) with s3fs; returns the URI."""
    s3fs.S3FileSystem().put(f"{local}/", uri.removeprefix("s3://"), recursive=True)
    return uri


def put(uri: str, data: bytes) -> None:
    with s3fs.S3FileSystem().open(uri.removeprefix("s3://"), "wb") as f:
        f.write(data)


def objects(uri: str) -> dict[str, tuple[str, str]]:
    """key (relative to ``uri``) -> (ETag, LastModified) of every object under it; folder markers left out."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
    return {
        o["Key"][len(prefix) + 1 :]: (o["ETag"], str(o["LastModified"]))
        for page in pages
        for o in page.get("Contents", [])
        if not o["Key"].endswith("/")
    }
