"""Exact match of a numeric answer: the task metric of math word problems (the ``math`` domain).

Each example's prompt is built exactly as in training (:func:`~dylora_moe.data.build_prompt_ids`); the model
answers greedily; the first number in its reply is compared with the first number of the reference answer
(``"16 oranges"`` -> 16; thousands separators and a trailing ``.0`` do not matter)::

    result = exact_match(model, tokenizer, load_examples("math", split="validation"))
    result.accuracy, result.correct, result.total, result.rows[0]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import Example, build_prompt_ids, resolve_pad_token_id

__all__ = ["ExactMatchResult", "exact_match", "first_number"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def first_number(text: str) -> Fraction | None:
    """The first number in ``text`` as an exact fraction (``"1,250.50"``, ``"-3"``, ``"3/4"``), or None."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    token = match.group(0).replace(",", "")
    try:
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None


@dataclass
class ExactMatchResult:
    """``correct`` of ``total`` replies carried the reference's number; ``rows`` holds each reply."""

    correct: int
    total: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"exact_match": self.accuracy, "correct": self.correct, "total": self.total, "rows": self.rows}


@torch.no_grad()
def exact_match(model: Any, tokenizer: Any, examples: Sequence[Example], *, batch_size: int = 16,
                max_new_tokens: int = 24, forced_expert: int | None = None,
                progress: bool = True) -> ExactMatchResult:
    """Greedy replies to ``examples`` (left-padded batches, the KV cache), scored by :func:`first_number`;
    ``forced_expert`` sends every prompt of a DyLoRA-MoE model to that expert."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    pad_id = resolve_pad_token_id(tokenizer)
    rows: list[dict[str, Any]] = []
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc="exact match", disable=not progress):
            batch = examples[start:start + batch_size]
            prompts = [build_prompt_ids(ex, tokenizer) for ex in batch]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
            extra = {} if forced_expert is None else {"forced_expert": forced_expert}
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_id, **extra)
            for ex, row in zip(batch, out[:, width:]):
                reply = tokenizer.decode(row, skip_special_tokens=True)
                want, got = first_number(ex.output), first_number(reply)
                rows.append({"input": ex.input, "reference": ex.output, "reply": reply,
                             "correct": want is not None and got == want})
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return ExactMatchResult(sum(r["correct"] for r in rows), len(rows), rows)
