"""The adapter checkpoint format: experts + router next to a base-model fingerprint (core; no model import).

A checkpoint folder holds, written atomically (a temporary folder renamed into place, so a crash never
leaves a half-written checkpoint under the final name):

* ``dylora_moe_config.json``: ``format_version``, the ``DyLoRAMoEConfig``, expert ranks, alphas and maturity
  flags, target module names, the base model's fingerprint (name or path, model type, a hash of its config,
  and a checksum of its input embeddings), and ``attachments``: ``{name: [files]}``;
* ``dylora_moe_weights.safetensors``: every expert and router tensor (router feature statistics included),
  keyed by its name in the model;
* the files of each *attachment*: data a feature keeps with the model (continual learning's skill library).
  A feature registers how to load its attachment (``register_attachment``); the core never imports it. An
  attachment whose loader is not registered loads as :class:`StoredAttachment` (its files, written back
  unchanged when the model is saved again), so nothing is lost through code that does not know it.

``save_model`` writes a model; ``read_adapter`` and ``load_attachments`` read one for
``DyLoRAMoEForCausalLM.from_pretrained``, which refuses a checkpoint written for another base model or by a
newer format version, with a message saying which.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from .atomic import write_folder_atomically
from .config import DyLoRAMoEConfig, with_predating_values
from .errors import CheckpointError
from .layer import ADAPTER_BUFFER_NAMES
from .layout import CONFIG_FILE, MODEL_CARD_FILE, WEIGHTS_FILE

FORMAT_VERSION = 1
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "_commit_hash",
    "_attn_implementation", "_attn_implementation_autoset", "_attn_implementation_internal",
    "quantization_config", "architectures", "output_attentions", "output_hidden_states", "return_dict",
}


# The configuration keys that fix a base model's architecture (shapes and layer count), across families.
# Compared key by key rather than hashing the whole config, whose defaults change between transformers
# releases: a checkpoint must stay loadable after an upgrade.
ARCHITECTURE_KEYS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "head_dim", "tie_word_embeddings",
    "n_embd", "n_layer", "n_head", "n_inner",  # gpt2-style names
)


def base_architecture(config: Any) -> dict[str, Any]:
    """The architecture-defining values of a transformers config (keys it does not have are left out)."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: values[k] for k in ARCHITECTURE_KEYS if k in values and values[k] is not None}


def base_fingerprint(base_model: PreTrainedModel, name_or_path: str) -> dict[str, Any]:
    """Identify a base model: its name, its architecture (:data:`ARCHITECTURE_KEYS`), a hash of its
    whole config (informative only) and an embedding checksum."""
    config = {k: v for k, v in base_model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    emb = cast(torch.Tensor, base_model.get_input_embeddings().weight).detach()
    return {
        "name_or_path": name_or_path,
        "model_type": getattr(base_model.config, "model_type", None),
        "architecture": base_architecture(base_model.config),
        "config_sha256": digest,
        "embedding_sq_sum": float(emb.double().pow(2).sum()),
    }


def check_fingerprint(saved: dict[str, Any], base_model: PreTrainedModel | None, where: str,
                      current: dict[str, Any] | None = None) -> None:
    """Refuse a base model whose architecture or embedding weights differ from the one the checkpoint was
    trained on. (Checkpoints written before ``architecture`` was recorded are checked by model type.)
    ``current``: the base model's fingerprint, when taken earlier (a sharded base cannot be read whole)."""
    if current is None:
        if base_model is None:
            raise ValueError("check_fingerprint needs base_model or current")
        current = base_fingerprint(base_model, "")
    if "architecture" in saved:
        ours, theirs = saved["architecture"], current["architecture"]
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    else:
        differ = [] if saved.get("model_type") == current["model_type"] else ["model_type"]
    if differ:
        details = ", ".join(f"{k}: {saved.get('architecture', saved).get(k)!r} vs {current['architecture'].get(k)!r}"
                            for k in differ)
        raise CheckpointError(
            f"{where}: checkpoint was trained on base model {saved.get('name_or_path')!r} "
            f"(model_type={saved.get('model_type')!r}); the given base model "
            f"(model_type={current['model_type']!r}) has a different configuration ({details})"
        )
    a, b = saved.get("embedding_sq_sum", 0.0), current["embedding_sq_sum"]
    if abs(a - b) > 1e-3 * max(abs(a), abs(b), 1e-12):
        raise CheckpointError(
            f"{where}: the given base model has the configuration of {saved.get('name_or_path')!r} but "
            "different weights (embedding checksum differs): load it onto the base model it was trained on"
        )


def adapter_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Expert and router tensors keyed by parameter name (nothing of the frozen base)."""
    return {n: t.detach().contiguous().cpu() for n, t in adapter_tensors(model).items()}


def adapter_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The live tensors a checkpoint holds, by name: expert parameters, router parameters and buffers, and the
    expert layers' saved frozen tensors (``layer.ADAPTER_BUFFER_NAMES``)."""
    wanted = {id(p) for p in [*model.expert_parameters(), *model.router_parameters()]}
    out = {n: p for n, p in model.named_parameters() if id(p) in wanted}
    out.update(model.routers.named_buffers(prefix="routers"))
    out.update((n, b) for n, b in model.named_buffers() if n.rpartition(".")[2] in ADAPTER_BUFFER_NAMES)
    return out


#: name -> loader(folder) of a registered attachment (see the module docstring)
ATTACHMENT_LOADERS: dict[str, Callable[[Path], Any]] = {}
#: attachments of checkpoints written before the format listed them: name -> the files they used
LEGACY_ATTACHMENTS = {"skill_library": ("skill_library.json", "skill_library.safetensors")}


def register_attachment(name: str, load: Callable[[Path], Any]) -> None:
    """Register how attachment ``name`` is loaded from a checkpoint folder (a feature calls this on import)."""
    ATTACHMENT_LOADERS[name] = load


class StoredAttachment:
    """An attachment whose loader is not registered here: its files, kept as they were."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def save(self, directory: str | Path) -> None:
        for name, data in self.files.items():
            (Path(directory) / name).write_bytes(data)

    def materialize(self, directory: str | Path) -> Path:
        """Write the files into ``directory`` (for the feature's own loader) and return it."""
        self.save(directory)
        return Path(directory)


def save_model(model: Any, directory: str | Path, *, tensors: dict[str, torch.Tensor] | None = None,
               fingerprint: dict[str, Any] | None = None) -> Path:
    """Write the adapter checkpoint of ``model`` (and its attachments) to ``directory``, atomically; a model card
    (``README.md``) already in ``directory`` is kept. ``tensors`` and ``fingerprint`` replace what would be read
    from the model's own tensors (a sharded model: its gathered adapter and the fingerprint taken before
    sharding)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "moe_config": model.moe_config.to_dict(),
        "expert_ranks": list(model.expert_ranks),
        "expert_alphas": list(model.expert_alphas),
        "maturity": list(model.maturity),
        "targets": [t.name for t in model.targets],
        "base_model": fingerprint or base_fingerprint(model.base_model, model.base_name_or_path),
    }
    tensors = adapter_state_dict(model) if tensors is None else tensors
    attachments = {name: value for name, value in model.attachments.items() if value is not None}

    card = Path(directory) / MODEL_CARD_FILE
    card_text = card.read_bytes() if card.is_file() else None  # a model card (README.md) is not ours to drop

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if card_text is not None:
            (tmp / MODEL_CARD_FILE).write_bytes(card_text)
        listed: dict[str, list[str]] = {}
        for name, attachment in attachments.items():
            before = {p.name for p in tmp.iterdir()}
            attachment.save(tmp)
            listed[name] = sorted({p.name for p in tmp.iterdir()} - before)
        (tmp / CONFIG_FILE).write_text(json.dumps({**meta, "attachments": listed}, indent=2) + "\n")

    return write_folder_atomically(directory, write)


def read_versioned_json(
    directory: str | Path, filename: str, *, what: str, max_version: int, required: tuple[str, ...]
) -> dict[str, Any]:
    """Read ``directory/filename``: a JSON object with an integer ``format_version`` <= ``max_version``
    and the ``required`` fields; a ``CheckpointError`` names the file, line or field otherwise."""
    path = Path(directory) / filename
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a {what} ({filename} not found)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    version = data.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: field 'format_version' is missing or not an integer")
    if version > max_version:
        raise CheckpointError(
            f"{path}: format_version {version} was written by a newer dylora-moe (this one reads up to "
            f"{max_version}); upgrade dylora-moe"
        )
    for key in required:
        if key not in data:
            raise CheckpointError(f"{path}: field {key!r} is missing")
    return data


def read_checkpoint_meta(directory: str | Path) -> dict[str, Any]:
    """Read and validate ``dylora_moe_config.json`` of a checkpoint folder."""
    return read_versioned_json(
        directory, CONFIG_FILE, what="DyLoRA-MoE checkpoint", max_version=FORMAT_VERSION,
        required=("moe_config", "expert_ranks", "expert_alphas", "maturity", "base_model"),
    )


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], DyLoRAMoEConfig, dict[str, torch.Tensor]]:
    """``(meta, config, tensors)`` of a checkpoint folder, validated; the config counts every expert the
    checkpoint holds (older files recorded only the experts created up front)."""
    directory = Path(directory)
    meta = read_checkpoint_meta(directory)
    saved = with_predating_values(meta["moe_config"])  # a field it predates keeps what it was trained with
    if isinstance(saved, dict) and isinstance(meta["expert_ranks"], list):
        saved = {**saved, "num_experts": len(meta["expert_ranks"])}
    config = DyLoRAMoEConfig.from_dict(saved, source=str(directory / CONFIG_FILE))
    if not len(meta["expert_ranks"]) == len(meta["expert_alphas"]) == len(meta["maturity"]):
        raise CheckpointError(f"{directory / CONFIG_FILE}: {len(meta['expert_ranks'])} expert ranks, "
                              f"{len(meta['expert_alphas'])} alphas and {len(meta['maturity'])} maturity flags")
    weights_path = directory / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights_path))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{weights_path}: file not found") from exc
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{weights_path}: unreadable or corrupt ({exc})") from exc
    return meta, config, tensors


def load_adapter_tensors(model: Any, tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """Copy ``tensors`` (expert and router tensors by name) into ``model``; they must match exactly."""
    params = adapter_tensors(model)
    expected = set(params)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: tensors do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(params[name].shape)}")
            params[name].copy_(tensor)


def load_attachments(directory: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The attachments a checkpoint lists: each through its registered loader, else as its stored files."""
    directory = Path(directory)
    listed = meta.get("attachments")
    if listed is None:  # written before the format listed them
        listed = {name: [f for f in files if (directory / f).is_file()] for name, files in LEGACY_ATTACHMENTS.items()
                  if (directory / files[0]).is_file()}
    out: dict[str, Any] = {}
    for name, files in listed.items():
        if name in ATTACHMENT_LOADERS:
            out[name] = ATTACHMENT_LOADERS[name](directory)
        else:
            out[name] = StoredAttachment({f: (directory / f).read_bytes() for f in files})
    return out
