"""Atomic folder writes: a folder appears under its final name complete, or not at all.

``write_folder_atomically(directory, write)`` runs ``write(tmp)`` into a temporary sibling folder,
fsyncs every file and folder, then renames it into place (an existing folder is moved aside first
and removed afterwards). A crash at any point leaves either the old folder or the new one, never a
half-written one, plus at worst a hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` sibling.
``remove_folder_atomically(directory)`` is the same for deletion: the folder is renamed aside before
its files are removed, so a crash never leaves it half-deleted under its own name.
Used for adapters, exported experts and training checkpoints (written and rotated).
``write_text_atomically(path, text)`` is the same for one file (a temporary sibling, fsync, rename): used for
evaluation results and study records.
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
    return publish_folder(temporary_sibling(directory), directory, write)


def temporary_sibling(directory: str | Path) -> Path:
    """A new empty hidden folder beside ``directory`` to build it in (several processes may write into it
    before :func:`publish_folder`)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))


def publish_folder(tmp: Path, directory: str | Path, write: Callable[[Path], None] | None = None) -> Path:
    """Run ``write(tmp)`` (if given), fsync ``tmp``, then rename it to ``directory`` (an older ``directory`` is
    replaced only once the new one is complete); ``tmp`` is removed if anything fails."""
    directory = Path(directory)
    try:
        if write is not None:
            write(tmp)
        _fsync_tree(tmp)
        old = _move_aside(directory) if directory.exists() else None
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _move_aside(directory: Path) -> Path:
    """Rename ``directory`` to a hidden ``.NAME.old-<pid>`` sibling (one atomic rename); return the new path."""
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    os.replace(directory, old)
    return old


def remove_folder_atomically(directory: str | Path) -> None:
    """Delete ``directory``: first renamed aside (atomic, made durable), then its files removed. A crash
    leaves the folder whole under its name, or gone from it (at worst a hidden ``.NAME.old-*`` sibling)."""
    directory = Path(directory)
    old = _move_aside(directory)
    _fsync_dir(directory.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write ``path`` whole or not at all: a temporary sibling, fsynced, renamed over it (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path
