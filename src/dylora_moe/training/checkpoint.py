"""Training checkpoints: ``checkpoint-<step>`` folders holding everything needed to resume exactly.

A checkpoint folder (written atomically: built in a temporary sibling folder, every file and
folder fsynced, then renamed into place, so a crash never leaves a half-written checkpoint under
its final name) holds::

    checkpoint-40/
      adapter/              experts + router (DyLoRAMoEForCausalLM.save_pretrained; loadable with
                            DyLoRAMoEForCausalLM.from_pretrained)
      optimizer.pt          optimizer state dict      (torch.save; loads with weights_only=True)
      sharded/              instead of optimizer.pt under train.distributed=fsdp: adapter and optimizer
                            shards of every process (torch.distributed.checkpoint; resumes on any number
                            of processes); adapter/ then holds the gathered adapter
      scheduler.pt          LR scheduler state dict
      rng_state.pt          python / numpy / torch (/ cuda) RNG states, one entry per process
      trainer_state.json    format_version, global_step, epoch, sampler position, eval history, ...
      train_config.json     the run's TrainConfig
      manifest.json         size and SHA-256 of every other file (written last; verify_checkpoint)

Usage::

    save_checkpoint(out / "checkpoint-40", model=m, optimizer=o, scheduler=s,
                    rng_states=[capture_rng_state()], state={...}, config=cfg)
    prune_checkpoints(out, keep=2)
    latest = latest_checkpoint(out)                 # Path or None
    verify_checkpoint(latest)                       # CheckpointError naming a truncated or corrupt file
    good, skipped = newest_valid_checkpoint(out)    # what --resume uses
    state = load_trainer_state(latest)
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..atomic import publish_folder, remove_folder_atomically, write_folder_atomically
from ..common.runs import (
    ADAPTER_DIR,
    STATE_FILE,
    TRAIN_CONFIG_FILE,
    list_checkpoints,
)
from ..serialization import (
    CONFIG_FILE as ADAPTER_CONFIG_FILE,
)
from ..serialization import (
    WEIGHTS_FILE,
    CheckpointError,
    check_fingerprint,
    load_adapter_tensors,
    read_checkpoint_meta,
    read_versioned_json,
    save_model,
)

STATE_FORMAT_VERSION = 1
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
MANIFEST_FILE = "manifest.json"
#: adapter and optimizer shards of sharded training (torch.distributed.checkpoint), instead of optimizer.pt
SHARDED_DIR = "sharded"
MANIFEST_FORMAT_VERSION = 1
#: what every checkpoint holds, checked by presence in one written before manifests
LEGACY_FILES = (STATE_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, f"{ADAPTER_DIR}/{ADAPTER_CONFIG_FILE}",
                f"{ADAPTER_DIR}/{WEIGHTS_FILE}")


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (``keep=0`` keeps all); return the deleted ones. Each goes
    atomically: killed in the middle, a half-deleted checkpoint never remains under a checkpoint name."""
    if keep <= 0:
        return []
    doomed = list_checkpoints(output_dir)[:-keep]
    for path in doomed:
        remove_folder_atomically(path)
    return doomed


# ----------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """This process's python / numpy / torch (/ cuda) RNG states, as tensors and plain lists."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- save / load
def save_checkpoint(
    directory: str | Path,
    *,
    model,
    optimizer,
    scheduler,
    rng_states: list[dict[str, Any]],
    state: dict[str, Any],
    config,
) -> Path:
    """Write one checkpoint folder atomically (call on the main process only)."""
    optimizer_state = optimizer.state_dict()
    write_rest = _state_files(scheduler, rng_states, state, config)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp / ADAPTER_DIR)
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        write_rest(tmp)

    return write_folder_atomically(directory, write)


def finish_sharded_checkpoint(
    tmp: Path,
    directory: str | Path,
    *,
    model,
    adapter: dict[str, torch.Tensor],
    fingerprint: dict[str, Any],
    scheduler,
    rng_states: list[dict[str, Any]],
    state: dict[str, Any],
    config,
) -> Path:
    """Complete a checkpoint of sharded training (main process, once every process has written its shards of
    the adapter and optimizer into ``tmp / SHARDED_DIR``): the gathered adapter (``adapter/``, loadable by
    ``from_pretrained``), scheduler, RNG and trainer state, config and manifest; then ``tmp`` becomes
    ``directory`` atomically, as :func:`save_checkpoint`."""
    write_rest = _state_files(scheduler, rng_states, state, config)

    def write(tmp: Path) -> None:
        save_model(model, tmp / ADAPTER_DIR, tensors=adapter, fingerprint=fingerprint)
        write_rest(tmp)

    return publish_folder(tmp, directory, write)


def _state_files(scheduler, rng_states: list[dict[str, Any]], state: dict[str, Any], config):
    """A writer of the files every checkpoint holds besides adapter and optimizer (the manifest last)."""
    payload = {"format_version": STATE_FORMAT_VERSION, **state}
    scheduler_state = scheduler.state_dict()

    def write(tmp: Path) -> None:
        torch.save(scheduler_state, tmp / SCHEDULER_FILE)
        torch.save(rng_states, tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        config.to_json_file(tmp / TRAIN_CONFIG_FILE)
        write_manifest(tmp)

    return write


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | Path) -> None:
    """Record the size and SHA-256 of every file below ``directory`` in its ``manifest.json``."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    (directory / MANIFEST_FILE).write_text(json.dumps({"format_version": MANIFEST_FORMAT_VERSION, "files": files},
                                                      indent=1) + "\n")


def verify_checkpoint(directory: str | Path) -> None:
    """Check every file of a checkpoint against its manifest; a ``CheckpointError`` names the first file that
    is missing, truncated or corrupt. A checkpoint from before manifests has no sizes or digests to check
    against: it must still hold every file a checkpoint is resumed from, none of them empty."""
    directory = Path(directory)
    if not (directory / MANIFEST_FILE).is_file():
        if not (directory / STATE_FILE).is_file():
            raise CheckpointError(f"{directory}: no {MANIFEST_FILE} and no {STATE_FILE}: not a checkpoint")
        for name in LEGACY_FILES:
            path = directory / name
            if not path.is_file() or path.stat().st_size == 0:
                raise CheckpointError(f"{path}: {'empty' if path.is_file() else 'missing'} (a checkpoint "
                                      f"without {MANIFEST_FILE} must still hold {', '.join(LEGACY_FILES)})")
        return
    manifest = read_versioned_json(directory, MANIFEST_FILE, what="checkpoint manifest",
                                   max_version=MANIFEST_FORMAT_VERSION, required=("files",))
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {entry['size']} (truncated or "
                                  "overwritten)")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: contents differ from the manifest's SHA-256 (corrupt)")


def newest_valid_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest ``checkpoint-<step>`` that passes :func:`verify_checkpoint`, and the newer ones skipped
    (with why)."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
            return path, skipped
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
    return None, skipped


def load_trainer_state(directory: str | Path) -> dict[str, Any]:
    """Read and check ``trainer_state.json`` of a checkpoint folder."""
    return read_versioned_json(
        directory, STATE_FILE, what="training checkpoint", max_version=STATE_FORMAT_VERSION,
        required=("global_step", "sampler", "eval_history", "world_size"),
    )


def load_torch_file(directory: str | Path, name: str) -> Any:
    """``torch.load`` one of the checkpoint's state files (tensors and plain data only)."""
    path = Path(directory) / name
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (incomplete checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise CheckpointError(f"{path}: unreadable or corrupt ({exc})") from exc


def load_adapter_weights(model, directory: str | Path) -> None:
    """Copy the expert and router tensors (router feature statistics and the expert layers' saved frozen tensors
    included) saved in ``directory`` into ``model`` (same structure)."""
    directory = Path(directory)
    meta = read_checkpoint_meta(directory)
    check_fingerprint(meta["base_model"], model.base_model, str(directory))
    if list(meta["expert_ranks"]) != list(model.expert_ranks):
        raise CheckpointError(f"{directory}: expert ranks {meta['expert_ranks']} do not match the model's "
                              f"{model.expert_ranks} (was the moe config changed?)")
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except FileNotFoundError:
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: file not found") from None
    except Exception as exc:
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: unreadable or corrupt ({exc})") from exc
    load_adapter_tensors(model, tensors, directory)
