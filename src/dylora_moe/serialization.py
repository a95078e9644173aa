"""Saving and loading DyLoRA-MoE adapters (experts + router) next to a base-model fingerprint.

A checkpoint folder holds two files, written atomically (a temporary folder renamed into place,
so a crash never leaves a half-written checkpoint under the final name):

* ``dylora_moe_config.json``: ``format_version``, the ``DyLoRAMoEConfig``, expert ranks, alphas
  and maturity flags, target module names, and the base model's fingerprint (name or path,
  model type, a hash of its config, and a checksum of its input embeddings);
* ``dylora_moe_weights.safetensors``: every expert and router tensor (router feature statistics
  included), keyed by its name in the model.

``load_model`` refuses a checkpoint written for another base model or by a newer format version,
with a message saying which.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomic import write_folder_atomically
from .config import DyLoRAMoEConfig, with_predating_values
from .errors import CheckpointError

FORMAT_VERSION = 1
CONFIG_FILE = "dylora_moe_config.json"
WEIGHTS_FILE = "dylora_moe_weights.safetensors"
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


def base_fingerprint(base_model: torch.nn.Module, name_or_path: str) -> dict[str, Any]:
    """Identify a base model: its name, its architecture (:data:`ARCHITECTURE_KEYS`), a hash of its
    whole config (informative only) and an embedding checksum."""
    config = {k: v for k, v in base_model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    emb = base_model.get_input_embeddings().weight.detach()
    return {
        "name_or_path": name_or_path,
        "model_type": getattr(base_model.config, "model_type", None),
        "architecture": base_architecture(base_model.config),
        "config_sha256": digest,
        "embedding_sq_sum": float(emb.double().pow(2).sum()),
    }


def check_fingerprint(saved: dict[str, Any], base_model: torch.nn.Module, where: str) -> None:
    """Refuse a base model whose architecture or embedding weights differ from the one the checkpoint was
    trained on. (Checkpoints written before ``architecture`` was recorded are checked by model type.)"""
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


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """Expert and router tensors keyed by parameter name (nothing of the frozen base)."""
    wanted = {id(p) for p in [*model.expert_parameters(), *model.router_parameters()]}
    out = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if id(p) in wanted}
    for n, b in model.routers.named_buffers(prefix="routers"):
        out[n] = b.detach().contiguous().cpu()
    return out


def save_model(model, directory: str | Path) -> Path:
    """Write the adapter checkpoint of ``model`` to ``directory`` (atomically)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "moe_config": model.moe_config.to_dict(),
        "expert_ranks": list(model.expert_ranks),
        "expert_alphas": list(model.expert_alphas),
        "maturity": list(model.maturity),
        "targets": [t.name for t in model.targets],
        "base_model": base_fingerprint(model.base_model, model.base_name_or_path),
    }
    tensors = adapter_state_dict(model)

    library = getattr(model, "skill_library", None)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if library is not None:
            library.save(tmp)

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


def load_model(directory: str | Path, base_model=None, *, dtype=None, device=None):
    """Rebuild a ``DyLoRAMoEForCausalLM`` from a checkpoint folder.

    ``base_model`` defaults to loading the fingerprinted name or path with ``load_base_model``.
    """
    from .loading import load_base_model
    from .model import DyLoRAMoEForCausalLM

    directory = Path(directory)
    meta = read_checkpoint_meta(directory)
    fingerprint = meta["base_model"]
    if base_model is None:
        base_model, _ = load_base_model(fingerprint["name_or_path"], dtype=dtype, device=device)
    check_fingerprint(fingerprint, base_model, str(directory))
    saved = with_predating_values(meta["moe_config"])  # a field it predates keeps what it was trained with
    config = DyLoRAMoEConfig.from_dict(saved, source=str(directory / CONFIG_FILE))
    model = DyLoRAMoEForCausalLM(base_model, config, base_name_or_path=fingerprint["name_or_path"])
    ranks, alphas = meta["expert_ranks"], meta["expert_alphas"]
    for rank, alpha in zip(ranks[config.num_experts :], alphas[config.num_experts :]):
        model.add_expert(rank, alpha)
    model.maturity = [bool(m) for m in meta["maturity"]]
    if len(model.maturity) != model.num_experts:
        raise CheckpointError(f"{directory}: {len(model.maturity)} maturity flags for {model.num_experts} experts")

    weights_path = directory / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights_path))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{weights_path}: file not found") from exc
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{weights_path}: unreadable or corrupt ({exc})") from exc
    params = {**dict(model.named_parameters()), **dict(model.routers.named_buffers(prefix="routers"))}
    expected = set(adapter_state_dict(model))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path}: tensors do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise CheckpointError(
                    f"{weights_path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
    from .continual.library import SkillLibrary

    if SkillLibrary.exists(directory):
        model.skill_library = SkillLibrary.load(directory)
        model.skill_library.check_against(model, str(directory))
    return model
