"""Find the modules of a Hugging Face causal LM that receive LoRA experts.

Targets are ``nn.Linear`` / GPT-2 ``Conv1D`` modules inside the decoder blocks (the model's
largest ``nn.ModuleList``). They are chosen by module type and name:

* an explicit list: each entry is a full dotted path or a name suffix (``q_proj``,
  ``attn.c_proj``) and must match at least one such module, or a ``TargetError`` names it and
  lists what is available;
* ``'attention'`` (the default) or ``'all-linear'``: the attention (and MLP) projections of the
  known families (llama, mistral, qwen2/3, gemma 1-3, phi, phi3, gpt2, ...); for an unknown
  architecture the structure decides (projections under a module whose name contains
  ``attn``/``attention``, or every linear layer of the blocks). Finding nothing is an error.

``find_targets(model, spec) -> list[Target]`` with each target's decoder-block index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import TargetError

_LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")
FAMILY_PROJECTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # model_type: (attention projections, MLP projections), as name suffixes
    **{
        t: (_LLAMA_ATTN, _LLAMA_MLP)
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "granite")
    },
    "phi": (("q_proj", "k_proj", "v_proj", "dense"), ("fc1", "fc2")),
    "phi3": (("qkv_proj", "o_proj"), ("gate_up_proj", "down_proj")),
    "gpt2": (("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj")),
    "gpt_neox": (("query_key_value", "attention.dense"), ("dense_h_to_4h", "dense_4h_to_h")),
}
PRESETS = ("attention", "all-linear")


@dataclass(frozen=True)
class Target:
    name: str  # dotted path inside the base model
    layer_index: int  # index of the decoder block that holds it


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def decoder_blocks_name(model: nn.Module) -> str:
    """Dotted name of the ``nn.ModuleList`` holding the decoder blocks (the one with most parameters)."""
    best, best_size = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    if best is None:
        raise TargetError(f"{type(model).__name__} has no nn.ModuleList of decoder blocks")
    return best


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def find_targets(model: nn.Module, spec: list[str] | str | None = None) -> list[Target]:
    """Return the target modules for ``spec`` (see module docstring), in model order."""
    blocks = decoder_blocks_name(model)
    block_re = re.compile(re.escape(blocks) + r"\.(\d+)\.")
    candidates: list[tuple[str, int]] = []
    outside: list[str] = []
    for name, module in model.named_modules():
        if not _is_linear(module):
            continue
        m = block_re.match(name)
        if m:
            candidates.append((name, int(m.group(1))))
        else:
            outside.append(name)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = type(model).__name__
    spec = "attention" if spec is None else spec

    if isinstance(spec, str) and spec in PRESETS:
        if model_type in FAMILY_PROJECTIONS:
            attn, mlp = FAMILY_PROJECTIONS[model_type]
            projections = attn + (mlp if spec == "all-linear" else ())
            chosen = [(n, i) for n, i in candidates if any(_matches(n, p) for p in projections)]
        elif spec == "all-linear":
            chosen = list(candidates)
        else:
            chosen = [(n, i) for n, i in candidates if re.search(r"(attn|attention)", n.rsplit(".", 1)[0])]
        if not chosen:
            raise TargetError(
                f"target_modules={spec!r}: no attention/MLP projection found in {arch} "
                f"(model_type={model_type!r}); pass an explicit list, e.g. {_available(candidates)}"
            )
        return [Target(n, i) for n, i in chosen]

    patterns = [spec] if isinstance(spec, str) else list(spec)
    chosen_set: set[str] = set()
    for pattern in patterns:
        hits = [n for n, _ in candidates if _matches(n, pattern)]
        if not hits:
            where = [n for n in outside if _matches(n, pattern)]
            if where:
                raise TargetError(
                    f"target module {pattern!r} matches {where[0]!r}, which is outside the decoder blocks "
                    f"of {arch} (the embeddings and lm_head stay frozen)"
                )
            raise TargetError(
                f"target module {pattern!r} matches no nn.Linear/Conv1D module in the decoder blocks of "
                f"{arch}; available: {_available(candidates)}"
            )
        chosen_set.update(hits)
    return [Target(n, i) for n, i in candidates if n in chosen_set]


def _available(candidates: list[tuple[str, int]]) -> list[str]:
    """Distinct name suffixes (block-relative paths) of the candidate modules."""
    seen: dict[str, None] = {}
    for name, _ in candidates:
        seen[re.sub(r"^.*?\.\d+\.", "", name, count=1)] = None
    return list(seen)
