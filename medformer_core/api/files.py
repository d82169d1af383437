"""Atomic writes: a file or folder appears complete at its path, or not at all."""

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file or a folder at. When the block ends
    without an error, what it wrote is synced to disk and replaces `path` (a folder too); on an
    error it is removed and `path` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    _remove(temp)  # left by a killed process with the same ids
    try:
        yield temp
        _sync(temp)
        _replace(temp, path)
    finally:
        _remove(temp)


def clean_interrupted_writes(folder: Path) -> None:
    """Tidy what killed `atomic_write`s left in `folder`: a folder caught between its two renames is
    put back, temporary copies are removed. Only while no other process writes there."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if not entry.name.startswith("."):
            continue
        base, old, _ = entry.name[1:].rpartition(".old-")
        if old and not (folder / base).exists():
            os.rename(entry, folder / base)
        elif old or ".tmp-" in entry.name:
            _remove(entry)


def _sync(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def _replace(temp: Path, path: Path) -> None:
    if not path.is_dir():
        os.replace(temp, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    _remove(old)
    os.rename(path, old)
    os.rename(temp, path)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
