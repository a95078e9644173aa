"""Adapters on the Hugging Face Hub: push a checkpoint folder, and load one by its Hub id.

``push_folder(folder, "me/my-adapter")`` creates the model repository (if needed) and uploads the adapter
folder as it is: weights, config, attachments and the model card (``README.md``). ``resolve_checkpoint(name)``
gives a local folder for ``name``: the folder itself when it exists, else the Hub repository ``name``
downloaded (or found in the Hugging Face cache when offline). ``from_pretrained`` and every command that
takes a checkpoint go through it::

    push_folder("runs/cpu-demo/final", "me/dylora-cpu-demo", private=True)
    model = DyLoRAMoEForCausalLM.from_pretrained("me/dylora-cpu-demo")

Errors (no network, an unknown repository, no DyLoRA-MoE adapter in it) are :class:`CheckpointError`\\ s
that say which.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .layout import CONFIG_FILE

__all__ = ["looks_like_hub_id", "push_folder", "resolve_checkpoint"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` with Hub-legal characters, and not a local path: neither it nor its first part exists
    here (``runs/typo`` is a missing local folder, not a repository of the user ``runs``)."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists() and not Path(name).parent.exists()


def resolve_checkpoint(name_or_path: str | Path, *, revision: str | None = None) -> Path:
    """A local folder for ``name_or_path`` (see the module docstring); unchanged when it is not a Hub id."""
    path = Path(name_or_path)
    if path.exists() or not looks_like_hub_id(str(name_or_path)):
        return path
    import huggingface_hub  # here, not at the top: only the Hub path needs it

    try:
        folder = Path(huggingface_hub.snapshot_download(str(name_or_path), revision=revision))
    except Exception as exc:  # offline, unknown repository, no access: one clear error, not a traceback
        raise CheckpointError(
            f"{name_or_path}: not a local folder, and the Hugging Face Hub repository could not be fetched "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); check the id, the "
            "network (or HF_HUB_OFFLINE with a cached copy) and your token") from None
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{name_or_path}: the Hub repository holds no DyLoRA-MoE adapter ({CONFIG_FILE} "
                              "not found)")
    return folder


def push_folder(folder: str | Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload DyLoRA-MoE adapter", revision: str | None = None) -> str:
    """Upload the adapter ``folder`` to the Hub model repository ``repo_id`` (created if missing); returns the
    commit's URL. The folder must hold an adapter (``dylora_moe_config.json``)."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder}: no DyLoRA-MoE adapter to push ({CONFIG_FILE} not found)")
    if not _HUB_ID.match(repo_id):
        raise CheckpointError(f"{repo_id!r} is not a Hub repository id (owner/name)")
    import huggingface_hub

    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info: Any = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                      commit_message=commit_message, revision=revision)
    except Exception as exc:
        raise CheckpointError(f"could not push {folder} to {repo_id} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); check the network, the "
                              "id and your token (huggingface-cli login)") from None
    return str(getattr(info, "commit_url", info))
