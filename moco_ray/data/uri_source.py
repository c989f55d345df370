"""Object storage for `moco-ray ingest`: an ImageFolder tree at a URI, and the checks of a URI before any Ray work.

`UriImageFolderSource` lists ``s3://bucket/prefix`` (any pyarrow / fsspec URI) on the driver with the layout rules,
labels and ids of a local tree (`moco_ray.data.sources.ImageFolderSource`): ``split/class/file`` or ``class/file``,
hidden names skipped, classes sorted by name, ids ``<split>/<class>/<file>``. So an ImageFolder uploaded as it is
ingests into the rows the local ingest writes of the original (only the ``path`` column names the object instead).

The checks turn what would fail minutes later inside a Ray task (no credentials, no such bucket, a read-only
prefix) into one line on the driver, before Ray starts.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import parse_qs, urlparse

import pyarrow.fs as pafs

from moco_ray.data.manifest import join, resolve_fs
from moco_ray.data.sources import Item, _digest

WRITE_PROBE = ".moco-ray-write-check"  # written and deleted once per ingest to prove OUT is writable


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_credentials(uri: str) -> None:
    """``s3://``: ValueError when no AWS credentials can be found (environment, profile, instance role).

    pyarrow's S3 client then sends unsigned requests: AWS answers "Access Denied" without saying why, and an S3
    API that accepts anonymous requests lets the ingest go on as nobody. Uses botocore's own lookup chain (the one
    boto3 and s3fs use); without botocore installed, the error of the first request speaks instead.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or parse_qs(parsed.query).get("anonymous") == ["true"]:
        return
    try:
        import botocore.session  # lazy: optional (boto3 / s3fs bring it); only needed for an s3:// URI
    except ImportError:
        return
    if botocore.session.get_session().get_credentials() is None:
        raise ValueError(
            f"{uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
            "or run where an instance role applies"
        )


def open_location(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a URI whose bucket exists, credentials checked; ValueError in one line otherwise."""
    check_credentials(uri)
    try:
        fs, base = resolve_fs(uri)
        bucket = base.split("/", 1)[0]
        info = fs.get_file_info(bucket) if not isinstance(fs, pafs.LocalFileSystem) else None
    except (OSError, ValueError) as e:
        raise ValueError(f"{uri}: cannot reach it ({first_line(e)})") from None
    if info is not None and info.type == pafs.FileType.NotFound:
        raise ValueError(f"{uri}: bucket {bucket!r} does not exist (create it first; moco-ray creates no buckets)")
    return fs, base.rstrip("/")


def check_writable(fs: pafs.FileSystem, base: str, uri: str) -> None:
    """Write and delete a probe object under `base`: read-only credentials fail here, not in the first task."""
    probe = join(base, WRITE_PROBE)
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"moco-ray ingest write check\n")
        fs.delete_file(probe)
    except OSError as e:
        raise ValueError(f"{uri}: cannot write there ({first_line(e)})") from None


class UriImageFolderSource:
    """An ImageFolder tree at a URI, listed once (one recursive listing); the same layout rules as a local tree.

    Object storage has no symlinks and no empty directories (a class "folder" exists because objects are under
    it), so `unlisted` is always empty; a class prefix holding only deeper objects counts as an empty class folder
    and is refused, as locally.
    """

    def __init__(self, uri: str, split: str | None = None) -> None:
        self.name = uri.rstrip("/")
        self.fs, self.base = open_location(self.name)
        self._dirs, self._files = self._list()
        top = self._dirs.get("", [])
        if not top:
            raise ValueError(f"{self.name}: no subdirectories; expected split/class/image or class/image")
        nested = [bool(self._dirs.get(d)) for d in top]
        if all(nested):
            self._split_dirs = {d: d for d in top}
            if split is not None:
                if split not in self._split_dirs:
                    raise ValueError(f"{self.name}: no split {split!r} (splits: {', '.join(self._split_dirs)})")
                self._split_dirs = {split: split}
        elif not any(nested):
            self._split_dirs = {split or "train": ""}
        else:
            mixed = [d for d, n in zip(top, nested) if n]
            raise ValueError(
                f"{self.name}: mixed layout ({', '.join(mixed)} hold subdirectories, the others hold files); "
                "expected split/class/image or class/image"
            )
        self._class_dirs = {s: [_child(d, c) for c in self._dirs.get(d, [])] for s, d in self._split_dirs.items()}
        self.classes = sorted({PurePosixPath(c).name for dirs in self._class_dirs.values() for c in dirs})
        self._refuse_empty()

    def _list(self) -> tuple[dict[str, list[str]], dict[str, list[tuple[str, int, int]]]]:
        """({dir: [visible subdir names]}, {dir: [(visible file name, size, mtime_ns)]}), dirs relative to the root,
        every list sorted by name."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.base, recursive=True))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.name}: no such directory (expected an ImageFolder tree split/class/image)"
            ) from None
        except OSError as e:
            raise ValueError(f"{self.name}: cannot list it ({first_line(e)})") from None
        dirs: dict[str, set[str]] = {}
        files: dict[str, list[tuple[str, int, int]]] = {}
        for info in infos:
            rel = PurePosixPath(info.path[len(self.base) :].lstrip("/"))
            if not rel.parts or any(p.startswith(".") for p in rel.parts):
                continue  # hidden files and folders are not data (.DS_Store, .ipynb_checkpoints)
            if info.type == pafs.FileType.File:
                files.setdefault(_parent(rel), []).append((rel.name, info.size, info.mtime_ns or 0))
            elif info.type != pafs.FileType.Directory:
                continue
            # a folder exists through the objects under it (listings need not name it) or as a marker object
            for folder in [rel.parent] if info.type == pafs.FileType.File else [rel]:
                while str(folder) != ".":
                    dirs.setdefault(_parent(folder), set()).add(folder.name)
                    folder = folder.parent
        return {d: sorted(c) for d, c in dirs.items()}, {d: sorted(f) for d, f in files.items()}

    def _refuse_empty(self) -> None:
        empty = [c for dirs in self._class_dirs.values() for c in dirs if not self._files.get(c)]
        if not empty:
            return
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        raise ValueError(
            f"{self.name}: no files in class folder(s) {', '.join(empty[:5])}{more}; an empty class would still "
            "take a label: add images or remove the folder(s)"
        )

    def _listing(self) -> dict[str, list[tuple[str, int, int]]]:
        """split -> [(class/file, size, mtime_ns)], as `ImageFolderSource._listing` (the ingest plans by size)."""
        out: dict[str, list[tuple[str, int, int]]] = {}
        for split, dirs in self._class_dirs.items():
            out[split] = [
                (f"{PurePosixPath(c).name}/{name}", size, mtime) for c in dirs for name, size, mtime in self._files[c]
            ]
        return out

    def splits(self) -> list[str]:
        return list(self._split_dirs)

    def items(self, split: str) -> list[Item]:
        index = {c: i for i, c in enumerate(self.classes)}
        root = self._split_dirs[split]
        rows = []
        for rel, _, _ in self._listing()[split]:
            key = join(self.base, _child(root, rel))
            rows.append(Item(split, index[rel.split("/", 1)[0]], f"{split}/{rel}", self._uri(key), key))
        return rows

    def _uri(self, key: str) -> str:
        scheme = urlparse(self.name).scheme
        return f"{scheme}://{key}"

    def load(self, item: Item) -> bytes:
        with self.fs.open_input_stream(item.file) as f:  # type: ignore[arg-type]
            return f.read()

    def fingerprint(self) -> str:
        content: dict[str, Any] = {"root": self.name, "splits": self.splits(), "files": self._listing()}
        return _digest(content)

    def unlisted(self) -> list[dict[str, str]]:
        return []


def _child(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _parent(rel: PurePosixPath) -> str:
    return "" if str(rel.parent) == "." else str(rel.parent)
