"""Replies to instructions from a loaded model: batched (left-padded, KV cache), greedy or sampled, routed as
usual or forced to one expert. ``dylora-moe generate`` and the exact-match metric use it::

    replies = generate_replies(model, tokenizer, [Example("prompt", "Reverse a string.")], max_new_tokens=64,
                               temperature=0.7, top_p=0.9, seed=0)
    replies[0].text, replies[0].expert, replies[0].router_probs
    prompts = read_prompts("prompts.jsonl")    # {"instruction": ..., "input": ...} per line, or a .txt file

Each prompt is built exactly as in training (:func:`~dylora_moe.data.build_prompt_ids`). ``temperature=0``
is greedy decoding; ``seed`` makes sampling repeatable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import DataError, Example, build_prompt_ids, read_records, resolve_pad_token_id
from .sampling import SamplingSettings

__all__ = ["Reply", "SamplingSettings", "generate_replies", "left_padded", "read_prompts"]


@dataclass
class Reply:
    """One prompt's reply; ``expert`` is the expert its sequence went to (mostly, with token routing) or the
    forced one, ``router_probs`` the router's probabilities (None when forced or for a plain model)."""

    instruction: str
    input: str
    text: str
    expert: int | None = None
    router_probs: list[float] | None = field(default=None)
    forced: bool = False


def read_prompts(path: str | Path) -> list[Example]:
    """Prompts from a file: JSON / JSON Lines records with ``instruction`` (and optionally ``input``), or a
    ``.txt`` file with one instruction per non-empty line. Errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    if path.suffix.lower() == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").split("\n")]
        prompts = [Example("prompt", line) for line in lines if line]
        if not prompts:
            raise DataError("no prompt (every line is empty)", path=path)
        return prompts
    prompts = []
    for raw in read_records(path):
        record = raw.data
        record_index = None if raw.line is not None else raw.index
        for key in ("instruction", "input"):
            if key in record and not isinstance(record[key], str):
                raise DataError(f"'{key}' must be a string", path=path, line=raw.line, record=record_index, field=key)
        if not record.get("instruction", "").strip():
            raise DataError("missing or empty 'instruction'", path=path, line=raw.line, record=record_index,
                            field="instruction")
        prompts.append(Example("prompt", record["instruction"], record.get("input", "")))
    return prompts


@torch.no_grad()
def generate_replies(model: Any, tokenizer: Any, examples: Sequence[Example], settings: SamplingSettings | None = None,
                     *, expert: int | None = None, batch_size: int = 8, routing: bool = True,
                     progress: bool = False, desc: str = "generate") -> list[Reply]:
    """Replies to ``examples`` in batches of ``batch_size`` (see the module docstring); ``expert`` forces every
    prompt of a DyLoRA-MoE model to that expert; ``routing=False`` skips the forward that reports each prompt's
    expert and router probabilities; ``progress`` shows a bar per batch. The model's training flag is
    restored afterwards."""
    settings = settings or SamplingSettings()
    settings.validate()
    routed_model = hasattr(model, "num_experts")
    if expert is not None and (not routed_model or not 0 <= expert < model.num_experts):
        have = f"{model.num_experts} experts (0..{model.num_experts - 1})" if routed_model else "no experts"
        raise ValueError(f"expert={expert}: the model has {have}")
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    was_training = model.training
    model.eval()
    pad_id = resolve_pad_token_id(tokenizer)
    extra = {} if expert is None else {"forced_expert": expert}
    replies: list[Reply] = []
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not progress):
            batch = list(examples[start:start + batch_size])
            ids, mask = left_padded([build_prompt_ids(ex, tokenizer) for ex in batch], pad_id, model.device)
            choice, probs = (_routing(model, ids, mask) if routing and routed_model and expert is None
                             else (None, None))
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                                 pad_token_id=pad_id, **settings.generate_kwargs(), **extra)
            for i, (ex, row) in enumerate(zip(batch, out[:, ids.shape[1]:])):
                replies.append(Reply(ex.instruction, ex.input, tokenizer.decode(row, skip_special_tokens=True),
                                     expert if choice is None else choice[i],
                                     None if probs is None else probs[i], forced=expert is not None))
    finally:
        model.train(was_training)
    return replies


def left_padded(prompts: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[B, T]``, prompts padded on the left (generation appends on the right)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def _routing(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[list[int], list[list[float]]]:
    """Each prompt's expert ``[B]`` and router probabilities ``[B, E]`` (one forward)."""
    out = model(input_ids=ids, attention_mask=mask)
    return [int(e) for e in out.expert_choice.tolist()], out.router_probs.float().tolist()
