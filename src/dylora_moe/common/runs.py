"""Run folders and where their adapters are: the layout every feature and command shares (stdlib + core).

A training run's folder::

    runs/cpu-demo/
      checkpoint-40/            trainer_state.json, adapter/ (an adapter folder), optimizer, ... (training)
      final/                    the final adapter folder
      train_config.json, metrics.json, routing.png, tensorboard/

``resolve_adapter_dir(path)`` accepts any of: an adapter folder, a ``checkpoint-<step>``, or a run folder
(its ``final/``, else its latest checkpoint's adapter); ``run_dir_of(adapter)`` goes back up.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError
from ..hub import resolve_checkpoint
from ..layout import ADAPTER_DIR, CHECKPOINT_PREFIX, FINAL_DIR, STATE_FILE, TRAIN_CONFIG_FILE
from ..layout import CONFIG_FILE as ADAPTER_CONFIG_FILE

__all__ = ["ADAPTER_DIR", "CHECKPOINT_PREFIX", "FINAL_DIR", "STATE_FILE", "TRAIN_CONFIG_FILE", "checkpoint_dir",
           "latest_checkpoint", "list_checkpoints", "resolve_adapter_dir", "run_dir_of"]

_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-<step>`` folders of ``output_dir``, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_adapter_dir(path: str | Path) -> Path:
    """The adapter folder of ``path``: an adapter folder itself, a ``checkpoint-<step>``, a run directory (its
    ``final/`` adapter, else its latest checkpoint), or a Hub id (``owner/name``, downloaded)."""
    path = resolve_checkpoint(path)  # a Hub id: its downloaded (or cached) folder
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    candidates = [path, path / ADAPTER_DIR, path / FINAL_DIR]
    latest = latest_checkpoint(path)
    if latest is not None:
        candidates.append(latest / ADAPTER_DIR)
    for candidate in candidates:
        if (candidate / ADAPTER_CONFIG_FILE).is_file():
            return candidate
    raise CheckpointError(f"{path}: no DyLoRA-MoE adapter here (looked for {ADAPTER_CONFIG_FILE} in it, in "
                          f"{ADAPTER_DIR}/, {FINAL_DIR}/ and the latest {CHECKPOINT_PREFIX}<step>/)")


def run_dir_of(adapter_dir: str | Path) -> Path:
    """The run directory an adapter folder belongs to (``.../final`` or ``.../checkpoint-N/adapter``)."""
    adapter_dir = Path(adapter_dir).resolve()
    if adapter_dir.name == ADAPTER_DIR and _NAME.match(adapter_dir.parent.name):
        return adapter_dir.parent.parent
    if adapter_dir.name == FINAL_DIR:
        return adapter_dir.parent
    return adapter_dir
