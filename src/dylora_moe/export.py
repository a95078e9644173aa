"""Export one expert as a standard PEFT LoRA adapter, or merge it into a plain transformers model.

* ``export_expert(model, i, dir)`` writes ``adapter_config.json`` + ``adapter_model.safetensors``
  that ``peft.PeftModel.from_pretrained(base, dir)`` loads on the same base model; the PEFT model
  then reproduces expert ``i``'s outputs (the expert with gate 1, i.e. ``forced_expert=i``). Its
  ``base_model_name_or_path`` is the base model's hub id or folder (for the embedded default, its converted
  local copy), so ``AutoPeftModelForCausalLM.from_pretrained(dir)`` finds the base by itself.
* ``merge_expert(model, i)`` returns a new plain ``PreTrainedModel`` (the wrapper and its base are
  left untouched) whose target weights are ``W + (alpha_i / r_i) B_i A_i``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from .atomic import write_folder_atomically
from .layer import ADAPTER_BUFFER_NAMES, ADAPTER_PARAMETER_NAMES
from .loading import resolve_model_path


def _check_index(model: Any, index: int) -> None:
    if not 0 <= index < model.num_experts:
        raise IndexError(f"expert index {index} out of range for {model.num_experts} experts")


def export_expert(model: Any, index: int, directory: str | Path) -> Path:
    """Write expert ``index`` of ``model`` as a PEFT LoRA adapter folder.

    A plain expert is written as it is (rank ``r``, ``lora_alpha`` alpha). With GOAT's scale or a residual
    (``expert_init='svd'``) the scale is folded into B and the residual appended as extra rank, so that the
    adapter still reproduces the expert exactly: ``A' = [A; R_A]``, ``B' = [scale B, -R_B]``, ``lora_alpha = r'``.
    """
    from peft import LoraConfig  # here, not at the top: peft is slow to import and only export needs it

    _check_index(model, index)
    layers = {t.name: layer for t, layer in zip(model.targets, model.expert_layers)
              if index < layer.num_experts}  # a layer-wise allocation leaves some blocks without expert ``index``
    tensors, ranks = {}, set()
    for name, layer in layers.items():
        a, b = _expert_factors(layer, index)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().cpu().contiguous()
        ranks.add(a.shape[0])
    (rank,) = ranks
    folded = any(_folded(layer) for layer in layers.values())
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=rank if folded else model.expert_alphas[index],
        lora_dropout=model.moe_config.dropout,
        target_modules=sorted(layers),
        fan_in_fan_out={layer.is_conv1d for layer in layers.values()} == {True},
        bias="none",
        task_type="CAUSAL_LM",
        # the embedded default's alias means nothing to PEFT: name the converted local copy it loads from
        base_model_name_or_path=resolve_model_path(model.base_name_or_path) if model.base_name_or_path else None,
        inference_mode=True,
    )

    def write(tmp: Path) -> None:
        peft_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

    return write_folder_atomically(directory, write)


def _folded(layer: Any) -> bool:
    return layer.scaling != "alpha_r" or layer.lora_residual_A is not None


def _expert_factors(layer: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r', d_in], B [d_out, r'])`` of expert ``index`` as PEFT stores them (see :func:`export_expert`)."""
    a, b = layer.expert_a(index), layer.lora_B[index]
    if not _folded(layer):
        return a, b
    b = b * layer.scale_of(index)
    if layer.lora_residual_A is not None:
        a = torch.cat([a, layer.lora_residual_A.to(a.dtype)])
        b = torch.cat([b, -layer.lora_residual_B.to(b.dtype)], dim=1)
    return a, b


def merge_expert(model: Any, index: int) -> PreTrainedModel:
    """A new plain transformers model equal to the base with expert ``index`` merged in."""
    _check_index(model, index)
    base = model.base_model
    if getattr(base, "is_quantized", False) or getattr(base.config, "quantization_config", None) is not None:
        raise ValueError("merge_expert needs the base model's dense weights, and this base is quantized "
                         "(train.base_quantization): export the expert with export_expert and merge it into the "
                         "unquantized base with PEFT")
    merged = AutoModelForCausalLM.from_config(base.config, dtype=base.dtype)
    adapter_names = (*ADAPTER_PARAMETER_NAMES, *ADAPTER_BUFFER_NAMES)
    adapter_prefixes = tuple(f"{t.name}.{p}" for t in model.targets for p in adapter_names)
    state = {}
    for name, tensor in base.state_dict().items():
        if not name.startswith(adapter_prefixes):
            state[name.replace(".base_layer.", ".")] = tensor
    with torch.no_grad():
        for target, layer in zip(model.targets, model.expert_layers):
            if index >= layer.num_experts:
                continue
            key = f"{target.name}.weight"
            delta = layer.expert_delta_weight(index).to(state[key].dtype)
            state[key] = state[key] + delta.to(state[key].device)
    merged.load_state_dict(state, strict=True)
    merged.to(base.device)
    merged.name_or_path = model.base_name_or_path
    merged.eval()
    return merged
