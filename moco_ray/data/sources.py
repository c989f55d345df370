"""What `ingest` can read: an ImageFolder tree, a torchvision dataset by name, or scikit-learn's digits.

A source lists its rows (`Item`s, in a stable order so ids and shards are reproducible), loads one row's encoded
bytes, and gives a cheap fingerprint of its content, which makes a second ingest of the same source a no-op.

File names that are not valid UTF-8 (a Latin-1 name copied from an old disk) are rows like any other. Parquet
strings and ids must be UTF-8, so such a name is kept two ways: byte-exact in the ``path`` column and the manifest's
``skipped`` list as a ``file://`` URI with its bytes percent-encoded (`path_text`; `path_bytes` gives the bytes
back), and readable in ids, class and split names with each undecodable byte as ``\\xNN`` (`shown_name`, what
``ls -b`` prints). Both depend only on the bytes, so the id is the same every ingest.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import urllib.error
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from moco_ray.data.digits import CLASSES, digits_arrays, png_bytes, split_indices

TORCHVISION = {
    # name -> (torchvision class, {split: constructor kwargs})
    "cifar10": ("CIFAR10", {"train": {"train": True}, "test": {"train": False}}),
    "cifar100": ("CIFAR100", {"train": {"train": True}, "test": {"train": False}}),
    "stl10": ("STL10", {"train": {"split": "train"}, "test": {"split": "test"}, "unlabeled": {"split": "unlabeled"}}),
}
DIGITS_SIZE = 32


@dataclass(frozen=True)
class Item:
    split: str
    label: int  # -1 when unlabeled
    id: str  # stable row id
    path: str  # source file path (as `path_text` stores it), or "<scheme>:<name>:<split>:<index>"
    file: str | None = None  # local file to read; None for in-memory datasets (see `index`)
    index: int = -1


class Source(Protocol):
    name: str
    classes: list[str]

    def splits(self) -> list[str]: ...
    def items(self, split: str) -> list[Item]: ...
    def load(self, item: Item) -> bytes: ...
    def fingerprint(self) -> str: ...
    def unlisted(self) -> list[dict[str, str]]: ...  # entries found but not rows: {"path", "reason"}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def shown_name(name: str) -> str:
    """`name` as UTF-8 text: itself when its bytes are valid UTF-8, else each undecodable byte as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def path_text(path: str | os.PathLike) -> str:
    """A source path as the shards and the manifest store it: the path itself when valid UTF-8, else a
    ``file://`` URI of its percent-encoded bytes (RFC 8089). Stored paths are absolute, so the forms never mix."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "file://" + urllib.parse.quote(raw, safe="/")


def path_bytes(text: str) -> bytes:
    """The exact bytes of a path stored by `path_text` (to open the file, ``os.fsdecode`` them)."""
    if text.startswith("file://"):
        return urllib.parse.unquote_to_bytes(text[len("file://") :])
    return os.fsencode(text)


def _visible(p: os.DirEntry | Path) -> bool:
    return not p.name.startswith(".")  # .DS_Store, ._foo, .ipynb_checkpoints are not data


def broken_link(p: Path) -> str | None:
    """Why the symlink `p` cannot be followed ("dangling symlink", "symlink loop"), or None when it can (or p is
    no symlink). A link to a directory containing it (the link's own directory or an ancestor) is a loop too: a
    tree walk following it would never end.
    """
    if not p.is_symlink():
        return None
    try:
        os.stat(p)
    except FileNotFoundError:
        return "dangling symlink"
    except OSError as e:
        return "symlink loop" if e.errno == errno.ELOOP else f"unreadable symlink ({e.strerror or e})"
    if os.path.isdir(p):
        target, here = Path(os.path.realpath(p)), Path(os.path.realpath(p.parent))
        if target == here or target in here.parents:
            return "symlink loop"
    return None


class ImageFolderSource:
    """``root/split/class/file`` or ``root/class/file`` (the latter is one split, "train" unless `split` names it).

    Every visible file under a class directory is a row candidate (the ingest validates and skips non-images, so
    they show up in the manifest instead of vanishing); files directly under the root or a split (READMEs) are
    not rows. Symlinks are followed, except dangling ones and loops (a link to itself or to a directory holding
    it): those are not rows but `unlisted` entries, which the ingest skips and lists like bad files. A class
    directory without any file is refused when the files are first listed (see `_refuse_empty`).
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{root}: no such directory (expected an ImageFolder tree split/class/image)")
        self.name = str(self.root)
        self._broken: list[dict[str, str]] = []  # dangling or looping symlinks among the directories
        top = self._subdirs(self.root)
        if not top:
            raise ValueError(f"{root}: no subdirectories; expected split/class/image or class/image")
        nested = [any(c.is_dir() and _visible(c) and broken_link(c) is None for c in d.iterdir()) for d in top]
        if all(nested):
            self._split_dirs = {shown_name(d.name): d for d in top}
            if split is not None:
                if split not in self._split_dirs:
                    raise ValueError(f"{root}: no split {split!r} (splits: {', '.join(self._split_dirs)})")
                self._split_dirs = {split: self._split_dirs[split]}
                self._broken = []  # broken links at the top were other splits, if anything
        elif not any(nested):
            self._split_dirs = {split or "train": self.root}
        else:
            mixed = [d.name for d, n in zip(top, nested) if n]
            raise ValueError(
                f"{root}: mixed layout ({', '.join(mixed)} hold subdirectories, the others hold files); "
                "expected split/class/image or class/image"
            )
        self._class_dirs = {s: (self._subdirs(d) if d != self.root else top) for s, d in self._split_dirs.items()}
        self.classes = sorted({shown_name(c.name) for dirs in self._class_dirs.values() for c in dirs})
        self._files: dict[str, list[tuple[str, int, int]]] | None = None  # split -> [(relpath, size, mtime_ns)]

    def _subdirs(self, d: Path) -> list[Path]:
        """The visible subdirectories of `d`, sorted; broken symlinks among its entries go to `_broken`."""
        dirs = []
        for p in sorted(d.iterdir(), key=lambda p: p.name):
            if not _visible(p):
                continue
            reason = broken_link(p)
            if reason:
                self._broken.append({"path": path_text(p), "reason": reason})
            elif p.is_dir():
                dirs.append(p)
        return dirs

    def _listing(self) -> dict[str, list[tuple[str, int, int]]]:
        """split -> [(class/file, size, mtime_ns)]; a class folder without any file is refused (see `_refuse_empty`)."""
        if self._files is None:
            files: dict[str, list[tuple[str, int, int]]] = {}
            empty: list[Path] = []
            for split, dirs in self._class_dirs.items():
                rows = []
                for c in dirs:
                    found = self._class_files(c)
                    if not found:
                        empty.append(c)
                    rows += found
                files[split] = rows
            self._refuse_empty(empty)
            self._files = files
        return self._files

    def _class_files(self, c: Path) -> list[tuple[str, int, int]]:
        """The visible files of class folder `c`; broken symlinks among them go to `_broken`, and so does a name that
        is not UTF-8 when its `shown_name` is another file's name (the two rows would share an id)."""
        rows = []
        entries = sorted(os.scandir(c), key=lambda e: e.name)
        names = {e.name for e in entries}
        for e in entries:
            if not _visible(e):
                continue
            reason = broken_link(Path(e.path)) if e.is_symlink() else None
            if shown_name(e.name) != e.name and shown_name(e.name) in names:
                reason = f"name not UTF-8, and its escaped form {shown_name(e.name)} is another file's name"
            if reason:
                self._broken.append({"path": path_text(c / e.name), "reason": reason})
            elif e.is_file():
                st = e.stat()
                rows.append((f"{c.name}/{e.name}", st.st_size, st.st_mtime_ns))
        return rows

    def _refuse_empty(self, empty: list[Path]) -> None:
        """An empty class folder would still take a label index (the later classes' labels shift; beside one real
        class, kNN scores a meaningless 1.0); torchvision's ImageFolder refuses it too ("Found no valid file for the
        classes ..."). Refused before anything is written, naming the folders relative to the root."""
        if not empty:
            return
        names = [str(c.relative_to(self.root)) for c in empty]
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        raise ValueError(
            f"{self.name}: no files in class folder(s) {', '.join(names[:5])}{more}; an empty class would still "
            "take a label: add images or remove the folder(s)"
        )

    def unlisted(self) -> list[dict[str, str]]:
        self._listing()
        return sorted(self._broken, key=lambda b: b["path"])

    def splits(self) -> list[str]:
        return list(self._split_dirs)

    def items(self, split: str) -> list[Item]:
        base = self._split_dirs[split]
        index = {c: i for i, c in enumerate(self.classes)}
        return [
            Item(
                split,
                index[shown_name(rel.split("/", 1)[0])],
                f"{split}/{shown_name(rel)}",
                path_text(base / rel),
                str(base / rel),
            )
            for rel, _, _ in self._listing()[split]
        ]

    def load(self, item: Item) -> bytes:
        return Path(item.file).read_bytes()  # type: ignore[arg-type]

    def fingerprint(self) -> str:
        content: dict[str, Any] = {"root": self.name, "splits": self.splits(), "files": self._listing()}
        if self._broken:  # only then, so the fingerprint of a tree without any stays what it was
            content["unlisted"] = self.unlisted()
        return _digest(content)


class DatasetUnavailableError(FileNotFoundError):
    """A named dataset is neither in the cache nor downloadable (e.g. no network)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOCO_RAY_CACHE", Path.home() / ".cache" / "moco-ray")) / "torchvision"


class TorchvisionSource:
    """``torchvision:cifar10|cifar100|stl10``: downloaded once into the cache dir, images stored as PNG."""

    def __init__(self, name: str, split: str | None = None, cache_dir: str | os.PathLike | None = None) -> None:
        if name not in TORCHVISION:
            raise ValueError(f"torchvision:{name}: unknown dataset; known: {', '.join(TORCHVISION)}")
        self.dataset, self.name = name, f"torchvision:{name}"
        cls_name, split_kwargs = TORCHVISION[name]
        if split is not None and split not in split_kwargs:
            raise ValueError(f"{self.name}: no split {split!r} (splits: {', '.join(split_kwargs)})")
        self._splits = [split] if split else list(split_kwargs)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._cls_name, self._split_kwargs = cls_name, split_kwargs
        self._ds: dict[str, Any] = {}
        self.classes = list(self._open(self._splits[0]).classes)

    def _open(self, split: str) -> Any:
        if split not in self._ds:
            import torchvision.datasets as tvd  # lazy: heavy, and only the torchvision sources need it

            cls = getattr(tvd, self._cls_name)
            kwargs = self._split_kwargs[split]
            try:
                self._ds[split] = cls(str(self.cache_dir), download=True, **kwargs)
            except (urllib.error.URLError, OSError, RuntimeError) as e:
                reason = getattr(e, "reason", None) or e
                raise DatasetUnavailableError(
                    f"{self.name}: not in {self.cache_dir} and the download failed ({reason}); with no network, "
                    f"put the torchvision files there (or set MOCO_RAY_CACHE), or ingest an ImageFolder tree"
                ) from None
        return self._ds[split]

    def splits(self) -> list[str]:
        return list(self._splits)

    def items(self, split: str) -> list[Item]:
        ds = self._open(split)
        labels = getattr(ds, "targets", None)
        if labels is None:
            labels = ds.labels  # STL10 (-1 for the unlabeled split)
        return [
            Item(split, int(y), f"{self.dataset}/{split}/{i}", f"{self.name}:{split}:{i}", index=i)
            for i, y in enumerate(labels)
        ]

    def load(self, item: Item) -> bytes:
        img, _ = self._open(item.split)[item.index]  # PIL image
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")  # lossless: the stored pixels are the dataset's pixels
        return buf.getvalue()

    def fingerprint(self) -> str:
        return _digest({"source": self.name, "splits": self._splits})

    def unlisted(self) -> list[dict[str, str]]:
        return []


class DigitsSource:
    """scikit-learn's bundled 8x8 digits (offline), upscaled to 32 px PNGs; a fixed 80/20 train/test split."""

    def __init__(self, split: str | None = None, size: int = DIGITS_SIZE) -> None:
        self.name, self.size, self.classes = "digits", size, list(CLASSES)
        if split is not None and split not in ("train", "test"):
            raise ValueError(f"digits: no split {split!r} (splits: train, test)")
        self._splits = [split] if split else ["train", "test"]
        self._imgs, self._labels = digits_arrays(size)
        train, test = split_indices(len(self._labels))
        self._index = {"train": train, "test": test}

    def splits(self) -> list[str]:
        return list(self._splits)

    def items(self, split: str) -> list[Item]:
        return [
            Item(split, int(self._labels[i]), f"digits/{split}/{i:04d}", f"sklearn:digits:{split}:{i}", index=int(i))
            for i in self._index[split]
        ]

    def load(self, item: Item) -> bytes:
        return png_bytes(self._imgs[item.index])

    def fingerprint(self) -> str:
        return _digest({"source": "digits", "size": self.size, "splits": self._splits})

    def unlisted(self) -> list[dict[str, str]]:
        return []


def open_source(spec: str | os.PathLike, *, split: str | None = None, cache_dir: str | None = None) -> Source:
    """``digits``, ``torchvision:NAME`` or an ImageFolder directory."""
    s = str(spec)
    if s == "digits":
        return DigitsSource(split)
    if s.startswith("torchvision:"):
        return TorchvisionSource(s.split(":", 1)[1], split, cache_dir)
    if "://" in s:
        raise ValueError(f"{s}: ingest reads local image trees; copy it locally first")
    return ImageFolderSource(s, split)
