"""Atomic folder writes: a folder appears under its final name complete, or not at all.

``write_folder_atomically(directory, write)`` runs ``write(tmp)`` into a temporary sibling folder,
fsyncs every file and folder, then renames it into place (an existing folder is moved aside first
and removed afterwards). A crash at any point leaves either the old folder or the new one, never a
half-written one, plus at worst a hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` sibling.
Used for adapters, exported experts and training checkpoints.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for path in [*(p for p in root.rglob("*") if p.is_dir()), root]:
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_folder_atomically(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a temporary sibling folder, fsync it, then rename it to ``directory``."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        _fsync_tree(tmp)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory
