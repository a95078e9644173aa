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

from ..common.generation import generate_replies
from ..common.sampling import SamplingSettings
from ..data import Example

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


def exact_match(model: Any, tokenizer: Any, examples: Sequence[Example], *, batch_size: int = 16,
                max_new_tokens: int = 24, forced_expert: int | None = None,
                progress: bool = True) -> ExactMatchResult:
    """Greedy replies to ``examples`` (:func:`~dylora_moe.common.generation.generate_replies`: left-padded
    batches, the KV cache), scored by :func:`first_number`; ``forced_expert`` sends every prompt of a
    DyLoRA-MoE model to that expert."""
    replies = generate_replies(model, tokenizer, examples, SamplingSettings(max_new_tokens=max_new_tokens),
                               expert=forced_expert, batch_size=batch_size, routing=False, progress=progress,
                               desc="exact match")
    rows: list[dict[str, Any]] = []
    for ex, reply in zip(examples, replies):
        want, got = first_number(ex.output), first_number(reply.text)
        rows.append({"input": ex.input, "reference": ex.output, "reply": reply.text,
                     "correct": want is not None and got == want})
    return ExactMatchResult(sum(r["correct"] for r in rows), len(rows), rows)
